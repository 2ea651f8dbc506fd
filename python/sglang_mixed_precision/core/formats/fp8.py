"""FP8 e4m3 linears: block scales (Qwen3-FP8 / DeepSeek-V3 ``weight_scale_inv`` per [128, 128]
block), per-channel or per-tensor scales (``weight_scale``)."""

from __future__ import annotations

from ..errors import ErrorCode, MixedPrecisionError
from . import FLOAT_DTYPES, FP8_DTYPES, Scheme, TensorSpec

_SCALE_DTYPES = ("F32", "BF16", "F16")


def _unsupported(reason: str, where: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.UNSUPPORTED_SCHEME,
        f"FP8 checkpoint: {reason}",
        where=where,
        fix="use an e4m3 FP8 checkpoint with [128, 128] blocks or per-channel / per-tensor scales",
    )


def scheme_from_fp8_config(qc: dict, dtype: str, where: str) -> Scheme:
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise _unsupported(f"fmt {fmt!r} is not e4m3 (SGLang's fp8 linears read float8_e4m3fn)", where)
    block = qc.get("weight_block_size")
    if block is None:
        return Scheme("fp8", dtype=dtype, fp8_strategy="tensor")
    return Scheme("fp8", dtype=dtype, fp8_block=_block_size(block, "weight_block_size", where), fp8_strategy="block")


def scheme_from_compressed_tensors(qc: dict, dtype: str, where: str) -> Scheme:
    """compressed-tensors ``float-quantized`` 8-bit weights (one config group for all linears)."""
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    if len(weights) != 1:
        raise _unsupported(
            f"compressed-tensors config with {len(weights)} weight groups (one FP8 group expected)", where
        )
    w = weights[0]
    if w.get("num_bits") != 8 or w.get("type") != "float":
        raise _unsupported(
            f"compressed-tensors weights num_bits={w.get('num_bits')} type={w.get('type')} are not 8-bit float", where
        )
    strategy = w.get("strategy", "tensor")
    if strategy == "block":
        block = w.get("block_structure") or [128, 128]
        return Scheme("fp8", dtype=dtype, fp8_block=_block_size(block, "block_structure", where), fp8_strategy="block")
    if strategy not in ("channel", "tensor"):
        raise _unsupported(f"compressed-tensors strategy {strategy!r} (channel, tensor or block expected)", where)
    return Scheme("fp8", dtype=dtype, fp8_strategy=strategy)


def _block_size(block, key: str, where: str) -> tuple[int, int]:
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _unsupported(f"{key} {block!r} is not two positive integers", where)
    return block[0], block[1]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expected_tensors(scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    specs = {"weight": TensorSpec(FP8_DTYPES, (n, k)), "bias": TensorSpec(FLOAT_DTYPES, (n,), optional=True)}
    if scheme.fp8_block:
        bn, bk = scheme.fp8_block
        specs["weight_scale_inv"] = TensorSpec(_SCALE_DTYPES, (_ceil_div(n, bn), _ceil_div(k, bk)))
    elif scheme.fp8_strategy == "channel":
        specs["weight_scale"] = TensorSpec(_SCALE_DTYPES, (n, 1))
    else:
        specs["weight_scale"] = TensorSpec(_SCALE_DTYPES, ())
        specs["input_scale"] = TensorSpec(_SCALE_DTYPES, (), optional=True)
    return specs


def rank_problems(scheme: Scheme, rs) -> list[str]:
    """SGLang's block-FP8 checks (``validate_block_quant_shapes`` and the FP8 MoE method)."""
    if not scheme.fp8_block:
        return []
    bn, bk = scheme.fp8_block
    problems = []
    if rs.moe:
        if rs.moe_intermediate % bn:
            problems.append(
                f"per-rank MoE intermediate {rs.moe_intermediate} (N of gate/up) is not divisible by block_n {bn}"
            )
        if rs.tp > 1 and rs.moe_intermediate % bk:
            problems.append(
                f"per-rank MoE intermediate {rs.moe_intermediate} (K of down) is not divisible by block_k {bk}"
            )
        return problems
    if rs.tp > 1 and rs.row_split and rs.k % bk:
        problems.append(f"per-rank K {rs.k} (of {rs.k_full}) is not divisible by block_k {bk}")
    if (rs.tp > 1 and rs.column_split) or len(rs.parts) > 1:
        for part in rs.parts:
            if part % bn:
                problems.append(f"per-rank N {part} of fused parts {list(rs.parts)} is not divisible by block_n {bn}")
    return problems
