"""An n-gram baseline over REMI token ids: interpolated absolute discounting.

    P(w | h) = max(c(h w) - D, 0) / c(h)  +  D * N1+(h .) / c(h) * P(w | h')
    P(w)     = (c(w) + 1) / (N + V)                          (add-one unigram at the bottom)

h' drops the oldest token of h; a history never seen falls through to h'. It is fitted on the
train split and scored on held-out pieces, each prefixed with BOS as the trainer sees them, to
give the RWKV model's validation NLL a yardstick, and sampled under the REMI grammar as a
generation baseline.

Counting is numpy throughout, so millions of tokens fit in seconds. Every history of length k
gets a dense id: its rank among the distinct histories of that length, ordered by the key
(oldest token, id of the history without it). A key never exceeds V x (number of positions), so
any order fits in int64. The (history, next token) pairs of a level are counted as the sorted
keys id * V + token, which keeps each history's followers in one contiguous run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HistoryLevel:
    """The counts of every history of one length k >= 1 seen in the training sequences.

    history_keys: int64 [H] sorted, unique: oldest token x (number of histories of length k-1)
        + id of the shorter history; a history's id is its index here.
    totals: int64 [H] c(h), how often the history was followed by any token.
    distinct: int64 [H] N1+(h .), how many different tokens followed it.
    pair_keys: int64 [P] sorted, unique: history id x V + next token.
    pair_counts: int64 [P] c(h w).
    """

    history_keys: np.ndarray
    totals: np.ndarray
    distinct: np.ndarray
    pair_keys: np.ndarray
    pair_counts: np.ndarray

    def __len__(self) -> int:
        return len(self.history_keys)


def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `keys` [n] in `sorted_keys` and a bool [n] saying which were found."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    index = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return index, sorted_keys[index] == keys


class NGramModel:
    def __init__(self, order: int, vocab_size: int, discount: float = 0.75):
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.unigram = np.zeros(vocab_size, np.int64)
        self._unigram_p = np.full(vocab_size, 1.0 / vocab_size)
        self.levels: list[HistoryLevel] = []  # levels[k - 1]: histories of length k, k = 1 .. order-1

    def fit(self, sequences: Iterable[Sequence[int] | np.ndarray]) -> NGramModel:
        """Count the sequences (replacing any earlier fit); each is scored from its own start."""
        arrays = [np.asarray(seq, dtype=np.int64).reshape(-1) for seq in sequences]
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}")
        V = self.vocab_size
        self.unigram = np.bincount(flat, minlength=V).astype(np.int64)
        self._unigram_p = (self.unigram + 1) / (self.unigram.sum() + V)
        lengths = np.array([len(a) for a in arrays], np.int64)
        starts = np.cumsum(lengths) - lengths
        position = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, lengths)  # [N] index within its sequence

        self.levels = []
        history_id = np.zeros(len(flat), np.int64)  # id of the history of length k-1 ending before each position
        n_shorter = 1  # the empty history is the only history of length 0
        for k in range(1, self.order):
            at = np.flatnonzero(position >= k)
            keys = flat[at - k] * n_shorter + history_id[at]
            history_keys, ids = np.unique(keys, return_inverse=True)
            pair_keys, pair_counts = np.unique(ids * V + flat[at], return_counts=True)
            self.levels.append(HistoryLevel(
                history_keys=history_keys,
                totals=np.bincount(ids, minlength=len(history_keys)).astype(np.int64),
                distinct=np.bincount(pair_keys // V, minlength=len(history_keys)).astype(np.int64),
                pair_keys=pair_keys,
                pair_counts=pair_counts.astype(np.int64),
            ))
            history_id = np.full(len(flat), -1, np.int64)
            history_id[at] = ids
            n_shorter = len(history_keys)
        return self

    def with_order(self, order: int) -> NGramModel:
        """The same counts used only up to `order` (the tables of lower orders are shared)."""
        if not 1 <= order <= self.order:
            raise ValueError(f"order must be 1..{self.order}")
        view = NGramModel.__new__(NGramModel)
        view.__dict__.update(self.__dict__)
        view.order = order
        view.levels = self.levels[: order - 1]
        return view

    def _seen_contexts(self, history: Sequence[int]) -> Iterator[tuple[HistoryLevel, int]]:
        """(level, history id) for the contexts of `history` that were seen, shortest first:
        the levels the interpolation climbs. A longer context of an unseen one is unseen too."""
        history = list(history[-(self.order - 1):]) if self.order > 1 else []
        history_id, n_shorter = 0, 1
        for k, level in enumerate(self.levels[: len(history)], start=1):
            key = int(history[-k]) * n_shorter + history_id
            index = int(np.searchsorted(level.history_keys, key))
            if index == len(level) or level.history_keys[index] != key:
                return
            yield level, index
            history_id, n_shorter = index, len(level)

    def _count(self, level: HistoryLevel, history_id: int, token: int) -> int:
        key = history_id * self.vocab_size + int(token)
        index = int(np.searchsorted(level.pair_keys, key))
        if index < len(level.pair_keys) and level.pair_keys[index] == key:
            return int(level.pair_counts[index])
        return 0

    def prob(self, history: Sequence[int], token: int) -> float:
        """P(token | the last order-1 tokens of history)."""
        p = float(self._unigram_p[token])
        for level, h in self._seen_contexts(history):
            total, distinct = int(level.totals[h]), int(level.distinct[h])
            c = self._count(level, h, token)
            p = max(c - self.discount, 0) / total + self.discount * distinct / total * p
        return p

    def distribution(self, history: Sequence[int]) -> np.ndarray:
        """The whole next-token distribution float64 [V] after `history` (sums to 1)."""
        V = self.vocab_size
        p = self._unigram_p.copy()
        for level, h in self._seen_contexts(history):
            lo, hi = np.searchsorted(level.pair_keys, [h * V, (h + 1) * V])
            counts = np.zeros(V)
            counts[level.pair_keys[lo:hi] - h * V] = level.pair_counts[lo:hi]
            total, distinct = int(level.totals[h]), int(level.distinct[h])
            p = np.maximum(counts - self.discount, 0) / total + self.discount * distinct / total * p
        return p

    def token_probs(self, sequence: Sequence[int] | np.ndarray) -> np.ndarray:
        """P(sequence[i] | sequence[:i]) for every i >= 1: float64 [len - 1], all at once."""
        seq = np.asarray(sequence, dtype=np.int64).reshape(-1)
        V = self.vocab_size
        p = self._unigram_p[seq]
        history_id = np.zeros(len(seq), np.int64)
        alive = np.ones(len(seq), bool)  # every shorter context of this position was seen
        position = np.arange(len(seq))
        n_shorter = 1
        for k, level in enumerate(self.levels, start=1):
            alive &= position >= k
            at = np.flatnonzero(alive)
            index, seen = _find(level.history_keys, seq[at - k] * n_shorter + history_id[at])
            alive[at[~seen]] = False
            at, h = at[seen], index[seen]
            history_id[at] = h
            pair, paired = _find(level.pair_keys, h * V + seq[at])
            c = np.where(paired, level.pair_counts[pair], 0)
            total, distinct = level.totals[h], level.distinct[h]
            # The same operations in the same order as `prob`, so both give the same floats.
            p[at] = np.maximum(c - self.discount, 0) / total + self.discount * distinct / total * p[at]
            n_shorter = len(level)
        return p[1:]

    def nll(self, sequences: Iterable[Sequence[int] | np.ndarray]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of every token after the first, and the count."""
        total, count = 0.0, 0
        for seq in sequences:
            probs = self.token_probs(seq)
            total -= math.fsum(np.log(probs))
            count += len(probs)
        return total, count
