"""Post-load audit: the model SGLang built and loaded is exactly the plan.

SGLang's ``load_weights`` silently skips names it does not know, and quantized parameters start as
``torch.empty`` (GPTQ buffers) or a fill value (FP8 scales), so a wrong name or a missing tensor
would serve garbage without an error. The audit therefore watches the load itself:
:class:`LoadRecorder` wraps every parameter's ``weight_loader`` and records which checkpoint tensor
fed which parameter (shard, expert). Afterwards :func:`audit_model` checks that

* every layer runs the method class the plan's scheme calls for (:func:`.methods.method_class`);
* every planned tensor was consumed exactly once, by a parameter of its own layer;
* every parameter received all its shards (q/k/v, gate/up, every expert's w1/w3/w2).

Any mismatch fails the load with the full list.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from ..core.architectures import FUSED_QKV_A
from ..core.errors import ErrorCode, MixedPrecisionError, more
from .methods import EMBEDDING, MOE, layer_kind, method_class

logger = logging.getLogger(__name__)

# Parameters a method fills itself in process_weights_after_loading (never from a checkpoint).
DERIVED_PARAMS = ("g_idx_sort_indices",)
MAX_LISTED = 20  # problems listed in the error before "and N more"


@dataclass(frozen=True)
class LoadCall:
    tensor: str | None  # checkpoint tensor being loaded when the call happened
    shard: object = None  # "q"/"k"/"v", 0/1, "w1"/"w2"/"w3"
    expert: int | None = None


# SGLang layers whose load_weights concatenates checkpoint modules itself and hands the parameter's
# weight_loader the joined tensor: layer leaf -> the modules joined (DeepSeek-V3, deepseek_weight_loader.py)
MODEL_CONCATENATED = {FUSED_QKV_A: ("q_a_proj", "kv_a_proj_with_mqa")}


class LoadRecorder:
    """Records every ``weight_loader`` call made while a model loads; ``detach()`` restores them."""

    def __init__(self, model: torch.nn.Module):
        self.calls: dict[str, list[LoadCall]] = defaultdict(list)  # parameter name -> calls
        self.by_tensor: dict[str, list[str]] = defaultdict(list)  # checkpoint tensor -> parameters
        self._current: str | None = None
        self._handed_out: dict[int, tuple[weakref.ref, str]] = {}  # id(tensor) -> (its weak reference, name)
        self._lock = threading.Lock()
        self._restore: list[tuple[torch.nn.Parameter, str, object]] = []
        for name, param in model.named_parameters():
            self._wrap(name, param)

    def track(self, weights):
        """Pass ``(name, tensor)`` pairs through, remembering which tensor is which.

        A loader call is attributed to the checkpoint tensor it was handed (by identity): DeepSeek's
        ``load_weights`` runs the loaders on a thread pool, after later tensors were handed out. Calls
        with a tensor the model built itself are attributed to the modules it concatenated
        (:data:`MODEL_CONCATENATED`), else to the tensor last handed out (models that load in order).
        """
        for name, tensor in weights:
            self._current = name
            self._remember(tensor, name)
            yield name, tensor
        self._current = None

    def _remember(self, tensor, name: str) -> None:
        key = id(tensor)

        def forget(_ref, key=key):
            with self._lock:
                entry = self._handed_out.get(key)
                if entry is not None and entry[0]() is None:
                    del self._handed_out[key]

        with self._lock:
            self._handed_out[key] = (weakref.ref(tensor, forget), name)

    def _tensors_for(self, param_name: str, loaded_weight) -> list[str]:
        with self._lock:
            entry = self._handed_out.get(id(loaded_weight))
        if entry is not None and entry[0]() is loaded_weight:
            return [entry[1]]
        module, _, suffix = param_name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf in MODEL_CONCATENATED:
            return [f"{parent}.{member}.{suffix}" for member in MODEL_CONCATENATED[leaf]]
        return [self._current] if self._current is not None else []

    def detach(self) -> None:
        for param, attr, original in reversed(self._restore):
            if original is None:
                delattr(param, attr)
            else:
                setattr(param, attr, original)
        self._restore.clear()

    def _wrap(self, name: str, param: torch.nn.Parameter) -> None:
        from sglang.srt.layers.parameter import BasevLLMParameter
        from sglang.srt.model_loader.weight_utils import default_weight_loader

        # vLLM-style parameters expose weight_loader as a read-only property over _weight_loader.
        attr = "_weight_loader" if isinstance(param, BasevLLMParameter) else "weight_loader"
        original = getattr(param, attr, None)
        loader = original or default_weight_loader  # what models fall back to for plain parameters

        def recording_loader(p, loaded_weight, *args, **kwargs):
            self._record(name, self._tensors_for(name, loaded_weight), args, kwargs)
            return loader(p, loaded_weight, *args, **kwargs)

        setattr(param, attr, recording_loader)
        self._restore.append((param, attr, original))

    def _record(self, param_name: str, tensors: list[str], args: tuple, kwargs: dict) -> None:
        if "expert_id" in kwargs or len(args) >= 3:  # FusedMoE: (weight_name, shard_id, expert_id)
            shard = kwargs.get("shard_id", args[1] if len(args) > 1 else None)
            expert = kwargs.get("expert_id", args[2] if len(args) > 2 else None)
        else:  # linears: (loaded_shard_id,)
            shard = kwargs.get("loaded_shard_id", kwargs.get("shard_id", args[0] if args else None))
            expert = None
        with self._lock:
            for tensor in tensors or [None]:
                self.calls[param_name].append(LoadCall(tensor, shard, None if expert is None else int(expert)))
            for tensor in tensors:
                self.by_tensor[tensor].append(param_name)


@dataclass
class AuditReport:
    problems: list[str] = field(default_factory=list)
    layers: Counter = field(default_factory=Counter)  # method class name -> layers
    tensors: int = 0
    parameters: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        methods = ", ".join(f"{n} {name}" for name, n in sorted(self.layers.items()))
        return f"mixed_precision audit: {self.tensors} tensors consumed once, {self.parameters} parameters loaded; layers: {methods}"

    def raise_if_failed(self, where: str | None = None) -> None:
        if self.ok:
            return
        listed = more(self.problems, limit=MAX_LISTED, sep="\n  - ")
        message = f"the loaded model does not match the plan ({len(self.problems)} problem(s)):\n  - {listed}"
        raise MixedPrecisionError(
            ErrorCode.LOAD_AUDIT_FAILED,
            message,
            where=where,
            fix="the plan and the model disagree: check the sources match the skeleton's architecture "
            "and that the tensor names are the model's (see the list above)",
        )


def audit_model(model: torch.nn.Module, config, recorder: LoadRecorder, yielded: Counter) -> AuditReport:
    """Compare the loaded ``model`` with the plan of its MixedPrecisionConfig ``config`` (``yielded``:
    how often the stream gave each tensor)."""
    plan = config.plan
    report = AuditReport()
    _audit_methods(model, config, report)
    _audit_tensors(plan, recorder, yielded, report)
    _audit_parameters(model, recorder, report)
    return report


def _audit_methods(model, config, report: AuditReport) -> None:
    plan = config.plan
    modules = dict(model.named_modules())
    for prefix, group in plan.groups.items():
        module = modules.get(prefix)
        if module is None:
            report.problems.append(
                f"planned layer {prefix} ({group.scheme.label()} from {group.label!r}) does not exist in the model"
            )
            continue
        kind = layer_kind(module)
        if kind is None:  # norms: plain parameters, no method
            continue
        expected = method_class(kind, group.scheme, config.int4_moe_kernel(group) if kind == MOE else None)
        actual = type(getattr(module, "quant_method", None))
        if actual is not expected:
            report.problems.append(
                f"layer {prefix} runs {actual.__name__} but the plan ({group.scheme.label()} from "
                f"{group.label!r}) needs {expected.__name__}"
            )
        else:
            report.layers[expected.__name__] += 1
    for name, module in modules.items():
        kind = layer_kind(module)
        if kind is not None and kind != EMBEDDING and plan.group_for_prefix(name) is None:
            report.problems.append(f"layer {name} ({type(module).__name__}) is in the model but not in the plan")


def _audit_tensors(plan, recorder: LoadRecorder, yielded: Counter, report: AuditReport) -> None:
    planned = set()
    for assignment in plan.modules.values():
        label, group = assignment.label, assignment.ref.group
        for info in assignment.tensors.values():
            planned.add(info.name)
            times = yielded.get(info.name, 0)
            params = recorder.by_tensor.get(info.name, [])
            if times != 1:
                report.problems.append(f"tensor {info.name} of source {label!r} was read {times} times (expected once)")
                continue
            if not params:
                report.problems.append(
                    f"tensor {info.name} of source {label!r} was read but the model consumed it nowhere "
                    "(SGLang's load_weights skipped its name)"
                )
                continue
            if len(params) > 1:
                report.problems.append(
                    f"tensor {info.name} of source {label!r} was consumed {len(params)} times ({', '.join(params)})"
                )
                continue
            if not params[0].startswith(group + "."):
                report.problems.append(f"tensor {info.name} was loaded into {params[0]}, outside its layer {group}")
                continue
            report.tensors += 1
    for name in sorted(set(yielded) - planned):
        report.problems.append(f"tensor {name} was read but is not in the plan")


def _audit_parameters(model, recorder: LoadRecorder, report: AuditReport) -> None:
    for name, param in model.named_parameters():
        if param.numel() == 0 or name.rsplit(".", 1)[-1].endswith(DERIVED_PARAMS):
            continue
        calls = recorder.calls.get(name, [])
        if not calls:
            report.problems.append(
                f"parameter {name} {tuple(param.shape)} {param.dtype} was never loaded (left uninitialised)"
            )
            continue
        missing = _missing_shards(model, name, calls)
        if missing:
            report.problems.append(f"parameter {name} lacks {_describe(missing)}")
            continue
        report.parameters += 1


def _missing_shards(model, param_name: str, calls: list[LoadCall]) -> list:
    """Which (shard, expert) keys a fused parameter should have received and did not."""
    from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    module = model.get_submodule(param_name.rpartition(".")[0])
    leaf = param_name.rpartition(".")[2]
    got = {(c.shard, c.expert) for c in calls}
    if isinstance(module, QKVParallelLinear):
        want = {(s, None) for s in ("q", "k", "v")}
    elif isinstance(module, MergedColumnParallelLinear):
        want = {(i, None) for i in range(len(module.output_sizes))}
    elif layer_kind(module) == MOE:
        shards = ("w1", "w3") if leaf.startswith("w13") else ("w2",)
        want = {(s, e) for e in range(module.num_experts) for s in shards}
    else:
        return []
    return sorted(want - got, key=str)


def _describe(missing: list) -> str:
    shown = ", ".join(f"{s}" if e is None else f"expert {e} {s}" for s, e in missing[:6])
    return f"{len(missing)} shard(s): {shown}" + (" ..." if len(missing) > 6 else "")
