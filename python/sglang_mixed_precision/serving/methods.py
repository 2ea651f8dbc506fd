"""Which SGLang method runs which layer: one table per layer kind, keyed by the scheme's format.

SGLang builds every linear (``LinearBase``), fused MoE (``FusedMoE``) and vocabulary embedding
(``VocabParallelEmbedding``) with a method object from its quantization config. For a mixed plan the
answer is the method SGLang would pick when serving the layer's source alone: :data:`LINEAR_METHODS`
and :data:`MOE_METHODS` name the class each format must run, :data:`DELEGATE_CONFIGS` builds the
stock SGLang config of a source (``Fp8Config`` from an fp8 source's own ``quantization_config``,
``GPTQMarlinConfig`` from a GPTQ source's), and int4 experts run one of :data:`INT4_MOE_KERNELS`.

**Int4 experts.** ``marlin`` runs SGLang's GPTQ-Marlin MoE method (the ``moe_wna16_marlin`` CUDA
kernel) with its group scales held in the model's dtype: stock SGLang 0.5.17 allocates them in
fp16 and asserts that activations and scales share a dtype, so a bf16 model could not run it
(:class:`ModelDtypeGPTQMarlinMoEScheme`; the kernel itself is built for bf16 and fp16). ``wna16`` is
SGLang's Triton W4A16 MoE method (no act-order). ``auto`` takes the first of
:data:`INT4_MOE_PREFERENCE` whose rules (core/formats/gptq.py ``MOE_KERNEL_RULES``) accept the
layer's per-rank shapes; the choice is logged and shown in /mixed_precision/info.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.formats import Scheme
from ..core.formats.gptq import MOE_KERNEL_RULES

LINEAR, MOE, EMBEDDING = "linear", "moe", "embedding"

# What `auto` tries first: Marlin's CUDA kernel reads the packed int4 weights once and dequantizes in
# registers; SGLang's Triton method dequantizes in fp32 with untuned tiles on Hopper (no int4 config
# ships for H100 / H200). To be confirmed by bench/gpu_bench_mix.py on the GPU.
INT4_MOE_PREFERENCE = ("marlin", "wna16")
AUTO = "auto"


def layer_kind(layer) -> str | None:
    """LINEAR, MOE, EMBEDDING for the layers SGLang asks a method for, None for anything else."""
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


# ---- int4 MoE kernels ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int4MoeKernel:
    name: str
    method_class: Callable[[], type]  # the SGLang method class the layer must end up with (imported lazily)
    config: Callable[[dict], object]  # quantization_config -> the SGLang config that builds that method


def _marlin_method():
    from sglang.srt.layers.quantization.gptq import GPTQMarlinMoEMethod

    return GPTQMarlinMoEMethod


def _marlin_config(qc: dict):
    return _model_dtype_marlin_config_class().from_config(qc)


def _wna16_method():
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Method

    return MoeWNA16Method


def _wna16_config(qc: dict):
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config

    return MoeWNA16Config.from_config({**qc, "quant_method": "gptq"})


INT4_MOE_KERNELS = {
    "marlin": Int4MoeKernel("marlin", _marlin_method, _marlin_config),
    "wna16": Int4MoeKernel("wna16", _wna16_method, _wna16_config),
}
INT4_MOE_CHOICES = (AUTO, *INT4_MOE_KERNELS)
INT4_KERNEL_FORMATS = ("gptq",)  # formats whose experts run one of INT4_MOE_KERNELS


def resolve_int4_moe_kernel(requested: str, scheme: Scheme, rank_shape, where: str) -> str:
    """The kernel that runs these int4 experts: ``requested`` if its rules accept the shapes, or for
    ``auto`` the first of :data:`INT4_MOE_PREFERENCE` that does. Raises naming the layer otherwise."""
    names = INT4_MOE_PREFERENCE if requested == AUTO else (requested,)
    reasons = {}
    for name in names:
        problems = MOE_KERNEL_RULES[name](scheme, rank_shape)
        if not problems:
            return name
        reasons[name] = "; ".join(problems)
    raise MixedPrecisionError(
        ErrorCode.TP_INDIVISIBLE,
        f"int4 MoE kernel {requested}: " + " | ".join(f"{k}: {v}" for k, v in reasons.items()),
        where=where,
        fix="use --int4-moe-kernel auto, another --tp-size, or map these experts to another precision",
    )


def runs_int4_moe_kernel(group) -> bool:
    """Whether a plan group is routed experts stored in a format that runs an int4 MoE kernel."""
    return group.scheme.kind in INT4_KERNEL_FORMATS and group.role.value == "routed_expert"


def int4_moe_kernels(plan, requested: str) -> dict[str, str]:
    """{experts prefix: kernel} for every int4 experts group of ``plan``; raises before launch, naming
    the layer, when ``requested`` cannot run one of them."""
    out = {}
    for prefix, group in plan.groups.items():
        if runs_int4_moe_kernel(group):
            rank_shape = plan.geometry.rank_shape(group.role, "experts", plan.tp_size)
            out[prefix] = resolve_int4_moe_kernel(requested, group.scheme, rank_shape, where=prefix)
    return out


def shared_fp8_linear_source(plan) -> str | None:
    """The source label of the plan's FP8 linears (not routed experts) when they are all of one FP8
    scheme; None when there are none, or several schemes."""
    found = {
        (g.scheme, g.labels[0])
        for g in plan.groups.values()
        if g.scheme.kind == "fp8" and g.role.value != "routed_expert"
    }
    schemes = {scheme for scheme, _ in found}
    return sorted(label for _, label in found)[0] if len(schemes) == 1 else None


_MARLIN_CONFIG_CLASS = None


def _model_dtype_marlin_config_class():
    """``GPTQMarlinConfig`` whose MoE scheme holds group scales in the layer's dtype (built once, lazily:
    the classes derive from SGLang's, which import CUDA kernels modules)."""
    global _MARLIN_CONFIG_CLASS
    if _MARLIN_CONFIG_CLASS is None:
        import torch
        from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig
        from sglang.srt.layers.quantization.gptq.schemes import GPTQMarlinMoEScheme

        class ModelDtypeGPTQMarlinMoEScheme(GPTQMarlinMoEScheme):
            """GPTQ-Marlin MoE with its group scales in the layer's dtype: the Marlin MoE kernel is built
            per activation dtype and reads scales of that dtype (fp16 checkpoint scales are converted as
            they load; bf16 keeps their 8 exponent bits, the same rounding the Triton method applies)."""

            def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition,
                               params_dtype, **kwargs):  # fmt: skip
                super().create_weights(
                    layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **kwargs
                )
                for name in ("w13_scales", "w2_scales"):
                    param = getattr(layer, name)
                    if param.dtype != params_dtype:
                        # retype in place: the Parameter keeps its weight_loader and attributes
                        param.data = torch.empty_like(param.data, dtype=params_dtype)

        class ModelDtypeGPTQMarlinConfig(GPTQMarlinConfig):
            def get_moe_scheme(self, layer):
                return ModelDtypeGPTQMarlinMoEScheme(self)

        _MARLIN_CONFIG_CLASS = ModelDtypeGPTQMarlinConfig
    return _MARLIN_CONFIG_CLASS


# ---- the tables ----------------------------------------------------------------------------------
@functools.cache
def method_tables() -> dict[str, dict[str, type]]:
    """{layer kind: {format kind: SGLang method class}}; int4 experts: see :data:`INT4_MOE_KERNELS`.
    Built on first use: SGLang's quantization modules import its CUDA kernel wrappers."""
    from sglang.srt.layers.quantization.fp8 import Fp8LinearMethod, Fp8MoEMethod
    from sglang.srt.layers.quantization.gptq import GPTQMarlinLinearMethod
    from sglang.srt.layers.quantization.unquant import (
        UnquantizedEmbeddingMethod,
        UnquantizedFusedMoEMethod,
        UnquantizedLinearMethod,
    )

    return {
        LINEAR: {"unquantized": UnquantizedLinearMethod, "fp8": Fp8LinearMethod, "gptq": GPTQMarlinLinearMethod},
        MOE: {"unquantized": UnquantizedFusedMoEMethod, "fp8": Fp8MoEMethod},
        EMBEDDING: {"unquantized": UnquantizedEmbeddingMethod},
    }


def method_class(kind: str, scheme: Scheme, int4_kernel: str | None = None, *, where: str | None = None) -> type:
    """The SGLang method class a layer of ``kind`` stored as ``scheme`` must run (``int4_kernel``: the
    resolved kernel of int4 experts)."""
    if kind == MOE and int4_kernel is not None and scheme.kind in INT4_KERNEL_FORMATS:
        return INT4_MOE_KERNELS[int4_kernel].method_class()
    try:
        return method_tables()[kind][scheme.kind]
    except KeyError:
        raise MixedPrecisionError(
            ErrorCode.UNSUPPORTED_LAYER_SCHEME,
            f"SGLang has no {scheme.label()} method for a {kind} layer",
            where=where,
            fix="keep embeddings and lm_head in a 16-bit source",
        ) from None


# ---- the stock SGLang config of a source, per format ---------------------------------------------
def _fp8_delegate(qc: dict, packed_modules_mapping: dict, int4_kernel: str | None):
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    if str(qc.get("quant_method", "")).lower() != "fp8":
        return None  # compressed-tensors fp8: planned, but not served through the mixed config
    return Fp8Config.from_config({**qc, "packed_modules_mapping": packed_modules_mapping})


def _gptq_delegate(qc: dict, packed_modules_mapping: dict, int4_kernel: str | None):
    from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig

    if int4_kernel is not None:
        return INT4_MOE_KERNELS[int4_kernel].config(qc)
    return GPTQMarlinConfig.from_config(qc)


DELEGATE_CONFIGS = {"fp8": _fp8_delegate, "gptq": _gptq_delegate}


def delegate_config(source, packed_modules_mapping: dict, int4_kernel: str | None = None):
    """The quantization config SGLang would build for ``source`` served alone (``int4_kernel``: for its experts)."""
    factory = DELEGATE_CONFIGS.get(source.scheme.kind)
    config = factory(dict(source.quant_config or {}), packed_modules_mapping, int4_kernel) if factory else None
    if config is None:
        method = (source.quant_config or {}).get("quant_method")
        raise MixedPrecisionError(
            ErrorCode.UNSUPPORTED_SCHEME,
            f"cannot serve a {source.scheme.label()} source with quant_method {method!r}",
            where=f"source {source.label} ({source.path}) quantization_config",
            fix="use an fp8 (quant_method fp8) or GPTQ (quant_method gptq) checkpoint",
        )
    return config
