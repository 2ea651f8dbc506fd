"""``MixedPrecisionConfig``: SGLang's quantization config for a mixed plan.

SGLang asks its quantization config for one method object per layer (``get_quant_method(layer,
prefix)``). This config answers from the plan: the layer's group says which source it comes from and
how that source stores it, and the answer is the very method SGLang would pick when serving that
source alone — ``Fp8Config`` built from the fp8 source's own ``quantization_config`` (W8A8 block
kernels), ``GPTQMarlinConfig`` built from the gptq source's (GPTQ-Marlin), SGLang's unquantized
linear / MoE methods for 16-bit layers; embeddings, lm_head and attention get ``None`` (SGLang's
unquantized defaults).

**Int4 experts run SGLang's Triton W4A16 MoE method (``MoeWNA16Method``) by default.** SGLang
0.5.17's GPTQ-Marlin MoE scheme allocates its scales in fp16 and asserts that the activations have
the scales' dtype, so it cannot run inside a bf16 model (a stock bf16 GPTQ Qwen3-MoE fails on its
first request; WNA16 keeps the scales in the model dtype). WNA16 also needs no nvcc build. Its limit:
no act-order (``desc_act``) experts. ``int4_moe_kernel: marlin`` selects ``GPTQMarlinMoEMethod``
for fp16 models (``--dtype float16``).

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

from ..core.errors import ErrorCode, MixedPrecisionError
from . import QUANT_METHOD
from .settings import DEFAULT_INT4_MOE_KERNEL, PlanSettings

logger = logging.getLogger(__name__)

LINEAR, MOE, EMBEDDING = "linear", "moe", "embedding"


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


# ---- which SGLang method runs which layer ----------------------------------------------------
def layer_kind(layer: torch.nn.Module) -> str | None:
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
    from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if isinstance(layer, LinearBase):
        return LINEAR
    if isinstance(layer, FusedMoE):
        return MOE
    if isinstance(layer, VocabParallelEmbedding):  # ParallelLMHead included
        return EMBEDDING
    return None


def expected_method_class(
    kind: str, scheme_kind: str, int4_moe_kernel: str = DEFAULT_INT4_MOE_KERNEL, *, where: str | None = None
) -> type:
    """The SGLang method class a layer of ``kind`` stored as ``scheme_kind`` must run (``where``: the layer, for the error)."""
    from sglang.srt.layers.quantization.fp8 import Fp8LinearMethod, Fp8MoEMethod
    from sglang.srt.layers.quantization.gptq import GPTQMarlinLinearMethod, GPTQMarlinMoEMethod
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Method
    from sglang.srt.layers.quantization.unquant import (
        UnquantizedEmbeddingMethod,
        UnquantizedFusedMoEMethod,
        UnquantizedLinearMethod,
    )

    table = {
        (LINEAR, "unquantized"): UnquantizedLinearMethod,
        (LINEAR, "fp8"): Fp8LinearMethod,
        (LINEAR, "gptq"): GPTQMarlinLinearMethod,
        (MOE, "unquantized"): UnquantizedFusedMoEMethod,
        (MOE, "fp8"): Fp8MoEMethod,
        (MOE, "gptq"): GPTQMarlinMoEMethod if int4_moe_kernel == "marlin" else MoeWNA16Method,
        (EMBEDDING, "unquantized"): UnquantizedEmbeddingMethod,
    }
    try:
        return table[(kind, scheme_kind)]
    except KeyError:
        raise MixedPrecisionError(
            ErrorCode.UNSUPPORTED_LAYER_SCHEME,
            f"SGLang has no {scheme_kind} method for a {kind} layer",
            where=where,
            fix="keep embeddings and lm_head in a 16-bit source",
        ) from None


def _delegate_config(source, packed_modules_mapping: dict, int4_moe_kernel: str, for_moe: bool) -> QuantizationConfig:
    """The quantization config SGLang would build for ``source`` served alone."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config

    qc = dict(source.quant_config or {})
    method = str(qc.get("quant_method", "")).lower()
    where = f"source {source.label} ({source.path}) quantization_config"
    if source.scheme.kind == "fp8" and method == "fp8":
        return Fp8Config.from_config({**qc, "packed_modules_mapping": packed_modules_mapping})
    if source.scheme.kind == "gptq" and method in ("gptq", "gptq_marlin"):
        if for_moe and int4_moe_kernel == "wna16":
            return MoeWNA16Config.from_config({**qc, "quant_method": "gptq"})
        return GPTQMarlinConfig.from_config(qc)
    raise MixedPrecisionError(
        ErrorCode.UNSUPPORTED_SCHEME,
        f"cannot serve a {source.scheme.label()} source with quant_method {method!r}",
        where=where,
        fix="use an fp8 (quant_method fp8) or GPTQ (quant_method gptq) checkpoint",
    )


class MixedPrecisionConfig(QuantizationConfig):
    """One SGLang method object per layer, each from the source the plan assigns to that layer."""

    def __init__(self, plan, settings: PlanSettings, packed_modules_mapping: dict | None = None):
        super().__init__()
        self.plan = plan
        self.settings = settings
        self.packed_modules_mapping = dict(packed_modules_mapping or {})
        self._delegates: dict[tuple[str, bool], QuantizationConfig] = {}
        self.methods: dict[str, str] = {}  # layer prefix -> method class SGLang built it with
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
        method = self._method_for(kind, group, layer, prefix)
        expected = expected_method_class(kind, group.scheme.kind, self.settings.int4_moe_kernel)
        if method is not None and type(method) is not expected:
            raise MixedPrecisionError(
                ErrorCode.METHOD_MISMATCH,
                f"layer {prefix!r} is planned as {group.scheme.label()} from source {group.label!r}, but that source's "
                f"quantization_config gives {type(method).__name__} (expected {expected.__name__})",
                where=prefix,
                fix="the source's quantization_config disagrees with its tensors (ignored_layers / modules_to_not_convert / dynamic)",
            )
        self.methods[prefix] = expected.__name__
        return method

    # -- helpers
    def _method_for(self, kind: str, group, layer, prefix: str) -> QuantizeMethodBase | None:
        scheme_kind = group.scheme.kind
        if kind == EMBEDDING:
            if scheme_kind != "unquantized":
                # raises: no quantized embedding method
                expected_method_class(
                    kind, scheme_kind, where=f"{prefix} ({group.scheme.label()} from source {group.label!r})"
                )
            return None
        if scheme_kind == "unquantized":
            return self._unquantized(kind, layer)
        # Members of one group share a scheme; several sources of it share its config.
        return self.delegate(group.labels[0], kind == MOE).get_quant_method(layer, prefix)

    @staticmethod
    def _unquantized(kind: str, layer) -> QuantizeMethodBase:
        from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

        if kind == LINEAR:
            return UnquantizedLinearMethod()
        # Same arguments FusedMoE passes when it has no quantization config.
        return UnquantizedFusedMoEMethod(layer.use_triton_kernels, layer.use_flashinfer_trtllm_moe, layer.use_deep_gemm)

    def delegate(self, label: str, for_moe: bool = False) -> QuantizationConfig:
        """The stock SGLang config of source ``label`` (MoE layers may use another for int4)."""
        source = self.plan.sources[label]
        key = (label, for_moe and source.scheme.kind == "gptq" and self.settings.int4_moe_kernel == "wna16")
        if key not in self._delegates:
            self._delegates[key] = _delegate_config(
                source, self.packed_modules_mapping, self.settings.int4_moe_kernel, key[1]
            )
        return self._delegates[key]

    def _used_delegates(self) -> list[QuantizationConfig]:
        labels = sorted({g.labels[0] for g in self.plan.groups.values() if g.scheme.kind != "unquantized"})
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
