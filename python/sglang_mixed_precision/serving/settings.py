"""What a plan directory's ``quantization_config`` carries (no SGLang import: the launcher uses it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ErrorCode, MixedPrecisionError
from . import QUANT_METHOD
from .methods import INT4_MOE_CHOICES

INT4_MOE_KERNELS = INT4_MOE_CHOICES
# The kernel proven on the GPU (H100 and H200 serve proofs). `auto` (GPTQ-Marlin MoE with model-dtype
# scales when the shapes allow) becomes the default once a GPU run has proven and measured it
# (test/gpu, bench/gpu_bench_mix.py); until then it is chosen explicitly.
DEFAULT_INT4_MOE_KERNEL = "wna16"


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
