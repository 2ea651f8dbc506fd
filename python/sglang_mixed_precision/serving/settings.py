"""What a plan directory's ``quantization_config`` carries (no SGLang import: the launcher uses it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ErrorCode, MixedPrecisionError
from . import QUANT_METHOD
from .methods import INT4_MOE_CHOICES

INT4_MOE_KERNELS = INT4_MOE_CHOICES
# `auto`: GPTQ-Marlin MoE (group scales held in the model dtype) wherever the experts' per-rank shapes
# allow, SGLang's Triton W4A16 method elsewhere. Measured on an H200 (bench/results/bench_mix_h200_run1):
# Marlin decodes 1.3-1.8x the bf16 model at batch 8-64 where W4A16 reached 0.5x; both kernels pass the
# GPU serve tests against the reference (test/gpu).
DEFAULT_INT4_MOE_KERNEL = "auto"


@dataclass(frozen=True)
class PlanSettings:
    """What ``quantization_config`` carries so that every process rebuilds the same plan."""

    config_path: str
    tp_size: int = 1
    skeleton: str | None = None  # source label giving the model (launcher's --model-path)
    int4_moe_kernel: str = DEFAULT_INT4_MOE_KERNEL

    def to_quantization_config(self) -> dict:
        out = {
            "quant_method": QUANT_METHOD,
            "config_path": self.config_path,
            "tp_size": self.tp_size,
            "int4_moe_kernel": self.int4_moe_kernel,
        }
        if self.skeleton:
            out["skeleton"] = self.skeleton
        return out

    @classmethod
    def from_quantization_config(cls, qc: dict) -> PlanSettings:
        where = "config.json quantization_config"
        path = qc.get("config_path")
        if not path:
            raise MixedPrecisionError(
                ErrorCode.PLAN_DIR_INVALID,
                "quant_method mixed_precision needs 'config_path' (the mixed YAML)",
                where=where,
                fix="write the model directory with `sglang-mp plandir --config C --output D`",
            )
        kernel = str(qc.get("int4_moe_kernel", DEFAULT_INT4_MOE_KERNEL))
        if kernel not in INT4_MOE_KERNELS:
            raise MixedPrecisionError(
                ErrorCode.PLAN_DIR_INVALID,
                f"int4_moe_kernel {kernel!r} is not one of {INT4_MOE_KERNELS}",
                where=where,
                fix=f"use one of {INT4_MOE_KERNELS} (default {DEFAULT_INT4_MOE_KERNEL!r})",
            )
        return cls(str(path), int(qc.get("tp_size", 1)), qc.get("skeleton"), kernel)
