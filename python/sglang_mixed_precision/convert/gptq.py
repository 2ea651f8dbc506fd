"""GPTQ (Frantar et al., 2022) for symmetric int4: Hessian from calibration inputs, dampening,
blocked error compensation through the inverse-Hessian Cholesky factor, optional act-order.

Output is in the GPTQ v1 layout of ``gptq_pack``: grid integers kept in the original column order,
scales per group in quantization order and, with act-order, ``g_idx[k]`` = the group column k was
quantized in (GPTQModel's convention without static groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq_pack import SYM_ZERO, GptqTensors, effective_group, pack_gptq, quantize_to_grid, sym_scale


class HessianAccumulator:
    """H = 2/n * sum x x^T over the n input rows seen so far (a running mean, as GPTQ keeps it)."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.t() @ x

    @property
    def hessian(self) -> torch.Tensor:
        return self.h


@dataclass
class GptqResult:
    tensors: GptqTensors
    dequantized: torch.Tensor  # float32 [N, K], what the int4 weight computes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    group_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> GptqResult:
    """Quantize weight [N, K] to symmetric int4 minimizing ||X W^T - X Q^T|| with H = 2 X^T X: the
    batched pass with one matrix, so that one expert at a time and all of them at once run the
    same kernels and give the same bits."""
    batch = gptq_quantize_batched(
        weight[None],
        hessian[None],
        group_size=group_size,
        damp_percent=damp_percent,
        act_order=act_order,
        block_size=block_size,
    )
    return GptqResult(batch.tensors[0], batch.dequantized[0])


# -- many matrices of one shape at once (the experts of a MoE layer) -------------------------------
@dataclass
class GptqBatch:
    tensors: list[GptqTensors]  # one per matrix, in input order
    dequantized: torch.Tensor  # float32 [B, N, K]


def _batched_inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factors of H^-1 [B, K, K] after adding damp_percent * mean(diag H) to each
    diagonal; a matrix whose Cholesky fails (numerically indefinite) gets more dampening, alone."""
    k = h.shape[-1]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    damp = damp_percent * h.diagonal(dim1=-2, dim2=-1).mean(dim=-1)  # [B]
    h = h + damp[:, None, None] * eye
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h)
        failed = info != 0
        if not bool(failed.any()):
            break
        extra = torch.where(failed, damp * 10**attempt + 1e-6, torch.zeros_like(damp))
        h = h + extra[:, None, None] * eye
    else:
        raise RuntimeError("a Hessian is not positive definite even after extra dampening")
    del h
    hinv = torch.cholesky_inverse(chol)
    del chol
    return torch.linalg.cholesky(hinv, upper=True)


def _batched_group_scale(w1: torch.Tensor, i: int, g: int) -> torch.Tensor:
    return sym_scale(w1[:, i : i + g].abs().amax(dim=1))  # [B, N]


def gptq_quantize_batched(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    *,
    group_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> GptqBatch:
    """gptq_quantize for B matrices [B, N, K] with their own Hessians [B, K, K], in one pass over
    the columns: the per-column loop is bound by kernel launches on a GPU, so one launch for all
    the experts of a layer instead of one per expert is where the speed comes from."""
    w = weights.detach().float().clone()
    b, n, k = w.shape
    h = hessians.detach().float().clone()
    g = effective_group(k, group_size)
    block_size = max(block_size, g) if group_size != -1 else block_size
    if group_size != -1 and block_size % g:
        block_size = g * max(1, block_size // g)

    diag = h.diagonal(dim1=-2, dim2=-1)  # a view: writing it writes h
    dead = diag == 0  # [B, K]
    diag.masked_fill_(dead, 1)
    w.masked_fill_(dead[:, None, :], 0)

    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)  # [B, K]
        w = torch.gather(w, 2, perm[:, None, :].expand(b, n, k))
        h = torch.gather(h, 1, perm[:, :, None].expand(b, k, k))
        h = torch.gather(h, 2, perm[:, None, :].expand(b, k, k))
    else:
        perm = torch.arange(k, device=w.device).expand(b, k)
    hinv = _batched_inverse_cholesky(h, damp_percent)
    del h

    wt = w.transpose(1, 2).contiguous()  # [B, K, N]: a column of each W is a contiguous row
    del w
    q = torch.zeros_like(wt)
    scales: list[torch.Tensor] = []
    scale = sym_scale(wt.abs().amax(dim=1)) if group_size == -1 else None  # [B, N]
    if scale is not None:
        scales.append(scale)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group_size != -1 and (i1 + i) % g == 0:
                scale = _batched_group_scale(w1, i, g)
                scales.append(scale)
            wc = w1[:, i]  # [B, N]
            qc = quantize_to_grid(wc, scale)
            q[:, i1 + i] = qc
            e = err1[:, i]
            torch.sub(wc, (qc - SYM_ZERO).mul_(scale), out=e)
            e.div_(hinv1[:, i, i, None])
            w1[:, i:].baddbmm_(hinv1[:, i, i:, None], e[:, None, :], alpha=-1)
        wt[:, i2:].baddbmm_(hinv[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1)
    return _pack_batch(q, torch.stack(scales, dim=1), perm, g)


def _pack_batch(q_t: torch.Tensor, scales: torch.Tensor, perm: torch.Tensor, g: int) -> GptqBatch:
    """Grid integers [B, K, N] in quantization order, scales [B, G, N] -> packed tensors per matrix
    (original column order, g_idx as gptq_quantize writes it) and the dequantized weights."""
    b, k, _ = q_t.shape
    inv = torch.argsort(perm, dim=-1)  # [B, K]
    g_perm = torch.arange(k, dtype=torch.int32, device=q_t.device) // g
    g_idx = g_perm[inv]  # [B, K]
    q = torch.gather(q_t, 1, inv[:, :, None].expand_as(q_t)).transpose(1, 2)  # [B, N, K]
    s16 = scales.to(torch.float16).float()
    col_scale = torch.gather(s16, 1, g_idx.long()[:, :, None].expand(b, k, s16.shape[2]))  # [B, K, N]
    deq = (q - SYM_ZERO) * col_scale.transpose(1, 2)
    tensors = [pack_gptq(q[j], scales[j], g_idx[j]) for j in range(b)]
    return GptqBatch(tensors, deq)
