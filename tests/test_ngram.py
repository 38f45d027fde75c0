"""The n-gram baseline is a proper distribution and learns what it is shown."""

import math

import numpy as np
import pytest

from tools.ngram import NGramModel


@pytest.mark.parametrize("order", [1, 2, 4])
def test_ngram_distribution_sums_to_one_and_matches_prob(order):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 12, 50).tolist() for _ in range(20)]
    model = NGramModel(order, vocab_size=16).fit(seqs)
    for history in ([], [3], [3, 5, 7], [15, 15, 15]):  # includes unseen tokens and histories
        dist = model.distribution(history)
        assert dist.sum() == pytest.approx(1.0, abs=1e-9)
        assert all(dist[t] == pytest.approx(model.prob(history, t)) for t in range(16))


def test_ngram_higher_order_learns_a_repeating_pattern():
    pattern = [0, 1, 2, 3, 1, 2, 4] * 30
    uni = NGramModel(1, 8).fit([pattern])
    tri = NGramModel(4, 8).fit([pattern])
    nll_uni, n = uni.nll([pattern])
    nll_tri, _ = tri.nll([pattern])
    assert n == len(pattern) - 1
    assert nll_tri / n < 0.5 * nll_uni / n
    assert 0.3 < tri.prob([1, 2], 3) < 0.7 and tri.prob([3, 1, 2], 4) > 0.9
    assert -math.log(uni.prob([], 1)) < -math.log(uni.prob([], 7))


def test_ngram_with_order_matches_a_model_fitted_at_that_order():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 6, 80).tolist() for _ in range(10)]
    full = NGramModel(4, vocab_size=6).fit(seqs)
    small = NGramModel(2, vocab_size=6).fit(seqs)
    assert full.with_order(2).nll(seqs) == pytest.approx(small.nll(seqs))
