"""Checkpoint formats: detect a source's scheme from config.json and describe what it stores.

A :class:`Scheme` is what one module is stored as. Each format module (``unquantized``, ``fp8``,
``gptq``) answers three questions for a linear of logical shape ``[N, K]``: which tensors it
stores with which dtype and shape (``expected_tensors``), and which per-rank shapes SGLang's CUDA
kernel for it cannot run (``rank_problems``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ErrorCode, MixedPrecisionError

# safetensors dtype name -> bytes per element
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8_DTYPES = ("F8_E4M3",)
# config.json ``torch_dtype`` / ``dtype`` -> safetensors dtype
HF_DTYPES = {"bfloat16": "BF16", "float16": "F16", "half": "F16", "float32": "F32", "float": "F32"}
_UNQUANTIZED_LABELS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


@dataclass(frozen=True)
class Scheme:
    """How a module's weight is stored (and so which SGLang kernel runs it)."""

    kind: str  # "unquantized" | "fp8" | "gptq"
    dtype: str | None = None  # unquantized: safetensors dtype of the weight
    fp8_block: tuple[int, int] | None = None  # (block_n, block_k), None for channel / tensor scales
    fp8_strategy: str | None = None  # "block" | "channel" | "tensor"
    bits: int | None = None
    group_size: int | None = None  # -1: one group over all of K
    sym: bool | None = None
    desc_act: bool | None = None

    @property
    def quantized(self) -> bool:
        return self.kind != "unquantized"

    def label(self) -> str:
        if self.kind == "unquantized":
            return _UNQUANTIZED_LABELS.get(self.dtype or "", (self.dtype or "16bit").lower())
        if self.kind == "fp8":
            if self.fp8_block:
                bn, bk = self.fp8_block
                return f"fp8-block{bn}" if bn == bk else f"fp8-block{bn}x{bk}"
            return f"fp8-{self.fp8_strategy or 'tensor'}"
        group = "gall" if self.group_size == -1 else f"g{self.group_size}"
        return f"gptq-int{self.bits}-{group}" + ("" if self.sym else "-asym") + ("-act" if self.desc_act else "")

    def to_json(self) -> dict:
        out = {"kind": self.kind, "label": self.label()}
        for key in ("dtype", "fp8_block", "fp8_strategy", "bits", "group_size", "sym", "desc_act"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


def unquantized_scheme(dtype: str) -> Scheme:
    return Scheme("unquantized", dtype=dtype)


class TensorSpec(NamedTuple):
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    optional: bool = False


def _format(kind: str):
    from . import fp8, gptq
    from . import unquantized as unq

    return {"unquantized": unq, "fp8": fp8, "gptq": gptq}[kind]


def expected_tensors(scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    """Tensors a linear of logical shape [N, K] stores under ``scheme`` (suffix -> spec)."""
    return _format(scheme.kind).expected_tensors(scheme, n, k)


def rank_problems(scheme: Scheme, rank_shape) -> list[str]:
    """Why SGLang's kernel for ``scheme`` cannot run this per-rank shape (empty if it can)."""
    return _format(scheme.kind).rank_problems(scheme, rank_shape)


def module_scheme(source_scheme: Scheme, entries: dict[str, dict]) -> Scheme:
    """What one module of a source is stored as, from its tensors' header entries ({suffix:
    {"dtype": ...}}): quantized sources keep norms, embeddings, routers (and whatever their
    ``modules_to_not_convert`` lists) in 16 bits."""
    if source_scheme.kind == "gptq" and "qweight" in entries:
        return source_scheme
    weight = entries.get("weight")
    if weight is not None:
        if source_scheme.kind == "fp8" and weight["dtype"] in FP8_DTYPES:
            return source_scheme
        return unquantized_scheme(weight["dtype"])
    first = next(iter(entries.values()), None)
    return unquantized_scheme(
        first["dtype"] if first is not None and first["dtype"] in FLOAT_DTYPES else source_scheme.dtype or "BF16"
    )


def release_tensors(scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    """The tensors the official releases store for a linear: the required ones, and ``g_idx``."""
    return {s: spec for s, spec in expected_tensors(scheme, n, k).items() if not spec.optional or s == "g_idx"}


def config_dtype(hf_config: dict) -> str:
    """The safetensors dtype of a model's 16-bit tensors, from config.json (bf16 if unsaid)."""
    return HF_DTYPES.get(str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"), "BF16")


def detect_scheme(hf_config: dict, *, where: str = "config.json") -> Scheme:
    """A source's scheme from its config.json (``quantization_config``).

    Raises ``unsupported_scheme`` for anything SGLang cannot run on CUDA in a mixed plan.
    """
    dtype = config_dtype(hf_config)
    qc = hf_config.get("quantization_config")
    if not qc:
        return unquantized_scheme(dtype)
    if not isinstance(qc, dict):
        raise MixedPrecisionError(
            ErrorCode.UNSUPPORTED_SCHEME,
            f"quantization_config is a {type(qc).__name__}, not a mapping",
            where=where,
            fix="use a checkpoint whose config.json has a quantization_config mapping",
        )
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        from .fp8 import scheme_from_fp8_config

        return scheme_from_fp8_config(qc, dtype, where)
    if method == "compressed-tensors":
        from .fp8 import scheme_from_compressed_tensors

        return scheme_from_compressed_tensors(qc, dtype, where)
    if method in ("gptq", "gptq_marlin"):
        from .gptq import scheme_from_gptq_config

        return scheme_from_gptq_config(qc, dtype, where)
    raise MixedPrecisionError(
        ErrorCode.UNSUPPORTED_SCHEME,
        f"quant_method {method or '(none)'!r} is not one a mixed plan can combine (fp8, gptq or 16-bit)",
        where=where,
        fix="use the model's FP8 (quant_method fp8) or GPTQ (quant_method gptq) release, or convert one with `sglang-mp convert`",
    )
