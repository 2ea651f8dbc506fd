"""Dequantizers for the formats the converter writes, written independently of the packers.

They follow the published layouts, not the converter's code, so that reloading an output and
comparing it with the 16-bit original checks the packing too. The reference forward pass uses them
to run a module from its fp8 / int4 source.
"""

from __future__ import annotations

import torch


def dequant_fp8_block(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """weight fp8 [N, K] * weight_scale_inv [ceil(N/bn), ceil(K/bk)] broadcast per tile -> float32."""
    n, k = weight.shape
    bn, bk = block
    rows = torch.arange(n) // bn
    cols = torch.arange(k) // bk
    return weight.float() * scale_inv.float()[rows][:, cols]


def _nibbles(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [R, C] -> [R, 32/bits, C] unsigned fields, lowest field first."""
    u = words.to(torch.int64) % (1 << 32)  # reinterpret the int32 bits as unsigned
    per_word = 32 // bits
    fields = [(u // (1 << (bits * i))) % (1 << bits) for i in range(per_word)]
    return torch.stack(fields, dim=1)


def unpack_gptq_int(qweight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """qweight int32 [K*bits/32, N] -> integer weights [K, N]."""
    f = _nibbles(qweight, bits)  # [K/8, 8, N]
    return f.reshape(-1, qweight.shape[1])


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """qzeros int32 [G, N*bits/32] -> true zero points [G, N] (GPTQ v1 stores zero - 1)."""
    f = _nibbles(qzeros, bits)  # [G, 8, N/8]: field i of word j is column j*8 + i
    return f.permute(0, 2, 1).reshape(qzeros.shape[0], -1) + 1


def dequant_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, bits: int = 4
) -> torch.Tensor:
    """GPTQ v1 tensors -> float32 weight [N, K] (nn.Linear layout)."""
    q = unpack_gptq_int(qweight, bits)  # [K, N]
    zeros = unpack_gptq_zeros(qzeros, bits)  # [G, N]
    k = q.shape[0]
    if g_idx is None:
        g_idx = torch.arange(k) // (k // scales.shape[0])
    g = g_idx.long()
    w = (q - zeros[g]).float() * scales.float()[g]
    return w.t().contiguous()
