"""Paired statistics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from modelkit.bench.paired_stats import aggregate, binomial_two_sided_half, is_binary, mcnemar_exact, paired_bootstrap


def test_mcnemar_exact_p_matches_the_binomial_tail_by_hand():
    # base right / trained wrong on 1 doc, the reverse on 6: p = 2 * P(X <= 1 | n=7, 1/2)
    base = [1, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    trained = [1, 0, 1, 1, 1, 1, 1, 1, 1, 0]
    result = mcnemar_exact(base, trained)
    assert (result.base_only, result.trained_only) == (1, 6)
    assert result.p_value == pytest.approx(2 * (1 + 7) / 2**7)        # 0.125

    # ten discordant pairs all one way: p = 2 / 2**10
    assert mcnemar_exact([0] * 10 + [1] * 5, [1] * 15).p_value == pytest.approx(2 / 1024)
    # balanced discordance, or none at all: no evidence of a difference
    assert mcnemar_exact([1, 0, 1, 0], [0, 1, 0, 1]).p_value == pytest.approx(1.0)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0


@pytest.mark.parametrize("k,n", [(0, 1), (3, 7), (4, 8), (0, 40), (17, 60), (250, 600), (9, 9)])
def test_exact_p_is_scipy_binomtest(k, n):
    from scipy.stats import binomtest

    assert binomial_two_sided_half(k, n) == pytest.approx(binomtest(k, n, 0.5).pvalue, rel=1e-12, abs=1e-300)


def test_mcnemar_refuses_non_binary_or_unpaired_scores():
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="length"):
        mcnemar_exact([1, 0], [1, 0, 1])


def test_bootstrap_is_deterministic_and_its_delta_is_the_observed_one():
    rng = np.random.default_rng(7)
    base = (rng.random(150) < 0.4).astype(float)
    trained = (rng.random(150) < 0.7).astype(float)
    a = paired_bootstrap(base, trained)
    b = paired_bootstrap(base, trained)
    assert a == b                                            # fixed seed: same interval
    assert a.delta == pytest.approx(trained.mean() - base.mean())
    assert a.low < a.delta < a.high
    assert paired_bootstrap(base, trained, seed=1) != a      # the seed is what fixes it
    assert (a.n, a.n_resamples, a.level) == (150, 2000, 0.95)


def test_bootstrap_interval_covers_the_true_delta_about_95_percent_of_the_time():
    # paired 0/1 scores with known rates: base right w.p. 0.5, trained right w.p. 0.65
    rng = np.random.default_rng(0)
    true_delta, hits, trials = 0.15, 0, 120
    for _ in range(trials):
        base = (rng.random(200) < 0.5).astype(float)
        trained = (rng.random(200) < 0.65).astype(float)
        ci = paired_bootstrap(base, trained, n_resamples=600)
        hits += ci.low <= true_delta <= ci.high
    assert 0.88 <= hits / trials <= 0.995


def test_identical_models_give_a_zero_width_interval():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0]
    ci = paired_bootstrap(scores, scores)
    assert (ci.delta, ci.low, ci.high) == (0.0, 0.0, 0.0)
    assert not ci.excludes_zero()


def test_weighted_perplexity_and_bits_per_byte_match_lm_eval():
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    items = [(-10.0, 5), (-12.5, 6), (-9.0, 4), (-20.0, 11)]
    assert aggregate(items, "weighted_perplexity") == pytest.approx(weighted_perplexity(items))
    assert aggregate(items, "bits_per_byte") == pytest.approx(bits_per_byte(items))
    # by hand: exp(51.5 / 26)
    assert aggregate(items, "weighted_perplexity") == pytest.approx(math.exp(51.5 / 26))
    better = [(ll + 1.0, w) for ll, w in items]
    ci = paired_bootstrap(items, better, "weighted_perplexity", n_resamples=500)
    assert ci.delta == pytest.approx(math.exp(47.5 / 26) - math.exp(51.5 / 26))
    assert ci.high < 0                                      # lower perplexity on every doc


def test_other_lm_eval_aggregations_are_called_per_resample():
    base = [(1, 1), (0, 1), (1, 0), (0, 0)] * 5
    ci = paired_bootstrap(base, base, "f1", n_resamples=50)
    assert (ci.low, ci.high) == (0.0, 0.0)


def test_is_binary():
    assert is_binary([0, 1, 1.0, True])
    assert not is_binary([0, 0.5])
    assert not is_binary([(1.0, 2)])
    assert not is_binary([])
