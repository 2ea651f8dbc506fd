"""``MixedPrecisionConfig``: SGLang's quantization config for a mixed plan.

SGLang asks its quantization config for one method object per layer (``get_quant_method(layer,
prefix)``). This config answers from the plan: the layer's group says which source it comes from and
how that source stores it, and the answer is the very method SGLang would pick when serving that
source alone: ``Fp8Config`` built from the fp8 source's own ``quantization_config`` (W8A8 block
kernels), ``GPTQMarlinConfig`` built from the gptq source's (GPTQ-Marlin), SGLang's unquantized
linear / MoE methods for 16-bit layers; embeddings, lm_head and attention get ``None`` (SGLang's
unquantized defaults).

Which class runs which layer, and the int4 MoE kernels, are the tables of :mod:`.methods`.

The plan travels inside the model's ``config.json`` (``quantization_config: {quant_method:
mixed_precision, config_path: ..., tp_size: ...}``), so ``from_config`` rebuilds it from safetensors
headers in every SGLang process (scheduler workers are spawned: nothing else reaches them).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..core.architectures import checkpoint_prefix
from ..core.errors import ErrorCode, MixedPrecisionError
from . import QUANT_METHOD
from .methods import (
    EMBEDDING,
    LINEAR,
    MOE,
    delegate_config,
    layer_kind,
    method_class,
    resolve_int4_moe_kernel,
    runs_int4_moe_kernel,
    shared_fp8_linear_source,
)
from .settings import PlanSettings

logger = logging.getLogger(__name__)


# ---- where the plan comes from ---------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _cached_plan(config_path: str, mtime_ns: int, tp_size: int, skeleton: str | None):
    from ..core.config import load_config
    from ..core.plan import build_plan

    return build_plan(load_config(config_path), tp_size=tp_size, skeleton=skeleton)


def load_plan(settings: PlanSettings, tp_size: int | None = None):
    """The plan of ``settings`` for ``tp_size`` ranks (headers only; cached per process)."""
    path = Path(settings.config_path)
    if not path.is_file():
        raise MixedPrecisionError(
            ErrorCode.MISSING_FILE,
            f"mixed-precision config {path} does not exist",
            where="config.json quantization_config.config_path",
            fix="regenerate the plan directory, or restore the YAML at that path",
        )
    return _cached_plan(
        str(path.resolve()), path.stat().st_mtime_ns, int(tp_size or settings.tp_size), settings.skeleton
    )


def runtime_tp_size(default: int) -> int:
    """The tensor-parallel size of this SGLang process (the written one before SGLang's groups exist)."""
    from sglang.srt.distributed.parallel_state import (
        get_tensor_model_parallel_world_size,
        model_parallel_is_initialized,
    )

    return get_tensor_model_parallel_world_size() if model_parallel_is_initialized() else default


class MixedPrecisionConfig(QuantizationConfig):
    """One SGLang method object per layer, each from the source the plan assigns to that layer."""

    def __init__(self, plan, settings: PlanSettings, packed_modules_mapping: dict | None = None):
        super().__init__()
        self.plan = plan
        self.settings = settings
        self.packed_modules_mapping = dict(packed_modules_mapping or {})
        self._delegates: dict[tuple[str, str | None], QuantizationConfig] = {}
        self.methods: dict[str, str] = {}  # layer prefix -> method class SGLang built it with
        self.int4_kernels: dict[str, str] = {}  # experts prefix -> int4 MoE kernel it runs
        from sglang.srt.utils import log_info_on_rank0

        log_info_on_rank0(logger, plan_summary(plan, settings))

    # -- SGLang's QuantizationConfig interface
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.bfloat16, torch.half, torch.float32]
        for cfg in self._used_delegates():
            dtypes = [d for d in dtypes if d in cfg.get_supported_act_dtypes()]
        return dtypes

    def get_min_capability(self) -> int:
        """The GPU must run every scheme of the mix: the highest minimum of the schemes used."""
        return max((cfg.get_min_capability() for cfg in self._used_delegates()), default=0)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    def get_scaled_act_names(self) -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MixedPrecisionConfig:
        from .compat import raise_if_incompatible

        raise_if_incompatible()  # a hook target this SGLang lacks: the server must not start without the hook
        settings = PlanSettings.from_quantization_config(config)
        plan = load_plan(settings, runtime_tp_size(settings.tp_size))
        return cls(plan, settings, config.get("packed_modules_mapping"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant) -> str | None:
        if hf_quant_cfg and str(hf_quant_cfg.get("quant_method", "")).lower() == QUANT_METHOD:
            return QUANT_METHOD
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        kind = layer_kind(layer)
        if kind is None:  # attention (RadixAttention) and anything else: SGLang's unquantized default
            return None
        prefix = checkpoint_prefix(self.plan.geometry.model_type, prefix)
        group = self.plan.group_for_prefix(prefix)
        if group is None:
            if kind == EMBEDDING:
                return None
            raise MixedPrecisionError(
                ErrorCode.LAYER_NOT_PLANNED,
                f"SGLang builds layer {prefix!r} but the plan assigns it no source",
                where=prefix,
                fix="check that the skeleton's config.json matches the sources (same architecture)",
            )
        where = f"{prefix} ({group.scheme.label()} from source {group.label!r})"
        int4_kernel = self.int4_moe_kernel(group) if kind == MOE else None
        expected = method_class(kind, group.scheme, int4_kernel, where=where)
        method = self._method_for(kind, group, layer, prefix, int4_kernel)
        if method is not None and type(method) is not expected:
            raise MixedPrecisionError(
                ErrorCode.METHOD_MISMATCH,
                f"layer {prefix!r} is planned as {group.scheme.label()} from source {group.label!r}, but that "
                f"source's quantization_config gives {type(method).__name__} (expected {expected.__name__})",
                where=prefix,
                fix="the source's quantization_config disagrees with its tensors "
                "(ignored_layers / modules_to_not_convert / dynamic)",
            )
        self.methods[prefix] = expected.__name__ + (f" ({int4_kernel})" if int4_kernel else "")
        return method

    @property
    def linear_fp8_config(self) -> QuantizationConfig | None:
        """The stock FP8 config of the plan's FP8 linears when they share one scheme (None otherwise).

        SGLang's own mixed configs (int4 experts + FP8 linears) expose it, and DeepSeek's
        ``post_load_weights`` reads its ``weight_block_size`` to dequantize every FP8 ``kv_b_proj``
        before splitting it into ``w_kc`` / ``w_vc`` (the plan refuses FP8 linears of two schemes there).
        """
        label = shared_fp8_linear_source(self.plan)
        return self.delegate(label) if label is not None else None

    def int4_moe_kernel(self, group) -> str | None:
        """The kernel of an experts group stored in int4 (None for other schemes), chosen once per group."""
        if not runs_int4_moe_kernel(group):
            return None
        if group.prefix not in self.int4_kernels:
            rank_shape = self.plan.geometry.rank_shape(group.role, "experts", self.plan.tp_size)
            kernel = resolve_int4_moe_kernel(
                self.settings.int4_moe_kernel, group.scheme, rank_shape, where=group.prefix
            )
            if kernel not in self.int4_kernels.values():
                from sglang.srt.utils import log_info_on_rank0

                log_info_on_rank0(
                    logger,
                    f"mixed_precision: int4 experts run the {kernel} MoE kernel "
                    f"(--int4-moe-kernel {self.settings.int4_moe_kernel}; first at {group.prefix})",
                )
            self.int4_kernels[group.prefix] = kernel
        return self.int4_kernels[group.prefix]

    # -- helpers
    def _method_for(self, kind: str, group, layer, prefix: str, int4_kernel: str | None) -> QuantizeMethodBase | None:
        if kind == EMBEDDING:  # SGLang's default (the plan refused quantized embeddings: quantized_vocab)
            return None
        if not group.scheme.quantized:
            return self._unquantized(kind, layer)
        # Members of one group share a scheme; several sources of it share its config.
        return self.delegate(group.labels[0], int4_kernel).get_quant_method(layer, prefix)

    @staticmethod
    def _unquantized(kind: str, layer) -> QuantizeMethodBase:
        from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

        if kind == LINEAR:
            return UnquantizedLinearMethod()
        # Same arguments FusedMoE passes when it has no quantization config.
        return UnquantizedFusedMoEMethod(layer.use_triton_kernels, layer.use_flashinfer_trtllm_moe, layer.use_deep_gemm)

    def delegate(self, label: str, int4_kernel: str | None = None) -> QuantizationConfig:
        """The stock SGLang config of source ``label`` (``int4_kernel``: the one its experts run)."""
        key = (label, int4_kernel)
        if key not in self._delegates:
            self._delegates[key] = delegate_config(self.plan.sources[label], self.packed_modules_mapping, int4_kernel)
        return self._delegates[key]

    def _used_delegates(self) -> list[QuantizationConfig]:
        labels = sorted({g.labels[0] for g in self.plan.groups.values() if g.scheme.quantized})
        return [self.delegate(label) for label in labels]


def plan_summary(plan, settings: PlanSettings | None = None) -> str:
    """One log line per scheme: how many SGLang layers and bytes each source provides."""
    rows: dict[tuple[str, str], list[int]] = {}
    for group in plan.groups.values():  # every module belongs to one group; "a+b" groups included
        row = rows.setdefault((group.label, group.scheme.label()), [0, 0])
        row[0] += 1
        row[1] += sum(plan.modules[m].nbytes for m in group.members)
    parts = [f"{label}={scheme}: {n} layers, {b / 2**20:.1f} MiB" for (label, scheme), (n, b) in sorted(rows.items())]
    head = f"mixed_precision plan (tp={plan.tp_size}" + (
        f", {settings.config_path}, int4 MoE: {settings.int4_moe_kernel})" if settings else ")"
    )
    return head + ": " + "; ".join(parts)
