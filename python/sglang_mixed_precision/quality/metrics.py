"""Quality of a mix against its 16-bit baseline, from teacher-forced log-probs of one text.

Both models score the same token ids; position ``t`` holds the distribution predicting token
``t + 1``. The baseline's distribution is known on a set of ``k`` tokens per position (its top-k,
or the whole vocabulary when k = V); the mix's log-probs are taken at those same tokens. The KL
divergence KL(baseline || mix) is computed over those k tokens plus one bucket holding the rest of
the mass of each side, so nothing is dropped:

    KL_k = sum_{i in top-k} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)

With k = V it is the exact KL divergence; with k < V it is the KL divergence of the two
distributions coarsened to k + 1 outcomes, which never exceeds the exact one (data processing).
Pure numpy: the CPU path, the GPU path and the tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Probabilities below this are treated as this: a bucket the mix puts (numerically) nothing into
# would otherwise make the KL divergence infinite for one rounding error.
MIN_PROB = 1e-30


@dataclass
class TokenScores:
    """One model's teacher-forced scores on a text of T tokens (T - 1 predicted positions).

    target_logprobs [T-1]: log-prob of the token that actually follows;
    top_ids / top_logprobs [T-1, k]: the k tokens scored at each position and their log-probs
    (a baseline: its own top-k; a mix: the baseline's top-k ids, so the two align);
    argmax [T-1]: the model's most likely token at each position.
    """

    token_ids: list[int]
    target_logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    argmax: np.ndarray
    k: int
    vocab: int | None = None

    @property
    def positions(self) -> int:
        return len(self.target_logprobs)


def kl_divergence_topk(p_logprobs: np.ndarray, q_logprobs: np.ndarray) -> np.ndarray:
    """Per position KL(P || Q) over k aligned tokens plus the remaining-mass bucket.

    ``p_logprobs`` / ``q_logprobs`` [T, k]: both models' log-probs at the same k tokens.
    """
    p_lp = np.asarray(p_logprobs, dtype=np.float64)
    q_lp = np.asarray(q_logprobs, dtype=np.float64)
    p, q = np.exp(p_lp), np.exp(q_lp)
    listed = np.sum(p * (p_lp - q_lp), axis=-1)
    p_rest = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - q.sum(axis=-1), MIN_PROB, 1.0)
    rest = np.where(p_rest > MIN_PROB, p_rest * (np.log(np.maximum(p_rest, MIN_PROB)) - np.log(q_rest)), 0.0)
    # exact arithmetic cannot go below zero; rounding of nearly equal distributions can, by ~1e-16
    return np.maximum(listed + rest, 0.0)


def kl_divergence_full(p_logprobs: np.ndarray, q_logprobs: np.ndarray) -> np.ndarray:
    """Per position KL(P || Q) from whole-vocabulary log-probs [T, V]."""
    p_lp = np.asarray(p_logprobs, dtype=np.float64)
    q_lp = np.asarray(q_logprobs, dtype=np.float64)
    return np.maximum(np.sum(np.exp(p_lp) * (p_lp - q_lp), axis=-1), 0.0)


def perplexity(target_logprobs: np.ndarray) -> float:
    """exp(mean negative log-likelihood of the tokens that follow)."""
    lp = np.asarray(target_logprobs, dtype=np.float64)
    return float(np.exp(-lp.mean())) if lp.size else float("nan")


def top1_agreement(baseline_argmax: np.ndarray, mix_argmax: np.ndarray) -> float:
    """Share of positions where both models' most likely next token is the same."""
    a, b = np.asarray(baseline_argmax), np.asarray(mix_argmax)
    return float(np.mean(a == b)) if a.size else float("nan")


@dataclass
class Comparison:
    """A mix against its baseline on one text: per-position KLD and the summary numbers."""

    kld: np.ndarray  # [T-1]
    k: int
    vocab: int | None
    baseline_ppl: float
    mix_ppl: float
    top1: float

    @property
    def kld_mean(self) -> float:
        return float(self.kld.mean()) if self.kld.size else float("nan")

    @property
    def kld_p99(self) -> float:
        return float(np.percentile(self.kld, 99)) if self.kld.size else float("nan")

    @property
    def exact(self) -> bool:
        """Whether the KLD covers the whole vocabulary (k = V) or k tokens and the rest as one bucket."""
        return self.vocab is not None and self.k >= self.vocab

    def summary(self) -> dict:
        return {
            "positions": int(self.kld.size),
            "kld_mean": self.kld_mean,
            "kld_p99": self.kld_p99,
            "kld_max": float(self.kld.max()) if self.kld.size else float("nan"),
            "top1_agreement": self.top1,
            "ppl_baseline": self.baseline_ppl,
            "ppl_mix": self.mix_ppl,
            "k": self.k,
            "vocab": self.vocab,
            "kld_kind": "exact (k = vocabulary)"
            if self.exact
            else f"top-{self.k} tokens of the baseline + the remaining mass as one bucket",
        }


def compare(baseline: TokenScores, mix: TokenScores) -> Comparison:
    """KLD, top-1 agreement and both perplexities; ``mix.top_ids`` must be ``baseline.top_ids``."""
    if baseline.token_ids != mix.token_ids:
        raise ValueError("the baseline and the mix scored different texts")
    if baseline.top_ids.shape != mix.top_ids.shape or not np.array_equal(baseline.top_ids, mix.top_ids):
        raise ValueError("the mix's log-probs are not taken at the baseline's top-k tokens")
    return Comparison(
        kld=kl_divergence_topk(baseline.top_logprobs, mix.top_logprobs),
        k=baseline.k,
        vocab=baseline.vocab,
        baseline_ppl=perplexity(baseline.target_logprobs),
        mix_ppl=perplexity(mix.target_logprobs),
        top1=top1_agreement(baseline.argmax, mix.argmax),
    )
