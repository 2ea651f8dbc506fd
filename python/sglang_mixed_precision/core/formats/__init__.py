"""Checkpoint formats: one module per format, each owning everything about it, and their registry.

A :class:`Scheme` is what one module is stored as; its ``kind`` names the :class:`Format` that owns
it. A format answers every question the rest of the project asks about a scheme: how config.json
declares it (detection, parsing, writing ``quantization_config``), its label, which tensors a linear
of logical shape ``[N, K]`` stores, which per-rank shapes SGLang's CUDA kernel for it cannot run,
whether a served layer can take new bytes in place, how to dequantize it, and whether its kernel
quantizes activations. Outside this package nothing branches on ``scheme.kind``; serving keeps
one table per layer kind (serving/methods.py).

Adding a format is one module defining ``FORMAT`` and one line in :data:`_FORMAT_MODULES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ErrorCode, MixedPrecisionError
from ..files import read_json_object

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


@dataclass(frozen=True)
class Scheme:
    """How a module's weight is stored (and so which SGLang kernel runs it)."""

    kind: str  # the registered Format's kind: "unquantized" | "fp8" | "gptq"
    dtype: str | None = None  # unquantized: safetensors dtype of the weight; quantized: the model's 16-bit dtype
    fp8_block: tuple[int, int] | None = None  # (block_n, block_k), None for channel / tensor scales
    fp8_strategy: str | None = None  # "block" | "channel" | "tensor"
    bits: int | None = None
    group_size: int | None = None  # -1: one group over all of K
    sym: bool | None = None
    desc_act: bool | None = None

    @property
    def format(self) -> Format:
        return format_of(self.kind)

    @property
    def quantized(self) -> bool:
        return self.format.quantized

    def label(self) -> str:
        return self.format.label(self)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "label": self.label()}
        for key in ("dtype", "fp8_block", "fp8_strategy", "bits", "group_size", "sym", "desc_act"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


class TensorSpec(NamedTuple):
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    optional: bool = False


class Format:
    """What one checkpoint format answers. Subclasses override what differs from 16-bit."""

    kind: str = ""
    quantized: bool = True
    quant_methods: tuple[str, ...] = ()  # config.json quant_method values this format reads
    precision_names: tuple[str, ...] = ()  # what users call it in configs and analyzer exports ("fp8", "int4")
    side_config_files: tuple[str, ...] = ()  # older exports keep quantization_config in a file of its own
    release_dense_dtype: str | None = None  # 16-bit dtype the official releases store unquantized tensors in
    release_optional: frozenset[str] = frozenset()  # optional tensors the official releases store anyway

    # -- config.json
    def parse(self, qc: dict, dtype: str, where: str) -> Scheme:
        raise NotImplementedError

    def quantization_config(self, scheme: Scheme, **extras: Any) -> dict | None:
        """config.json's quantization_config for a checkpoint of ``scheme``; ``extras`` are the
        converter's (not_converted modules, skipped_groups, damp_percent, quantizer)."""
        return None

    def release_scheme(self, dtype: str) -> Scheme:
        """The scheme the model's official release uses (what the analyzer assumes when estimating)."""
        raise NotImplementedError

    # -- what a module stores
    def label(self, scheme: Scheme) -> str:
        raise NotImplementedError

    def expected_tensors(self, scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def precision_name(self, scheme: Scheme) -> str:
        """The word a config uses for this scheme's precision (an analyzer export's source key)."""
        return self.precision_names[0]

    def logical_shape(self, scheme: Scheme, shapes: dict[str, tuple]) -> tuple[int, ...] | None:
        """The 16-bit [N, K] of a module from its stored tensors' shapes ({suffix: shape})."""
        weight = shapes.get("weight")
        return tuple(weight) if weight is not None else None

    def stores_quantized(self, entries: dict[str, dict]) -> bool:
        """Whether a module's header entries ({suffix: {"dtype": ...}}) are stored in this format (a
        quantized checkpoint keeps norms, embeddings, routers and ``modules_to_not_convert`` in 16 bits)."""
        return False

    # -- serving
    def rank_problems(self, scheme: Scheme, rank_shape) -> list[str]:
        """Why SGLang's CUDA kernel for ``scheme`` cannot run this per-rank shape (empty if it can)."""
        return []

    def in_place_refusal(self, scheme: Scheme, moe: bool) -> str | None:
        """Why a served layer of this scheme cannot take new checkpoint bytes by a plain copy (None if it
        can): in-place reload runs no post-processing, so it only works where the method serves the
        checkpoint's own layout."""
        return None

    def quantizes_activations(self, scheme: Scheme) -> bool:
        """Whether SGLang's kernel quantizes a linear's input too (the reference path simulates it)."""
        return False

    # -- tensor data (torch imported by the implementations, never at import time)
    def dequantize(self, scheme: Scheme, tensors: dict) -> dict:
        """{suffix: tensor} as stored -> {"weight": float tensor [N, K], "bias"?: ...}."""
        return dict(tensors)


# ---- the registry -----------------------------------------------------------------------------
_FORMAT_MODULES = ("unquantized", "fp8", "gptq")  # one line per format
_FORMATS: dict[str, Format] = {}


def _registry() -> dict[str, Format]:
    if not _FORMATS:
        for name in _FORMAT_MODULES:
            fmt = importlib.import_module(f"{__name__}.{name}").FORMAT
            _FORMATS[fmt.kind] = fmt
    return _FORMATS


def format_of(kind: str) -> Format:
    try:
        return _registry()[kind]
    except KeyError:
        raise MixedPrecisionError(
            ErrorCode.UNSUPPORTED_SCHEME,
            f"no checkpoint format {kind!r} is registered",
            fix=f"use one of: {', '.join(_registry())}",
        ) from None


def all_formats() -> list[Format]:
    return list(_registry().values())


def unquantized_scheme(dtype: str) -> Scheme:
    return Scheme("unquantized", dtype=dtype)


def scheme_for_precision(precision: str, dtype: str = "BF16") -> Scheme | None:
    """The release scheme users mean by a precision word ("fp8", "int4"; None for 16-bit words)."""
    for fmt in all_formats():
        if precision in fmt.precision_names:
            return fmt.release_scheme(dtype)
    return None


# ---- questions about a scheme (the format answers) ----------------------------------------------
def expected_tensors(scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    """Tensors a linear of logical shape [N, K] stores under ``scheme`` (suffix -> spec)."""
    return scheme.format.expected_tensors(scheme, n, k)


def release_tensors(scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    """The tensors the official releases store for a linear: the required ones and the format's usual extras."""
    optional = scheme.format.release_optional
    return {s: spec for s, spec in expected_tensors(scheme, n, k).items() if not spec.optional or s in optional}


def rank_problems(scheme: Scheme, rank_shape) -> list[str]:
    return scheme.format.rank_problems(scheme, rank_shape)


def quantization_config(scheme: Scheme, **extras: Any) -> dict | None:
    return scheme.format.quantization_config(scheme, **extras)


def module_scheme(source_scheme: Scheme, entries: dict[str, dict]) -> Scheme:
    """What one module of a source is stored as, from its tensors' header entries."""
    if source_scheme.quantized and source_scheme.format.stores_quantized(entries):
        return source_scheme
    weight = entries.get("weight")
    if weight is not None:
        return unquantized_scheme(weight["dtype"])
    first = next(iter(entries.values()), None)
    dtype = first["dtype"] if first is not None and first["dtype"] in FLOAT_DTYPES else source_scheme.dtype or "BF16"
    return unquantized_scheme(dtype)


def config_dtype(hf_config: dict) -> str:
    """The safetensors dtype of a model's 16-bit tensors, from config.json (bf16 if unsaid)."""
    return HF_DTYPES.get(str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"), "BF16")


def side_quantization_config(model_dir: Path) -> dict | None:
    """quantization_config kept beside config.json by older exports (e.g. GPTQ's quantize_config.json)."""
    for fmt in all_formats():
        for name in fmt.side_config_files:
            path = Path(model_dir) / name
            if path.is_file():
                qc = read_json_object(path)
                qc.setdefault("quant_method", fmt.quant_methods[0])
                return qc
    return None


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
    for fmt in all_formats():
        if method in fmt.quant_methods:
            return fmt.parse(qc, dtype, where)
    known = sorted(m for fmt in all_formats() for m in fmt.quant_methods)
    raise MixedPrecisionError(
        ErrorCode.UNSUPPORTED_SCHEME,
        f"quant_method {method or '(none)'!r} is not one a mixed plan can combine ({', '.join(known)} or 16-bit)",
        where=where,
        fix="use the model's FP8 (quant_method fp8) or GPTQ (quant_method gptq) release, "
        "or convert one with `sglang-mp convert`",
    )
