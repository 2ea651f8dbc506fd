"""The reload and info service of the main process: the active mix and one reload at a time.

``POST /mixed_precision/reload`` (``{"config": "<yaml>"}`` or ``{"config_path": "..."}``, plus
``"restart"``, ``"dry_run"``): the new config is planned and diffed against the running plan in this
process (:mod:`..core.reload_plan`): invalid -> 400 with the plan's errors, a layer that needs a
rebuild -> 409 listing them (or a managed restart with ``"restart": true``, :mod:`.restart`). Layers
that only change source are then reloaded in place by every TP worker (:mod:`.reload_worker`).

The reload reaches the workers as SGLang's own ``UpdateWeightFromDiskReqInput`` (so SGLang's
model-update lock drains running requests, holds new ones, and flushes the prefix cache after
success) whose ``model_path`` is a request directory (:mod:`.messages`); the workers' hook
(:mod:`.hooks`) recognises it and runs the mixed reload instead of SGLang's whole-model reload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import read_config_text
from ..core.errors import ErrorCode, MixedPrecisionError, error_json
from ..core.errors import http_status as status_of
from ..core.reload_plan import ReloadPlan, config_sha256, parse_reload_request, plan_reload, rebuild_refusal
from . import QUANT_METHOD
from .info import build_info
from .messages import HISTORY, INFO_KEY, decode_worker_reply, write_worker_request
from .restart import request_restart

logger = logging.getLogger(__name__)


@dataclass
class ActiveMix:
    """The config the server runs (this process's view)."""

    config_text: str
    config_path: Path
    tp_size: int
    skeleton: str | None = None
    origin: str = "launch"  # launch | reload
    plan: Any = None
    reloads: list[dict] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return config_sha256(self.config_text)

    def active_plan(self):
        if self.plan is None:
            from ..core.reload_plan import plan_of

            self.plan = plan_of(self.config_text, self.config_path, self.tp_size, self.skeleton)
        return self.plan


def active_mix_from_model_path(model_path: str | os.PathLike, tp_size: int) -> ActiveMix:
    """The active mix of a server whose ``--model-path`` is a plan directory."""
    config_json = Path(model_path) / "config.json"
    try:
        qc = json.loads(config_json.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError):
        qc = {}
    if str(qc.get("quant_method", "")).lower() != QUANT_METHOD or not qc.get("config_path"):
        raise MixedPrecisionError(
            ErrorCode.NOT_MIXED_PRECISION,
            f"the served model {model_path} is not a mixed-precision plan",
            where=str(config_json),
            fix="start the server with launch_mixed_precision_server.py --enable-mixed-precision "
            "or serve a plan directory (`sglang-mp plandir`)",
        )
    path = Path(qc["config_path"])
    text = read_config_text(
        path,
        missing_fix="restore the YAML the plan directory names, or rewrite the plan "
        "directory (`sglang-mp plandir`) and restart the server",
    )
    return ActiveMix(text, path, tp_size, qc.get("skeleton"))


class Backend:
    """How the main process reaches the workers (SGLang's tokenizer manager in a server)."""

    async def send_reload(self, request_dir: str) -> tuple[bool, str]:
        raise NotImplementedError

    async def worker_info(self) -> list[dict]:
        raise NotImplementedError


class TokenizerManagerBackend(Backend):
    def __init__(self, tokenizer_manager):
        self.tm = tokenizer_manager

    async def send_reload(self, request_dir: str) -> tuple[bool, str]:
        from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

        tm = self.tm
        # SGLang records the "model path" of a successful update; the served model stays the same.
        kept = (tm.model_path, tm.served_model_name)
        obj = UpdateWeightFromDiskReqInput(
            model_path=request_dir, load_format=tm.config_value("load_format"), flush_cache=True
        )
        try:
            success, message, _ = await tm.update_weights_from_disk(obj, None)
        finally:
            tm.model_path, tm.served_model_name = kept
        return success, message

    async def worker_info(self) -> list[dict]:
        states = await self.tm.get_internal_state()
        return [s.get(INFO_KEY) for s in states if isinstance(s, dict)]


class MixedPrecisionRuntime:
    """What the routes and Engine methods call: info, config, reload (one at a time)."""

    def __init__(self, active: ActiveMix, backend: Backend, restart: Callable | None = None):
        self.active = active
        self.backend = backend
        self.restart = restart or request_restart
        self._lock = asyncio.Lock()

    # -- inspection
    def config_text(self) -> str:
        return self.active.config_text

    async def info(self) -> dict:
        plan = self.active.active_plan()
        try:
            workers = await self.backend.worker_info()
            worker, worker_error = (workers[0] if workers else None), None
        except Exception as e:  # info must still describe the plan if the workers cannot answer
            worker, worker_error = None, error_json(e)
        return build_info(self.active, plan, worker, worker_error)

    # -- reload
    async def reload(self, body: Any) -> tuple[int, dict]:
        if self._lock.locked():
            busy = MixedPrecisionError(
                ErrorCode.RELOAD_BUSY, "another reload is in progress", fix="wait for it to finish, then retry"
            )
            return status_of(busy), {"success": False, "error": error_json(busy)}
        async with self._lock:
            try:
                return await self._reload(body)
            except Exception as e:
                if not isinstance(e, MixedPrecisionError):
                    logger.exception("mixed_precision reload failed")
                return status_of(e), {
                    "success": False,
                    "error": error_json(e),
                    "applied": False,
                    "serving": self.active.sha256,
                }

    async def _reload(self, body: Any) -> tuple[int, dict]:
        # Off the event loop: planning reads every source's headers (about a second for a 235B mix),
        # and the server's other requests must keep flowing meanwhile.
        request = await asyncio.to_thread(parse_reload_request, body, base_dir=self.active.config_path.parent)
        reload_plan = await asyncio.to_thread(plan_reload, self.active.active_plan(), request, self.active.skeleton)
        diff = reload_plan.diff.to_json()
        base = {"config_sha256": request.sha256, "diff": diff, "serving": self.active.sha256}
        if reload_plan.diff.rebuild:
            if not request.restart:
                refusal = rebuild_refusal(reload_plan)
                return 409, {
                    "success": False,
                    "error": error_json(refusal),
                    "applied": False,
                    "rebuild_layers": [c.to_json() for c in reload_plan.diff.rebuild],
                    **base,
                }
            if request.dry_run:
                return 200, {"success": True, "status": "dry_run", "would": "restart", **base}
            marker = self.restart(request.config_text, request.anchor, inline=request.inline)
            return 202, {"success": True, "status": "restart_requested", "restart_file": str(marker), **base}
        if request.dry_run:
            return 200, {
                "success": True,
                "status": "dry_run",
                "would": "reload" if reload_plan.loads else "nothing",
                "bytes": reload_plan.bytes,
                **base,
            }
        if not reload_plan.loads:
            self._activate(request, reload_plan, {"layers": 0, "bytes_read": 0})
            return 200, {"success": True, "status": "unchanged", **base}
        reply = await self._send(reload_plan)
        if not reply["success"]:
            status = 500 if reply.get("stage") == "apply" else 400
            return status, {
                "success": False,
                "status": "refused",
                "applied": False,
                "stage": reply.get("stage"),
                "failures": reply.get("failures", []),
                **base,
            }
        self._activate(request, reload_plan, reply)
        return 200, {
            "success": True,
            "status": "reloaded",
            "layers": reload_plan.layers,
            "bytes_read": reply.get("bytes_read"),
            "seconds": reply.get("seconds"),
            **{**base, "serving": request.sha256},
        }

    async def _send(self, reload_plan: ReloadPlan) -> dict:
        request_dir = tempfile.mkdtemp(prefix="sglang-mp-reload-")
        try:
            write_worker_request(request_dir, reload_plan.worker_request(self.active.skeleton))
            success, message = await self.backend.send_reload(request_dir)
        finally:
            shutil.rmtree(request_dir, ignore_errors=True)
        return decode_worker_reply(success, message)

    def _activate(self, request, reload_plan: ReloadPlan, reply: dict) -> None:
        a = self.active
        a.config_text, a.config_path, a.plan, a.origin = request.config_text, request.anchor, reload_plan.plan, "reload"
        a.reloads = (
            a.reloads
            + [
                {
                    "config_sha256": request.sha256,
                    "layers": reply.get("layers", 0),
                    "bytes_read": reply.get("bytes_read", 0),
                    "seconds": reply.get("seconds"),
                    "at": time.time(),
                }
            ]
        )[-HISTORY:]
