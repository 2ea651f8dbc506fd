"""16-bit (bf16 / fp16 / fp32) linears: one ``weight`` [N, K]; any per-rank shape runs."""

from __future__ import annotations

from . import FLOAT_DTYPES, Scheme, TensorSpec


def expected_tensors(scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    return {"weight": TensorSpec(FLOAT_DTYPES, (n, k)), "bias": TensorSpec(FLOAT_DTYPES, (n,), optional=True)}


def rank_problems(scheme: Scheme, rank_shape) -> list[str]:
    return []
