"""An n-gram baseline over REMI token ids: interpolated absolute discounting.

    P(w | h) = max(c(h w) - D, 0) / c(h)  +  D * N1+(h .) / c(h) * P(w | h')
    P(w)     = (c(w) + 1) / (N + V)                          (add-one unigram at the bottom)

h' drops the oldest token of h; a history never seen falls through to h'. It is fitted on the
train split and scored on held-out pieces, each prefixed with BOS as the trainer sees them, to
give the RWKV model's validation NLL a yardstick.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np


class NGramModel:
    def __init__(self, order: int, vocab_size: int, discount: float = 0.75):
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        # counts[k][history tuple of length k][token] for k = 1 .. order-1; unigrams apart.
        self.counts: list[dict[tuple, dict[int, int]]] = [defaultdict(lambda: defaultdict(int))
                                                          for _ in range(order)]
        self.unigram = np.zeros(vocab_size, np.int64)
        self.totals: list[dict[tuple, int]] = [defaultdict(int) for _ in range(order)]

    def fit(self, sequences: Iterable[Sequence[int]]) -> NGramModel:
        for seq in sequences:
            seq = list(map(int, seq))
            np.add.at(self.unigram, seq, 1)
            for k in range(1, self.order):
                table, totals = self.counts[k], self.totals[k]
                for i in range(k, len(seq)):
                    h = tuple(seq[i - k: i])
                    table[h][seq[i]] += 1
                    totals[h] += 1
        self._unigram_p = (self.unigram + 1) / (self.unigram.sum() + self.vocab_size)
        return self

    def with_order(self, order: int) -> NGramModel:
        """The same counts used only up to `order` (the tables of lower orders are shared)."""
        if not 1 <= order <= self.order:
            raise ValueError(f"order must be 1..{self.order}")
        view = NGramModel.__new__(NGramModel)
        view.__dict__.update(self.__dict__)
        view.order = order
        return view

    def _seen_contexts(self, history: Sequence[int]):
        """(count of the context, its followers) for the contexts of `history` that were seen,
        shortest first: the levels the interpolation climbs."""
        history = tuple(history[-(self.order - 1):]) if self.order > 1 else ()
        for k in range(1, len(history) + 1):
            h = history[-k:]
            total = self.totals[k].get(h)
            if not total:
                return
            yield total, self.counts[k][h]

    def prob(self, history: Sequence[int], token: int) -> float:
        """P(token | the last order-1 tokens of history)."""
        p = float(self._unigram_p[token])
        for total, following in self._seen_contexts(history):
            c = following.get(token, 0)
            p = max(c - self.discount, 0) / total + self.discount * len(following) / total * p
        return p

    def distribution(self, history: Sequence[int]) -> np.ndarray:
        """The whole next-token distribution [V] after `history` (sums to 1)."""
        p = self._unigram_p.copy()
        for total, following in self._seen_contexts(history):
            counts = np.zeros(self.vocab_size)
            counts[list(following)] = list(following.values())
            p = np.maximum(counts - self.discount, 0) / total + self.discount * len(following) / total * p
        return p

    def nll(self, sequences: Iterable[Sequence[int]]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of every token after the first, and the count."""
        total, count = 0.0, 0
        for seq in sequences:
            seq = list(map(int, seq))
            for i in range(1, len(seq)):
                total -= math.log(self.prob(seq[max(0, i - self.order + 1): i], seq[i]))
                count += 1
        return total, count
