"""GPTQ v1 int4 storage: the symmetric grid and the qweight / qzeros / scales / g_idx packing.

Layout (what AutoGPTQ / GPTQModel write and SGLang's gptq / gptq_marlin read):
``qweight`` int32 [K/8, N], eight 4-bit values along K per word, lowest nibble = lowest k;
``qzeros`` int32 [G, N/8], eight (zero - 1) values along N per word (v1 stores zero minus one,
so symmetric 4-bit writes 7 = 0x77777777); ``scales`` fp16 [G, N]; ``g_idx`` int32 [K].
Dequant: w[n, k] = (q[n, k] - zero[g, n]) * scales[g, n] with g = g_idx[k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = 4
PACK = 32 // BITS  # values per int32 word
MAXQ = (1 << BITS) - 1
SYM_ZERO = (MAXQ + 1) // 2  # 8: the stored qzeros nibble is SYM_ZERO - 1 = 7
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # a module's tensors, in dequant_gptq's argument order


@dataclass
class GptqTensors:
    """One module's GPTQ tensors, ready to write."""

    qweight: torch.Tensor  # int32 [K/8, N]
    qzeros: torch.Tensor  # int32 [G, N/8]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]

    def parts(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, k) for k in GPTQ_SUFFIXES)

    def to(self, device: torch.device | str) -> GptqTensors:
        return GptqTensors(*(t.to(device) for t in self.parts()))

    def as_dict(self, module: str) -> dict[str, torch.Tensor]:
        return {f"{module}.{k}": t for k, t in zip(GPTQ_SUFFIXES, self.parts())}


def effective_group(k: int, group_size: int) -> int:
    return k if group_size == -1 else group_size


def sym_scale(amax: torch.Tensor) -> torch.Tensor:
    """Symmetric 4-bit scale from a group's amax, rounded to fp16 as it is stored.

    GPTQ's symmetric grid spans [-amax, amax] in 15 steps around zero point 8; an all-zero group
    gets the grid of [-1, 1] (as GPTQ does) so the scale stays finite.
    """
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return (2 * amax / MAXQ).to(torch.float16).float()


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round w / scale to the symmetric grid: integers in [0, 15] (same shape as w)."""
    return torch.clamp(torch.round(w / scale) + SYM_ZERO, 0, MAXQ)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_along_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints in [0, 15] -> int32 [R/8, C]; row r goes to nibble r % 8 of word r // 8."""
    r, c = values.shape
    v = values.to(torch.int64).view(r // PACK, PACK, c)
    shifts = (torch.arange(PACK, dtype=torch.int64, device=values.device) * BITS).view(1, PACK, 1)
    return _to_int32((v << shifts).sum(dim=1))


def pack_qweight(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15] -> qweight int32 [K/8, N] (packed along K)."""
    return pack_along_rows(q.t().contiguous())


def pack_qzeros(zeros: torch.Tensor) -> torch.Tensor:
    """zeros [G, N] (the true zero point) -> qzeros int32 [G, N/8] holding zero - 1 (GPTQ v1)."""
    return pack_along_rows((zeros - 1).t().contiguous()).t().contiguous()


def sequential_g_idx(k: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """g_idx without act-order: column k belongs to group k // group_size."""
    g = effective_group(k, group_size)
    return (torch.arange(k, dtype=torch.int32, device=device) // g).to(torch.int32)


def pack_gptq(q: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> GptqTensors:
    """Pack grid integers q [N, K], per-group scales [G, N] and g_idx [K] (symmetric)."""
    g, n = scales.shape
    zeros = torch.full((g, n), SYM_ZERO, dtype=torch.int64, device=q.device)
    return GptqTensors(
        qweight=pack_qweight(q),
        qzeros=pack_qzeros(zeros),
        scales=scales.to(torch.float16).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
    )


def check_gptq_shape(name: str, n: int, k: int, group_size: int) -> str | None:
    """Why [N, K] cannot be stored as GPTQ int4 with this group size, or None if it can."""
    if k % PACK:
        return f"{name}: in_features {k} is not a multiple of {PACK} (qweight packs 8 values along K)"
    if n % PACK:
        return f"{name}: out_features {n} is not a multiple of {PACK} (qzeros packs 8 values along N)"
    if group_size != -1 and k % group_size:
        return f"{name}: in_features {k} is not a multiple of group_size {group_size}"
    return None


def rtn_quantize(w: torch.Tensor, group_size: int) -> GptqTensors:
    """Round-to-nearest symmetric int4 with per-group scales (the calibration-free baseline)."""
    n, k = w.shape
    g = effective_group(k, group_size)
    wg = w.float().view(n, k // g, g)
    scale = sym_scale(wg.abs().amax(dim=2))  # [N, G]
    q = quantize_to_grid(wg, scale.unsqueeze(2)).view(n, k)
    return pack_gptq(q, scale.t(), sequential_g_idx(k, group_size, w.device))
