"""What the main process and the scheduler processes tell each other about a reload and /info.

A reload travels as SGLang's own ``UpdateWeightFromDiskReqInput`` whose ``model_path`` is a request
directory holding :data:`RELOAD_MARKER`; the workers' JSON reply travels back in the reply's
``message`` (under :data:`REPLY_KEY`), and each worker's info in ``get_internal_state``'s dict (under
:data:`INFO_KEY`). No SGLang import: both sides and the tests use these.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import ErrorCode, MixedPrecisionError

RELOAD_MARKER = "mixed_precision_reload.json"
REPLY_KEY = "mixed_precision_reload"  # the worker's JSON reply travels in UpdateWeightFromDiskReqOutput.message
INFO_KEY = "mixed_precision"  # the worker's info travels in get_internal_state's dict
HISTORY = 20  # reloads remembered for /info (by the main process and by each worker)


def write_worker_request(request_dir: str | Path, request: dict) -> None:
    (Path(request_dir) / RELOAD_MARKER).write_text(json.dumps(request))


def read_worker_request(model_path: str) -> dict | None:
    """The reload request in ``model_path`` (None when it is an ordinary update_weights_from_disk)."""
    marker = Path(model_path) / RELOAD_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))


def encode_reply(reply: dict) -> str:
    # The tokenizer joins several DP ranks' messages with " | ": keep "|" out of the JSON text.
    return json.dumps({REPLY_KEY: reply}).replace("|", "\\u007c")


def decode_worker_reply(success: bool, message: str) -> dict:
    """The workers' JSON reply; several DP ranks' replies are merged (any failure fails)."""
    replies = []
    for part in message.split(" | "):
        try:
            replies.append(json.loads(part)[REPLY_KEY])
        except (ValueError, KeyError, TypeError):
            raise MixedPrecisionError(
                ErrorCode.RELOAD_WORKER_MISSING,
                f"a worker answered the reload without the mixed-precision executor: {part[:300]}",
                fix="the plugin's hooks are not installed in the scheduler processes: install the package "
                "where SGLang runs so that its plugin registers sglang_mixed_precision.serving.hooks",
            ) from None
    failed = [r for r in replies if not r.get("success")]
    merged = failed[0] if failed else replies[0]
    return {**merged, "success": success and not failed}
