"""Reload in a scheduler process (one per TP rank): stage, agree across ranks, apply.

:func:`execute_reload` re-plans from headers, reads and checks every new tensor into host memory,
agrees across TP ranks, and only then copies into the live parameters of the changed layers, with a
host snapshot to restore if anything fails on any rank. The old weights keep serving on failure.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ErrorCode, MixedPrecisionError, error_json
from ..core.reload_plan import ReloadPlan, replan_in_worker
from ..tensors import TensorReader
from .messages import HISTORY

logger = logging.getLogger(__name__)

FLOAT_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")


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
