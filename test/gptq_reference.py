"""GPTQ one matrix at a time, as the converter computed it before the batched pass (a column loop of
rank-1 updates, ``addr_`` / ``addmm_``): the reference the batched pass is held against."""

from __future__ import annotations

import torch

from sglang_mixed_precision.convert.gptq import GptqResult
from sglang_mixed_precision.convert.gptq_pack import SYM_ZERO, effective_group, pack_gptq, quantize_to_grid, sym_scale


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after adding damp_percent * mean(diag H) to the diagonal."""
    k = h.shape[0]
    damp = damp_percent * torch.mean(torch.diag(h))
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    h = h + damp * eye  # a new tensor: the caller's H is left as it was
    for attempt in range(6):  # raise dampening if H is numerically indefinite
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h = h + (damp * 10**attempt + 1e-6) * eye
    else:
        raise RuntimeError("Hessian is not positive definite even after extra dampening")
    del h
    hinv = torch.cholesky_inverse(chol)
    del chol
    return torch.linalg.cholesky(hinv, upper=True)


def reference_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    group_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> GptqResult:
    """Quantize weight [N, K] to symmetric int4 minimizing ||X W^T - X Q^T|| with H = 2 X^T X."""
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().float().clone()
    g = effective_group(k, group_size)
    block_size = max(block_size, g) if group_size != -1 else block_size
    if group_size != -1 and block_size % g:
        block_size = g * max(1, block_size // g)

    dead = torch.diag(h) == 0  # input channels never active: weight is irrelevant to the loss
    h[dead, dead] = 1
    w[:, dead] = 0

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    if act_order:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp_percent)
    del h

    # Work on W^T so that a column of W is a contiguous row: the inner loop is launch-bound.
    wt = w.t().contiguous()  # [K, N]
    q = torch.zeros_like(wt)
    scales: list[torch.Tensor] = []
    scale = sym_scale(wt.abs().amax(dim=0)) if group_size == -1 else None
    if scale is not None:
        scales.append(scale)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group_size != -1 and (i1 + i) % g == 0:
                # scale from the error-compensated columns of this group (all inside the block)
                scale = sym_scale(w1[i : i + g].abs().amax(dim=0))
                scales.append(scale)
            wc = w1[i]
            qc = quantize_to_grid(wc, scale)
            q[i1 + i] = qc
            e = err1[i]
            torch.sub(wc, (qc - SYM_ZERO).mul_(scale), out=e)
            e.div_(hinv1[i, i])
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1)
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    q = q.t()

    inv = torch.argsort(perm)
    g_perm = torch.arange(k, dtype=torch.int32, device=w.device) // g  # group of each position in quantization order
    g_idx = g_perm[inv]
    q = q[:, inv]
    scales_t = torch.stack(scales)  # [G, N]
    tensors = pack_gptq(q, scales_t, g_idx)
    deq = (q - SYM_ZERO) * scales_t.to(torch.float16).float()[g_idx.long()].t()
    return GptqResult(tensors, deq)
