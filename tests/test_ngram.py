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


def brute_force_prob(seqs, order, vocab_size, history, token, discount=0.75):
    """The docstring's formula over plain tuple counts, the way it reads."""
    n = sum(len(s) for s in seqs)
    p = (sum(s.count(token) for s in seqs) + 1) / (n + vocab_size)
    history = tuple(history[-(order - 1):]) if order > 1 else ()
    for k in range(1, len(history) + 1):
        h = history[-k:]
        followers = [s[i] for s in seqs for i in range(k, len(s)) if tuple(s[i - k: i]) == h]
        if not followers:
            break
        c = followers.count(token)
        p = max(c - discount, 0) / len(followers) + discount * len(set(followers)) / len(followers) * p
    return p


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_ngram_matches_a_brute_force_count(order):
    rng = np.random.default_rng(order)
    seqs = [rng.integers(0, 5, int(rng.integers(1, 30))).tolist() for _ in range(12)]
    seqs.append([4, 4, 4, 4, 4, 4])
    model = NGramModel(order, vocab_size=7).fit(seqs)
    histories = [[], [4], [4, 4, 4, 4], [6], [2, 6], [0, 1], *[s[: int(rng.integers(0, len(s) + 1))] for s in seqs]]
    for history in histories:
        for token in range(7):
            assert model.prob(history, token) == pytest.approx(
                brute_force_prob(seqs, order, 7, history, token), rel=1e-12)
        assert np.allclose(model.distribution(history), [model.prob(history, t) for t in range(7)], rtol=1e-12)
    expected = -sum(math.log(brute_force_prob(seqs, order, 7, s[:i], s[i])) for s in seqs for i in range(1, len(s)))
    total, count = model.nll(seqs)
    assert count == sum(len(s) - 1 for s in seqs)
    assert total == pytest.approx(expected, rel=1e-12)


def test_ngram_token_probs_equal_prob_position_by_position():
    rng = np.random.default_rng(7)
    train = [rng.integers(0, 9, 60) for _ in range(8)]  # numpy arrays are accepted as sequences
    model = NGramModel(4, vocab_size=10).fit(train)
    held_out = rng.integers(0, 10, 80)  # includes a token never seen in training
    probs = model.token_probs(held_out)
    assert probs.tolist() == [model.prob(held_out[max(0, i - 3): i].tolist(), int(held_out[i]))
                              for i in range(1, len(held_out))]


def test_ngram_fit_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="0..7"):
        NGramModel(3, vocab_size=8).fit([[1, 2, 8]])
    with pytest.raises(ValueError):
        NGramModel(0, vocab_size=8)
