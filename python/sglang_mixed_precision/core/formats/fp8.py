"""FP8 e4m3 linears: block scales (Qwen3-FP8 / DeepSeek-V3 ``weight_scale_inv`` per [128, 128]
block), per-channel or per-tensor scales (``weight_scale``). Read from ``quant_method: fp8`` and from
compressed-tensors ``float-quantized`` 8-bit configs; written as ``quant_method: fp8``."""

from __future__ import annotations

from typing import Any

from ..errors import ErrorCode, MixedPrecisionError
from . import FLOAT_DTYPES, FP8_DTYPES, Format, Scheme, TensorSpec

_SCALE_DTYPES = ("F32", "BF16", "F16")
DEFAULT_BLOCK = (128, 128)


def _unsupported(reason: str, where: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.UNSUPPORTED_SCHEME,
        f"FP8 checkpoint: {reason}",
        where=where,
        fix="use an e4m3 FP8 checkpoint with [128, 128] blocks or per-channel / per-tensor scales",
    )


def _block_size(block, key: str, where: str) -> tuple[int, int]:
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _unsupported(f"{key} {block!r} is not two positive integers", where)
    return block[0], block[1]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Fp8(Format):
    kind = "fp8"
    quant_methods = ("fp8", "compressed-tensors")
    precision_names = ("fp8",)

    # -- config.json
    def parse(self, qc: dict, dtype: str, where: str) -> Scheme:
        if str(qc.get("quant_method", "")).lower() == "compressed-tensors":
            return self._parse_compressed_tensors(qc, dtype, where)
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise _unsupported(f"fmt {fmt!r} is not e4m3 (SGLang's fp8 linears read float8_e4m3fn)", where)
        block = qc.get("weight_block_size")
        if block is None:
            return Scheme(self.kind, dtype=dtype, fp8_strategy="tensor")
        return Scheme(
            self.kind, dtype=dtype, fp8_block=_block_size(block, "weight_block_size", where), fp8_strategy="block"
        )

    def _parse_compressed_tensors(self, qc: dict, dtype: str, where: str) -> Scheme:
        """compressed-tensors ``float-quantized`` 8-bit weights (one config group for all linears)."""
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict):
            raise _unsupported(f"compressed-tensors config_groups is {type(groups).__name__}, not a mapping", where)
        weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
        if len(weights) != 1:
            raise _unsupported(
                f"compressed-tensors config with {len(weights)} weight groups (one FP8 group expected)", where
            )
        w = weights[0]
        if not isinstance(w, dict):
            raise _unsupported(f"compressed-tensors weights is {type(w).__name__}, not a mapping", where)
        if w.get("num_bits") != 8 or w.get("type") != "float":
            raise _unsupported(
                f"compressed-tensors weights num_bits={w.get('num_bits')} type={w.get('type')} are not 8-bit float",
                where,
            )
        strategy = w.get("strategy", "tensor")
        if strategy == "block":
            block = w.get("block_structure") or list(DEFAULT_BLOCK)
            return Scheme(
                self.kind, dtype=dtype, fp8_block=_block_size(block, "block_structure", where), fp8_strategy="block"
            )
        if strategy not in ("channel", "tensor"):
            raise _unsupported(f"compressed-tensors strategy {strategy!r} (channel, tensor or block expected)", where)
        return Scheme(self.kind, dtype=dtype, fp8_strategy=strategy)

    def quantization_config(self, scheme: Scheme, *, not_converted=None, **_: Any) -> dict:
        """Qwen3-FP8 / DeepSeek-V3 layout, as SGLang's Fp8Config reads it."""
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        if scheme.fp8_block:
            qc["weight_block_size"] = list(scheme.fp8_block)
        if not_converted is not None:  # the converter lists what it kept 16-bit
            qc["modules_to_not_convert"] = list(not_converted)
        return qc

    def release_scheme(self, dtype: str) -> Scheme:
        return Scheme(self.kind, dtype=dtype, fp8_block=DEFAULT_BLOCK, fp8_strategy="block")

    # -- what a module stores
    def label(self, scheme: Scheme) -> str:
        if scheme.fp8_block:
            bn, bk = scheme.fp8_block
            return f"fp8-block{bn}" if bn == bk else f"fp8-block{bn}x{bk}"
        return f"fp8-{scheme.fp8_strategy or 'tensor'}"

    def expected_tensors(self, scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
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

    def stores_quantized(self, entries: dict[str, dict]) -> bool:
        weight = entries.get("weight")
        return weight is not None and weight["dtype"] in FP8_DTYPES

    # -- serving
    def rank_problems(self, scheme: Scheme, rs) -> list[str]:
        """SGLang's block-FP8 checks (``validate_block_quant_shapes`` and the FP8 MoE method)."""
        if not scheme.fp8_block:
            return []
        bn, bk = scheme.fp8_block
        problems = []
        for i, part in enumerate(rs.stacked[:-1]):  # concatenated with their scales: each must fill whole blocks
            if part % bn:
                problems.append(
                    f"the model concatenates parts {list(rs.stacked)} (weights and block scales as stored): "
                    f"part {i} ({part} rows) is not divisible by block_n {bn}"
                )
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
                    problems.append(
                        f"per-rank N {part} of fused parts {list(rs.parts)} is not divisible by block_n {bn}"
                    )
        return problems

    def in_place_refusal(self, scheme: Scheme, moe: bool) -> str | None:
        if moe:
            return f"the fused-MoE method for {self.label(scheme)} rewrites its expert weights and scales after loading"
        if not scheme.fp8_block:
            return (
                f"{self.label(scheme)} scales are converted after loading (per-channel / max per-tensor "
                "requantization), so checkpoint scales do not match what the kernel reads"
            )
        return None

    def quantizes_activations(self, scheme: Scheme) -> bool:
        return True  # W8A8: SGLang quantizes each linear's input to fp8 on the fly

    # -- tensor data
    def dequantize(self, scheme: Scheme, tensors: dict) -> dict:
        out = {k: v for k, v in tensors.items() if k == "bias"}
        if scheme.fp8_block:
            out["weight"] = dequant_block(tensors["weight"], tensors["weight_scale_inv"], scheme.fp8_block)
        else:  # per-channel [N, 1] or per-tensor scalar scale: both broadcast as a column
            scale = tensors.get("weight_scale", tensors.get("weight_scale_inv"))
            out["weight"] = tensors["weight"].float() * scale.float().reshape(-1, 1)
        return out


def dequant_block(weight, scale_inv, block: tuple[int, int] = DEFAULT_BLOCK):
    """weight fp8 [N, K] * weight_scale_inv [ceil(N/bn), ceil(K/bk)] broadcast per tile -> float32.

    Written from the published layout, not from the converter's packer, so that round trips check both.
    """
    import torch

    n, k = weight.shape
    bn, bk = block
    rows = torch.arange(n, device=weight.device) // bn
    cols = torch.arange(k, device=weight.device) // bk
    return weight.float() * scale_inv.float()[rows][:, cols]


FORMAT = Fp8()
