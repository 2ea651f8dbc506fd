"""KLD, top-1 agreement and perplexity against values computed by hand."""

import math

import numpy as np
import pytest

from sglang_mixed_precision.quality.metrics import (
    TokenScores,
    compare,
    kl_divergence_full,
    kl_divergence_topk,
    perplexity,
    top1_agreement,
)


def test_full_kld_of_two_three_token_distributions():
    p = np.log([[0.5, 0.25, 0.25]])
    q = np.log([[0.25, 0.5, 0.25]])
    # 0.5 ln 2 + 0.25 ln 0.5 + 0 = 0.25 ln 2
    assert kl_divergence_full(p, q)[0] == pytest.approx(0.25 * math.log(2), rel=1e-12)
    assert kl_divergence_full(p, p)[0] == 0.0


def test_topk_kld_puts_the_rest_into_one_bucket():
    # baseline [0.5, 0.3, 0.2], mix [0.4, 0.3, 0.3]; k = 1 -> buckets {0.5, 0.5} vs {0.4, 0.6}
    p = np.log([[0.5]])
    q = np.log([[0.4]])
    expected = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert kl_divergence_topk(p, q)[0] == pytest.approx(expected, rel=1e-12)
    full = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(1.0) + 0.2 * math.log(0.2 / 0.3)
    assert kl_divergence_topk(np.log([[0.5, 0.3]]), np.log([[0.4, 0.3]]))[0] == pytest.approx(full, rel=1e-12)
    # coarsening never increases the divergence
    assert kl_divergence_topk(p, q)[0] <= full


def test_topk_kld_with_every_token_listed_equals_the_full_kld():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 11))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert np.allclose(kl_divergence_topk(lp[0], lp[1]), kl_divergence_full(lp[0], lp[1]), atol=1e-12)


def test_perplexity_and_top1_agreement():
    assert perplexity(np.log([0.5, 0.25])) == pytest.approx(math.sqrt(8))  # exp(-(ln .5 + ln .25)/2)
    assert top1_agreement([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5


def _scores(ids, target, top_ids, top_lp, argmax, k=2):
    return TokenScores(ids, np.array(target), np.array(top_ids), np.array(top_lp), np.array(argmax), k, vocab=3)


def test_compare_summarizes_per_position_values():
    ids = [0, 1, 2]
    base = _scores(ids, np.log([0.5, 0.5]), [[0, 1], [2, 1]], np.log([[0.5, 0.3], [0.5, 0.25]]), [0, 2])
    mix = _scores(ids, np.log([0.4, 0.25]), [[0, 1], [2, 1]], np.log([[0.4, 0.3], [0.25, 0.5]]), [0, 1])
    c = compare(base, mix)
    k0 = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.3)
    k1 = 0.5 * math.log(2) + 0.25 * math.log(0.5) + 0.0
    assert c.kld == pytest.approx([k0, k1])
    assert c.kld_mean == pytest.approx((k0 + k1) / 2)
    assert c.kld_p99 == pytest.approx(k0 + 0.99 * (k1 - k0))  # numpy's linear interpolation, 2 values
    assert c.top1 == 0.5
    assert c.baseline_ppl == pytest.approx(2.0)
    assert c.mix_ppl == pytest.approx(math.exp(-(math.log(0.4) + math.log(0.25)) / 2))
    assert c.summary()["k"] == 2 and not c.exact


def test_compare_refuses_misaligned_scores():
    base = _scores([0, 1], np.log([0.5]), [[0, 1]], np.log([[0.5, 0.3]]), [0])
    other = _scores([0, 1], np.log([0.5]), [[1, 0]], np.log([[0.3, 0.5]]), [0])
    with pytest.raises(ValueError, match="top-k"):
        compare(base, other)
