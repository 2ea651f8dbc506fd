"""Runtime inspection and reload of a served mix: HTTP routes, Engine methods, the worker executor.

Routes (added to SGLang's FastAPI app by :func:`install`, which the plugin runs in every process):

* ``GET /mixed_precision/info``   -- per module: source label and path, scheme, SGLang method class,
  bytes, TP split; per SGLang layer on rank 0: parameter shapes and bytes; totals per precision and
  per rank; the active config (path, sha256); load time and bytes read by the loader;
* ``GET /mixed_precision/config`` -- the active YAML;
* ``POST /mixed_precision/reload`` -- ``{"config": "<yaml>"}`` or ``{"config_path": "..."}``
  (+ ``"restart"``, ``"dry_run"``). The new config is planned and diffed against the running plan
  in this process (:mod:`..reload`): invalid -> 400 with the plan's errors, a layer that needs a
  rebuild -> 409 listing them (or a managed restart with ``"restart": true``). Layers that only
  change source are then reloaded in place by every TP worker.

The reload reaches the workers as SGLang's own ``UpdateWeightFromDiskReqInput`` (so SGLang's
model-update lock drains running requests, holds new ones, and flushes the prefix cache after
success) whose ``model_path`` is a request directory holding :data:`RELOAD_MARKER`. An AROUND hook
on ``TpModelWorker.update_weights_from_disk`` recognises it and runs :func:`execute_reload` instead
of SGLang's whole-model reload: re-plan (headers), read and check every new tensor into host memory,
agree across TP ranks, and only then copy into the live parameters of the changed layers, with a
host snapshot to restore if anything fails on any rank. The old weights keep serving on failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
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
from ..core.reload_plan import (
    ReloadPlan,
    config_sha256,
    parse_reload_request,
    plan_reload,
    rebuild_refusal,
    replan_in_worker,
)
from ..tensors import TensorReader
from . import QUANT_METHOD

logger = logging.getLogger(__name__)

RELOAD_MARKER = "mixed_precision_reload.json"
REPLY_KEY = "mixed_precision_reload"  # the worker's JSON reply travels in UpdateWeightFromDiskReqOutput.message
INFO_KEY = "mixed_precision"  # the worker's info travels in get_internal_state's dict
RESTART_FILE_ENV = "SGLANG_MP_RESTART_FILE"  # set by the launcher: where a managed restart is requested
HISTORY = 20  # reloads remembered for /info
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")

WORKER_TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.update_weights_from_disk"
INTERNAL_STATE_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"


# =================================================================================================
# Worker side: stage, agree, apply
# =================================================================================================
@dataclass
class StagedReload:
    """New tensors in host memory, checked, not yet applied."""

    plan: ReloadPlan
    tensors: dict[str, Any]  # checkpoint name -> CPU tensor
    layer_of: dict[str, str]  # checkpoint name -> SGLang layer prefix
    bytes: int = 0
    seconds: float = 0.0


def _tensor_problem(load, what: str, fix: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.RELOAD_BAD_TENSOR, f"tensor {load.name} (source {load.label!r}): {what}", where=load.file, fix=fix
    )


def stage_tensors(reload_plan: ReloadPlan) -> StagedReload:
    """Read every tensor of the reload into host memory and check it; touches no model.

    Checks, per file: it is still there and whole (header against size); per tensor: it is there
    with the planned dtype and shape, its bytes read, and float data is finite. The first problem raises.
    """
    import torch

    start = time.perf_counter()
    tensors, layer_of, nbytes = {}, {}, 0
    checked_files: set[str] = set()
    readers = {label: TensorReader(s) for label, s in reload_plan.plan.sources.items()}
    try:
        for load in reload_plan.loads:
            if load.file not in checked_files:
                _check_file(Path(load.file))
                checked_files.add(load.file)
            try:
                tensor = readers[load.label].read(load.name)
            except MixedPrecisionError:
                raise
            except Exception as e:  # safetensors / torch read errors name no file: add it
                raise _tensor_problem(
                    load,
                    f"cannot be read ({type(e).__name__}: {e})",
                    "the file is damaged; download or convert it again",
                ) from None
            _check_tensor(load, tensor, torch)
            tensors[load.name] = tensor.detach().to("cpu").contiguous()
            layer_of[load.name] = load.layer
            nbytes += tensor.numel() * tensor.element_size()
    finally:
        for r in readers.values():
            r.close()
    return StagedReload(reload_plan, tensors, layer_of, nbytes, time.perf_counter() - start)


def _check_file(path: Path) -> None:
    """The file is still there and, for safetensors, whole (its header against its size)."""
    from ..core.sources.safetensors import read_header

    if not path.is_file():
        raise MixedPrecisionError(
            ErrorCode.MISSING_FILE,
            f"{path} disappeared after the reload was planned",
            where=str(path),
            fix="restore the file and send the reload again",
        )
    if path.suffix == ".safetensors":
        read_header(path)  # raises corrupt_safetensors for a truncated / damaged file


_TORCH_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
}


def _check_tensor(load, tensor, torch) -> None:
    expected = getattr(torch, _TORCH_DTYPES.get(load.dtype, ""), None)
    if expected is not None and tensor.dtype != expected:
        raise _tensor_problem(
            load,
            f"is {tensor.dtype}, the plan read {load.dtype} from its header",
            "the file changed after planning; send the reload again",
        )
    if tuple(tensor.shape) != tuple(load.shape):
        raise _tensor_problem(
            load,
            f"has shape {list(tensor.shape)}, the plan expects {list(load.shape)}",
            "the file changed after planning; send the reload again",
        )
    if load.dtype in FLOAT_DTYPES:
        finite = torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise _tensor_problem(
                load, f"holds {bad} NaN/inf value(s)", "the checkpoint is corrupt; re-convert or re-download it"
            )


def layer_parameters(model, prefixes) -> dict[str, Any]:
    """{full parameter name: parameter} of the SGLang layers ``prefixes`` (raises if one is absent)."""
    out = {}
    for prefix in prefixes:
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise MixedPrecisionError(
                ErrorCode.RELOAD_LAYER_MISSING,
                f"the model has no layer {prefix!r}",
                where=prefix,
                fix="the new plan does not match the served model",
            ) from None
        scale = getattr(module, "weight_scale_inv", None)
        if scale is not None and getattr(scale, "format_ue8m0", False):
            raise MixedPrecisionError(
                ErrorCode.RELOAD_NEEDS_REBUILD,
                f"layer {prefix!r} runs DeepGEMM with scales requantized to UE8M0 after loading; "
                "checkpoint scales cannot be copied into it",
                where=prefix,
                fix='reload with "restart": true, or keep this layer\'s source',
            )
        for name, param in module.named_parameters(recurse=False):
            out[f"{prefix}.{name}"] = param
    return out


class AppliedReload:
    """New values copied into the live parameters; ``restore()`` puts the old ones back."""

    def __init__(self, params: dict[str, Any], snapshot: dict[str, Any]):
        self.params = params
        self.snapshot = snapshot

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for name, param in self.params.items():
                param.data.copy_(self.snapshot[name].to(param.device))
        _synchronize()


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def apply_staged(model, staged: StagedReload) -> AppliedReload:
    """Copy the staged tensors into the model through its own ``load_weights`` (:func:`.delivery.deliver`: the same
    ``weight_loader`` path as the initial load, TP slicing and fused shards included). Only the
    changed layers are touched; every tensor must land in a parameter of its own layer. On any
    error the snapshot is restored before raising."""
    import torch

    from .audit import LoadRecorder
    from .delivery import deliver

    params = layer_parameters(model, sorted(set(staged.layer_of.values())))
    snapshot = {name: p.data.detach().to("cpu", copy=True) for name, p in params.items()}
    applied = AppliedReload(params, snapshot)
    recorder = LoadRecorder(model)
    try:
        with torch.no_grad():
            deliver(model, recorder.track(staged.tensors.items()))
        _synchronize()
        _check_consumed(staged, recorder.by_tensor)
    except Exception as e:
        applied.restore()
        if isinstance(e, MixedPrecisionError):
            raise
        raise MixedPrecisionError(
            ErrorCode.RELOAD_APPLY_FAILED,
            f"copying the new weights failed ({type(e).__name__}: {e}); the previous weights were restored",
            fix="check the server log for the failing parameter",
        ) from e
    finally:
        recorder.detach()
    return applied


def _check_consumed(staged: StagedReload, by_tensor: dict[str, list[str]]) -> None:
    problems = []
    for name, layer in staged.layer_of.items():
        targets = by_tensor.get(name, [])
        if not targets:
            problems.append(f"{name} reached no parameter")
        elif any(not t.startswith(layer + ".") for t in targets):
            problems.append(f"{name} reached {', '.join(targets)}, outside {layer}")
    if problems:
        raise MixedPrecisionError(
            ErrorCode.RELOAD_APPLY_FAILED,
            "the model did not take the new tensors where planned (previous "
            "weights restored): " + "; ".join(problems[:8]),
            fix="report this model's parameter names",
        )


def single_rank(ok: bool, message: str) -> list[tuple[int, bool, str]]:
    return [(0, ok, message)]


def tp_agree(ok: bool, message: str) -> list[tuple[int, bool, str]]:
    """Every TP rank's (rank, ok, message): each rank applies only if all staged, keeps only if all applied."""
    import torch
    from sglang.srt.distributed.parallel_state import get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized() or get_tp_group().world_size == 1:
        return single_rank(ok, message)
    group = get_tp_group()
    out: list = [None] * group.world_size
    torch.distributed.all_gather_object(out, (group.rank_in_group, ok, message), group=group.cpu_group)
    return out


def _failures(votes) -> list[dict]:
    return [{"rank": rank, "error": json.loads(message)} for rank, ok, message in votes if not ok]


def _agreed_step(step: Callable, agree: Callable, log: Callable, failed: str) -> tuple[Any, list, bool]:
    """Run ``step`` on this rank, then let every rank vote (a rank that raised votes no with its error).

    Returns (step's result, None where it raised; the votes; whether all ranks succeeded).
    """
    try:
        result, ok, message = step(), True, ""
    except Exception as e:
        log("mixed_precision reload %s: %s", failed, e)
        result, ok, message = None, False, json.dumps(error_json(e))
    votes = agree(ok, message)
    return result, votes, all(v[1] for v in votes)


def _stage(model, active_plan, request: dict) -> tuple[ReloadPlan, StagedReload]:
    reload_plan = replan_in_worker(active_plan, request)
    staged = stage_tensors(reload_plan)
    layer_parameters(model, reload_plan.layers)  # layers exist and take checkpoint bytes, before any copy
    return reload_plan, staged


def _refused(stage: str, votes) -> dict:
    return {"success": False, "stage": stage, "failures": _failures(votes), "applied": False}


@dataclass
class WorkerState:
    """What a worker remembers of its reloads (for /info)."""

    config_path: str | None = None
    config_sha256: str | None = None
    reloads: list[dict] = field(default_factory=list)


WORKER = WorkerState()


def execute_reload(model, mixed_config, request: dict, agree: Callable = single_rank) -> dict:
    """Run one reload in a worker; returns the reply (``success`` false with the error on failure).

    Phases: re-plan and stage (nothing touched) -> all ranks agree -> apply with snapshot -> all
    ranks agree again (a rank whose copy failed makes every rank restore).
    """
    start = time.perf_counter()
    planned, votes, all_ok = _agreed_step(
        lambda: _stage(model, mixed_config.plan, request), agree, logger.warning, "refused while staging"
    )
    if not all_ok:
        return _refused("stage", votes)
    reload_plan, staged = planned

    applied, votes, all_ok = _agreed_step(
        lambda: apply_staged(model, staged), agree, logger.error, "failed while applying (restored)"
    )
    if not all_ok:
        if applied is not None:
            applied.restore()
        return _refused("apply", votes)

    mixed_config.plan = reload_plan.plan
    record = {
        "config_sha256": reload_plan.sha256,
        "layers": len(reload_plan.layers),
        "tensors": len(staged.tensors),
        "bytes_read": staged.bytes,
        "read_seconds": round(staged.seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
        "at": time.time(),
    }
    WORKER.config_path, WORKER.config_sha256 = request["anchor"], reload_plan.sha256
    WORKER.reloads = (WORKER.reloads + [record])[-HISTORY:]
    logger.info(
        "mixed_precision reload: %d layer(s), %d tensor(s), %.1f MiB in %.2fs",
        record["layers"],
        record["tensors"],
        staged.bytes / 2**20,
        record["seconds"],
    )
    return {"success": True, **record}


def read_worker_request(model_path: str) -> dict | None:
    """The reload request in ``model_path`` (None when it is an ordinary update_weights_from_disk)."""
    marker = Path(model_path) / RELOAD_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))


def _encode_reply(reply: dict) -> str:
    # The tokenizer joins several DP ranks' messages with " | ": keep "|" out of the JSON text.
    return json.dumps({REPLY_KEY: reply}).replace("|", "\\u007c")


def around_update_weights_from_disk(original, worker, recv_req, *args, **kwargs):
    """AROUND hook of ``TpModelWorker.update_weights_from_disk``: mixed reload requests run
    :func:`execute_reload`; every other request goes to SGLang unchanged."""
    try:
        request = read_worker_request(recv_req.model_path)
    except (OSError, ValueError) as e:
        return False, _encode_reply(
            {"success": False, "stage": "stage", "applied": False, "failures": [{"rank": 0, "error": error_json(e)}]}
        )
    if request is None:
        return original(worker, recv_req, *args, **kwargs)
    from .loader import mixed_config_of

    model = worker.model_runner.model
    reply = execute_reload(model, mixed_config_of(model), request, agree=tp_agree)
    return reply["success"], _encode_reply(reply)


def worker_info(scheduler) -> dict:
    """This rank's view: method class, parameter shapes and bytes of every planned layer; load stats."""
    from .loader import mixed_config_of

    runner = scheduler.tp_worker.model_runner
    model = runner.model
    config = mixed_config_of(model)
    layers = {}
    for prefix in config.plan.groups:
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        params = {
            n: {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")}
            for n, p in module.named_parameters(recurse=False)
        }
        layers[prefix] = {
            "method": config.methods.get(prefix, type(getattr(module, "quant_method", None)).__name__),
            "params": params,
            "bytes": sum(p.numel() * p.element_size() for p in module.parameters(recurse=False)),
        }
    stream = getattr(getattr(runner, "loader", None), "stream", None)
    load = None
    if stream is not None:
        load = {
            "bytes_read": dict(stream.bytes_read),
            "seconds": {k: round(v, 3) for k, v in stream.seconds.items()},
            "files": {k: len(v) for k, v in stream.files_opened.items()},
        }
    return {
        "tp_rank": getattr(scheduler, "tp_rank", 0),
        "tp_size": getattr(scheduler, "tp_size", 1),
        "config_path": WORKER.config_path or config.settings.config_path,
        "config_sha256": WORKER.config_sha256,
        "layers": layers,
        "load": load,
        "reloads": list(WORKER.reloads),
    }


def after_get_internal_state(result, scheduler, *args, **kwargs):
    """AFTER hook of ``Scheduler.get_internal_state``: adds this rank's mixed-precision info."""
    try:
        result.internal_state[INFO_KEY] = worker_info(scheduler)
    except MixedPrecisionError as e:  # not a mixed model: say so rather than nothing
        result.internal_state[INFO_KEY] = {"error": error_json(e)}
    return result


# =================================================================================================
# Main process: active state, reload orchestration
# =================================================================================================
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
                fix="the plugin's runtime hooks are not installed in the scheduler processes; check that "
                "sglang_mixed_precision.serving.plugin.register() calls runtime.install()",
            ) from None
    failed = [r for r in replies if not r.get("success")]
    merged = failed[0] if failed else replies[0]
    return {**merged, "success": success and not failed}


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
            (Path(request_dir) / RELOAD_MARKER).write_text(json.dumps(reload_plan.worker_request(self.active.skeleton)))
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


# ---- /info ------------------------------------------------------------------------------------------
def tp_split(plan, assignment) -> str:
    """How SGLang splits a module over TP ranks: column, row, vocab or replicated."""
    from ..core.naming import Role

    if plan.tp_size == 1:
        return "none (tp_size 1)"
    rank_shape = plan.geometry.rank_shape(assignment.ref.role, assignment.ref.group.rsplit(".", 1)[-1], plan.tp_size)
    if rank_shape is not None:
        return "column" if rank_shape.column_split else "row"
    if assignment.ref.role in (Role.EMBEDDING, Role.LM_HEAD):
        return "vocab"
    return "replicated"


def build_info(active: ActiveMix, plan, worker: dict | None, worker_error: dict | None = None) -> dict:
    from ..core.report import summary

    layers = (worker or {}).get("layers", {})
    modules = {}
    for name, a in plan.modules.items():
        layer = layers.get(a.ref.group, {})
        modules[name] = {
            "label": a.label,
            "path": str(plan.sources[a.label].path),
            "scheme": a.scheme.label(),
            "layer": a.ref.group,
            "method": layer.get("method"),
            "bytes": a.nbytes,
            "rank_bytes": int(round(a.nbytes * plan.geometry.rank_fraction(a.ref, plan.tp_size))),
            "tp_split": tp_split(plan, a),
            "rule": a.rule,
        }
    totals = summary(plan)
    return {
        "config": {"path": str(active.config_path), "sha256": active.sha256, "origin": active.origin},
        "tp_size": plan.tp_size,
        "sources": {label: {"path": str(s.path), "scheme": s.scheme.label()} for label, s in plan.sources.items()},
        "modules": modules,
        "layers": {
            prefix: {
                "label": g.label,
                "scheme": g.scheme.label(),
                "members": len(g.members),
                **({"rank0": layers[prefix]} if prefix in layers else {}),
            }
            for prefix, g in plan.groups.items()
        },
        "totals": {"by_precision": totals["by_precision"], "per_rank": totals["per_rank"], "total": totals["total"]},
        "load": (worker or {}).get("load"),
        "reloads": active.reloads,
        "worker": None
        if worker is None
        else {k: worker.get(k) for k in ("tp_rank", "tp_size", "config_path", "config_sha256")},
        **({"worker_error": worker_error} if worker_error else {}),
        **({"worker_error": worker["error"]} if worker and "error" in worker else {}),
    }


# ---- managed restart ---------------------------------------------------------------------------------
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


# =================================================================================================
# Wiring: routes, Engine methods, hooks
# =================================================================================================
_RUNTIMES: dict[int, MixedPrecisionRuntime] = {}


def runtime_for(tokenizer_manager) -> MixedPrecisionRuntime:
    """The runtime of a server / Engine (one per tokenizer manager, built on first use)."""
    key = id(tokenizer_manager)
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        server_args = tokenizer_manager.server_args
        active = active_mix_from_model_path(server_args.model_path, server_args.tp_size)
        runtime = _RUNTIMES[key] = MixedPrecisionRuntime(active, TokenizerManagerBackend(tokenizer_manager))
    return runtime


def add_routes(app, get_runtime: Callable[[], MixedPrecisionRuntime]) -> None:
    """Add the three routes to a FastAPI app (idempotent)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    if any(getattr(r, "path", None) == "/mixed_precision/info" for r in app.router.routes):
        return

    def _runtime_or_error():
        try:
            return get_runtime(), None
        except Exception as e:
            return None, JSONResponse({"success": False, "error": error_json(e)}, status_code=status_of(e))

    async def info():
        runtime, error = _runtime_or_error()
        return error or JSONResponse(await runtime.info())

    async def config():
        runtime, error = _runtime_or_error()
        return error or PlainTextResponse(runtime.config_text(), media_type="application/yaml")

    async def reload(request: Request):
        runtime, error = _runtime_or_error()
        if error:
            return error
        try:
            body = await request.json()
        except ValueError as e:
            bad = MixedPrecisionError(
                ErrorCode.RELOAD_BAD_REQUEST,
                f"the body is not JSON ({e})",
                fix='send {"config": "<yaml>"} or {"config_path": "<file>"}',
            )
            return JSONResponse({"success": False, "error": error_json(bad)}, status_code=400)
        status, payload = await runtime.reload(body)
        return JSONResponse(payload, status_code=status)

    # This module postpones annotations; FastAPI must see the real Request class to inject it.
    reload.__annotations__ = {"request": Request}
    from sglang.srt.utils.auth import AuthLevel, auth_level

    reload = auth_level(AuthLevel.ADMIN_OPTIONAL)(reload)  # same protection as /update_weights_from_disk
    app.add_api_route("/mixed_precision/info", info, methods=["GET"])
    app.add_api_route("/mixed_precision/config", config, methods=["GET"])
    app.add_api_route("/mixed_precision/reload", reload, methods=["POST"])


def _server_runtime() -> MixedPrecisionRuntime:
    from sglang.srt.entrypoints import http_server

    state = http_server.get_global_state()
    if state is None or state.tokenizer_manager is None:
        raise MixedPrecisionError(ErrorCode.NOT_READY, "the server is still starting", fix="retry once /health answers")
    return runtime_for(state.tokenizer_manager)


# ---- Engine-level methods ------------------------------------------------------------------------------
def mixed_precision_info(engine) -> dict:
    """``GET /mixed_precision/info`` for an in-process ``sglang.Engine``."""
    return engine.loop.run_until_complete(runtime_for(engine.tokenizer_manager).info())


def mixed_precision_config(engine) -> str:
    return runtime_for(engine.tokenizer_manager).config_text()


def reload_mixed_precision(
    engine, config: str | None = None, config_path: str | None = None, *, restart: bool = False, dry_run: bool = False
) -> tuple[int, dict]:
    """``POST /mixed_precision/reload`` for an in-process ``sglang.Engine``: (HTTP-like status, reply)."""
    body = {k: v for k, v in (("config", config), ("config_path", config_path)) if v is not None}
    body.update(restart=restart, dry_run=dry_run)
    return engine.loop.run_until_complete(runtime_for(engine.tokenizer_manager).reload(body))


def _attach_engine_methods() -> None:
    from sglang.srt.entrypoints.engine import Engine

    Engine.mixed_precision_info = mixed_precision_info
    Engine.mixed_precision_config = mixed_precision_config
    Engine.reload_mixed_precision = reload_mixed_precision


# ---- install ------------------------------------------------------------------------------------------
def register_worker_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookType

    from .plugin import register_hook_once

    register_hook_once(WORKER_TARGET, around_update_weights_from_disk, HookType.AROUND)
    register_hook_once(INTERNAL_STATE_TARGET, after_get_internal_state, HookType.AFTER)


def install() -> None:
    """Run by the plugin's ``register()`` in every SGLang process (idempotent).

    Workers (spawned scheduler processes) get the reload / info hooks; the main process also gets
    the HTTP routes on SGLang's app (added before uvicorn starts: SGLang loads plugins first) and
    the Engine methods.
    """
    register_worker_hooks()
    if multiprocessing.parent_process() is not None:
        return  # a spawned SGLang subprocess: no HTTP server here
    from sglang.srt.entrypoints import http_server

    add_routes(http_server.app, _server_runtime)
    _attach_engine_methods()
