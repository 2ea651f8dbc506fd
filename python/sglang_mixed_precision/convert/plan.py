"""What the converter does to each tensor: quantize, keep 16-bit, or skip — decided before writing.

Every problem with the input (shapes that cannot be packed, unknown 3-D expert tensors) is found
here, all at once, before the first byte is written.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from functools import cached_property

from ..core.errors import ErrorCode, MixedPrecisionError, raise_all
from ..core.naming import Role, classify, split_tensor_name
from ..core.sources import TensorInfo
from .gptq_pack import check_gptq_shape
from .model_dir import InputModel


@dataclass
class Unit:
    """Tensors processed together: one decoder layer, or everything outside the layers."""

    layer: int | None
    tensors: list[str] = field(default_factory=list)
    quantized_modules: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "non-layer tensors" if self.layer is None else f"layer {self.layer}"

    @cached_property
    def quantized_weights(self) -> frozenset[str]:
        """The 16-bit weights this unit quantizes (read once the plan is built)."""
        return frozenset(f"{m}.weight" for m in self.quantized_modules)


@dataclass
class ConversionPlan:
    units: list[Unit]
    quantized: dict[str, TensorInfo]  # module name -> its 16-bit weight
    kept: list[str]  # module names left 16-bit in fp8/ and int4/
    skipped_groups: list[str]  # SGLang layer prefixes left 16-bit because of --skip
    fp8_block: tuple[int, int] | None
    group_size: int | None


def _skipped_groups(modules: list[str], patterns: list[str]) -> set[str]:
    """Groups (SGLang fused layers) with at least one member matching a --skip pattern.

    SGLang builds q/k/v, gate/up and all experts of a layer into one layer that has one scheme,
    so skipping one member leaves its whole group 16-bit.
    """
    groups = set()
    for m in modules:
        if any(_matches(m, p) for p in patterns):
            groups.add(classify(m).group)
    return groups


def _matches(module: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module + ".weight", pattern)


def unmatched_skips(modules: list[str], patterns: list[str]) -> list[MixedPrecisionError]:
    """A --skip that matches no linear module is a typo that would quietly quantize what it meant to keep."""
    return [
        MixedPrecisionError(
            ErrorCode.BAD_ARGUMENT,
            f"--skip {p!r} matches no linear module of the model",
            where="--skip",
            fix="use the checkpoint's module names or globs over them, e.g. 'model.layers.0.self_attn.q_proj' or "
            "'model.layers.*.mlp.experts.*' (`sglang-mp analyze` lists the modules)",
        )
        for p in patterns
        if not any(_matches(m, p) for m in modules)
    ]


def build_plan(
    model: InputModel, *, skip: list[str], group_size: int | None, fp8_block: tuple[int, int] | None
) -> ConversionPlan:
    """Classify every tensor and validate every quantized weight's shape for the chosen formats."""
    errors: list[MixedPrecisionError] = []
    candidates: dict[str, TensorInfo] = {}
    for name, meta in model.tensors.items():
        module, suffix = split_tensor_name(name)
        ref = classify(module)
        if ref.role.quantizable and suffix == "weight":
            if len(meta.shape) != 2:
                errors.append(
                    MixedPrecisionError(
                        ErrorCode.UNSUPPORTED_TENSOR,
                        f"{name} is a {len(meta.shape)}-D linear weight {list(meta.shape)}",
                        where=f"{meta.file}:{name}",
                        fix="save the model with one 2-D weight per expert/projection (transformers' per-expert layout)",
                    )
                )
                continue
            candidates[module] = meta
        elif ref.role is Role.OTHER and len(meta.shape) >= 2 and ".experts." in name:
            errors.append(
                MixedPrecisionError(
                    ErrorCode.UNSUPPORTED_TENSOR,
                    f"{name}: fused expert tensor the converter does not know how to split",
                    where=f"{meta.file}:{name}",
                    fix="save the model with per-expert gate_proj/up_proj/down_proj weights",
                )
            )

    errors += unmatched_skips(list(candidates), skip)
    skipped = _skipped_groups(list(candidates), skip)
    quantized = {m: t for m, t in candidates.items() if classify(m).group not in skipped}

    if group_size is not None:
        for module, meta in quantized.items():
            n, k = meta.shape
            why = check_gptq_shape(f"{module}.weight", n, k, group_size)
            if why:
                errors.append(
                    MixedPrecisionError(
                        ErrorCode.SHAPE_NOT_DIVISIBLE,
                        why,
                        where=f"{meta.file}:{module}.weight",
                        fix=f"pick --group_size that divides {k} (32, 64, 128 or -1 for one group per row), "
                        f"or leave it 16-bit with --skip '{module}'",
                    )
                )
    if errors:
        raise_all(errors)

    units: dict[int | None, Unit] = {}
    for name in model.tensors:
        module, _ = split_tensor_name(name)
        ref = classify(module)
        unit = units.setdefault(ref.layer, Unit(ref.layer))
        unit.tensors.append(name)
        if module in quantized and name.endswith(".weight"):
            unit.quantized_modules.append(module)
    ordered = [units[k] for k in sorted(k for k in units if k is not None)]
    if None in units:
        ordered.insert(0, units[None])
    kept = sorted({split_tensor_name(n)[0] for n in model.tensors} - set(quantized))
    return ConversionPlan(ordered, quantized, kept, sorted(skipped), fp8_block, group_size)
