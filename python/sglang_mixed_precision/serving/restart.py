"""Managed restart: the runtime asks the launcher that supervises the server to restart it with a new config.

The launcher (``launch_mixed_precision_server.py``) sets :data:`RESTART_FILE_ENV` for the server it
starts and watches that path; the runtime writes the request there. No SGLang import: the launcher uses it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.reload_plan import config_sha256

logger = logging.getLogger(__name__)

RESTART_FILE_ENV = "SGLANG_MP_RESTART_FILE"  # set by the launcher: where a managed restart is requested


def request_restart(config_text: str, anchor: Path, *, inline: bool, restart_file: str | None = None) -> Path:
    """Ask the launcher to restart the server with a new config; returns the marker written.

    The launcher sets :data:`RESTART_FILE_ENV` for the server it supervises and watches that path.
    An inline config is written next to where its relative paths point (the active config's
    directory) so that they keep their meaning.
    """
    target = restart_file or os.environ.get(RESTART_FILE_ENV)
    if not target:
        raise MixedPrecisionError(
            ErrorCode.RESTART_UNAVAILABLE,
            "this server was not started by launch_mixed_precision_server.py, so nothing can restart it",
            fix="restart it yourself with the new config, or launch it with launch_mixed_precision_server.py",
        )
    sha256 = config_sha256(config_text)
    config_path = Path(anchor)
    if inline:
        config_path = config_path.parent / f"mixed_precision_restart_{sha256[:12]}.yaml"
        try:
            config_path.write_text(config_text, encoding="utf-8")
        except OSError as e:
            raise MixedPrecisionError(
                ErrorCode.RESTART_UNAVAILABLE,
                f"cannot write the new config to {config_path}: {e}",
                where=str(config_path),
                fix="send the config by 'config_path' instead",
            ) from None
    marker = Path(target)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"config_path": str(config_path), "config_sha256": sha256, "requested_at": time.time()}))
    os.replace(tmp, marker)  # the launcher never sees half a file
    logger.info("mixed_precision: managed restart requested with %s (%s)", config_path, marker)
    return marker


def read_restart_request(restart_file: str | os.PathLike) -> dict | None:
    """For the launcher: the pending restart request ({config_path, config_sha256, requested_at}) or None."""
    path = Path(restart_file)
    if not path.is_file():
        return None
    request = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(request, dict) or "config_path" not in request:
        raise MixedPrecisionError(
            ErrorCode.RESTART_BAD_REQUEST,
            f"{path} is not a restart request",
            where=str(path),
            fix="delete the file; restarts are requested through POST /mixed_precision/reload",
        )
    return request
