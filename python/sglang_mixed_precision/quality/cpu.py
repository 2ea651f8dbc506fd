"""Teacher-forced scores of a mix on CPU, through the reference path (small models).

Every module's weights come from its planned source, fp8 and int4 dequantized; fp8 modules' inputs
are quantized as SGLang's W8A8 kernels do (``simulate_w8a8``), so the reference path measures what
serving the mix costs, not only what storing its weights costs. Float32 by default; bfloat16 runs
the same model in SGLang's arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch

from ..reference import build_reference_model, teacher_forced_logprobs
from .metrics import TokenScores


def scores_from_logprobs(ids: list[int], logprobs: torch.Tensor, k: int, top_ids: np.ndarray | None) -> TokenScores:
    """TokenScores from whole-vocabulary log-probs [T, V] (position t predicts token t + 1).

    Without ``top_ids`` the model is a baseline: its own top-k; with them, its log-probs there.
    """
    lp = logprobs[:-1].double()  # the last position predicts past the text
    vocab = lp.shape[-1]
    targets = torch.tensor(ids[1:], dtype=torch.long)
    target_lp = lp.gather(1, targets[:, None])[:, 0]
    if top_ids is None:
        k = min(k, vocab)
        top_lp, top = lp.topk(k, dim=-1)
    else:
        top = torch.from_numpy(np.asarray(top_ids)).long()
        top_lp = lp.gather(1, top)
        k = top.shape[1]
    return TokenScores(
        token_ids=list(ids),
        target_logprobs=target_lp.numpy(),
        top_ids=top.numpy(),
        top_logprobs=top_lp.numpy(),
        argmax=lp.argmax(dim=-1).numpy(),
        k=k,
        vocab=vocab,
    )


class CpuBackend:
    """Scores plans through the transformers reference, one model at a time."""

    name = "cpu (reference path)"

    def __init__(self, *, dtype: torch.dtype = torch.float32, simulate_w8a8: bool = True, threads: int | None = None):
        self.dtype = dtype
        self.simulate_w8a8 = simulate_w8a8
        if threads:
            torch.set_num_threads(threads)

    def score(self, plan, ids: list[int], k: int, top_ids: np.ndarray | None = None) -> TokenScores:
        model = build_reference_model(plan, dtype=self.dtype, simulate_w8a8=self.simulate_w8a8)
        return scores_from_logprobs(ids, teacher_forced_logprobs(model, ids), k, top_ids)

    def close(self) -> None:
        pass
