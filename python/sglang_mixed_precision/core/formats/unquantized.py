"""16-bit (bf16 / fp16 / fp32) linears: one ``weight`` [N, K]; any per-rank shape runs; reloads in place."""

from __future__ import annotations

from . import FLOAT_DTYPES, Format, Scheme, TensorSpec

_LABELS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


class Unquantized(Format):
    kind = "unquantized"
    quantized = False
    precision_names = ("fp16", "bf16", "16bit")

    def release_scheme(self, dtype: str) -> Scheme:
        return Scheme(self.kind, dtype=dtype)

    def label(self, scheme: Scheme) -> str:
        return _LABELS.get(scheme.dtype or "", (scheme.dtype or "16bit").lower())

    def expected_tensors(self, scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec(FLOAT_DTYPES, (n, k)), "bias": TensorSpec(FLOAT_DTYPES, (n,), optional=True)}


FORMAT = Unquantized()
