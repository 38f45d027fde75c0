"""Low-rank updates (LoRA) of a model's linear weights, for tuning with few trainable numbers.

A parametrization replaces a weight W [out, in] by W + up @ down * scale; `up` starts at zero,
so the model starts exactly as it was. `merge_low_rank` folds the updates into plain weights,
so a tuned model is saved, loaded and run like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

# alpha / rank in the LoRA paper's notation, with alpha = 2 * rank: the update's scale does not
# change with the rank, so a learning rate found at one rank holds at another.
LOW_RANK_SCALE = 2.0


class LowRankDelta(nn.Module):
    """W -> W + up @ down * LOW_RANK_SCALE; down [rank, in] random, up [out, rank] zero."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.up @ self.down) * LOW_RANK_SCALE


def add_low_rank(linears: Iterable[nn.Linear], rank: int, seed: int = 0) -> list[nn.Parameter]:
    """Put a LowRankDelta on each linear's weight; returns the new (trainable) parameters."""
    generator = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    for linear in linears:
        delta = LowRankDelta(linear.out_features, linear.in_features, rank, generator)
        parametrize.register_parametrization(linear, "weight", delta)
        params.extend(delta.parameters())
    return params


def merge_low_rank(linears: Iterable[nn.Linear]) -> None:
    """Fold each linear's low-rank update into its weight (a plain parameter again)."""
    for linear in linears:
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
