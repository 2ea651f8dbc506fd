"""GPTQ v1 linears (``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``), run by SGLang's
gptq_marlin kernels on CUDA: symmetric, 4 or 8 bits, group size -1 / 32 / 64 / 128."""

from __future__ import annotations

from ..errors import ErrorCode, MixedPrecisionError
from . import FLOAT_DTYPES, Scheme, TensorSpec

MARLIN_BITS = (4, 8)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_THREAD_N = 64
MARLIN_MIN_THREAD_K = 128
_SCALE_DTYPES = ("F16", "BF16")


def _unsupported(reason: str, where: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.UNSUPPORTED_SCHEME,
        f"GPTQ checkpoint: {reason}; SGLang runs GPTQ on CUDA only through gptq_marlin",
        where=where,
        fix="use a symmetric GPTQ export with bits 4 or 8 and group_size -1, 32, 64 or 128 "
        "(e.g. `sglang-mp convert --int4` from the 16-bit model)",
    )


def scheme_from_gptq_config(qc: dict, dtype: str, where: str) -> Scheme:
    missing = [k for k in ("bits", "group_size") if k not in qc]
    if missing:
        raise _unsupported(f"quantization_config lacks {', '.join(missing)}", where)
    bits, group, sym = qc["bits"], qc["group_size"], qc.get("sym", True)
    desc_act = bool(qc.get("desc_act", False))
    fmt = str(qc.get("checkpoint_format") or "gptq")
    if fmt not in ("gptq", ""):
        raise _unsupported(
            f"checkpoint_format {fmt!r} (only the GPTQ v1 layout qweight/qzeros/scales/g_idx is read)", where
        )
    if bits not in MARLIN_BITS:
        raise _unsupported(f"bits={bits!r} (gptq_marlin runs 4 or 8 bits)", where)
    if group not in MARLIN_GROUP_SIZES:
        raise _unsupported(f"group_size={group!r} (gptq_marlin runs group sizes {list(MARLIN_GROUP_SIZES)})", where)
    if sym is not True:
        raise _unsupported(f"asymmetric quantization (sym={sym!r}); gptq_marlin has no zero-point GPTQ kernel", where)
    return Scheme("gptq", dtype=dtype, bits=bits, group_size=group, sym=True, desc_act=desc_act)


def expected_tensors(scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    pack = 32 // scheme.bits
    groups = 1 if scheme.group_size == -1 else -(-k // scheme.group_size)
    return {
        "qweight": TensorSpec(("I32",), (k // pack, n)),
        "qzeros": TensorSpec(("I32",), (groups, n // pack)),
        "scales": TensorSpec(_SCALE_DTYPES, (groups, n)),
        "g_idx": TensorSpec(("I32",), (k,), optional=True),
        "bias": TensorSpec(FLOAT_DTYPES, (n,), optional=True),
    }


def _marlin_problems(scheme: Scheme, what: str, n: int, k: int, k_full: int) -> list[str]:
    """SGLang's ``verify_marlin_supports_shape`` for one per-rank [N, K]."""
    problems = []
    if n % MARLIN_MIN_THREAD_N:
        problems.append(f"{what}: per-rank N {n} is not divisible by {MARLIN_MIN_THREAD_N} (gptq_marlin min_thread_n)")
    if k % MARLIN_MIN_THREAD_K:
        problems.append(f"{what}: per-rank K {k} is not divisible by {MARLIN_MIN_THREAD_K} (gptq_marlin min_thread_k)")
    group = scheme.group_size
    if group != -1 and group < k_full and k % group:
        problems.append(f"{what}: per-rank K {k} is not divisible by group_size {group}")
    return problems


def rank_problems(scheme: Scheme, rs) -> list[str]:
    if rs.moe:
        inter, hidden = rs.moe_intermediate, rs.k
        return _marlin_problems(scheme, "experts w13 (gate/up)", 2 * inter, hidden, hidden) + _marlin_problems(
            scheme, "experts w2 (down)", hidden, inter, inter * rs.tp
        )
    return _marlin_problems(scheme, "weight", rs.n, rs.k, rs.k_full)
