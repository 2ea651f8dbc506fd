"""FP8-E4M3 block quantization in the Qwen3-FP8 / DeepSeek-V3 layout.

``weight`` float8_e4m3fn [N, K] and ``weight_scale_inv`` float32 [ceil(N/bn), ceil(K/bk)], with
dequant = q * s per tile and s = amax(tile) / 448 (so the largest value of a tile maps to 448).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)


def _pad_to_blocks(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    n, k = w.shape
    pn, pk = (-n) % bn, (-k) % bk
    if pn or pk:
        w = torch.nn.functional.pad(w, (0, pk, 0, pn))
    return w


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weight fp8 [N, K], weight_scale_inv float32 [ceil(N/bn), ceil(K/bk)])."""
    if w.dim() != 2:
        raise ValueError(f"fp8 block quantization takes a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    bn, bk = block
    padded = _pad_to_blocks(w.to(torch.float32, copy=True), bn, bk)  # never scale the caller's tensor
    nb, kb = padded.shape[0] // bn, padded.shape[1] // bk
    tiles = padded.view(nb, bn, kb, bk)  # a view: scaling it in place scales `padded`
    amax = tiles.abs().amax(dim=(1, 3))
    # An all-zero tile quantizes to zeros with any scale; 1.0 keeps the scale finite.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    tiles.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = padded[:n, :k].to(torch.float8_e4m3fn)
    return q, scale.contiguous()
