"""Sampling: a few small pure functions over logits [B, V], no host synchronisation.

Order: grammar mask -> temperature -> top-k -> top-p -> draw. Masked-out ids get -inf, so a
filter can never bring back a token the grammar forbids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0  # > 0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


def apply_mask(logits: Tensor, allowed: Tensor) -> Tensor:
    """logits [B, V], allowed BoolTensor [B, V] or [V] -> logits with forbidden ids at -inf."""
    return logits.masked_fill(~allowed, float("-inf"))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits / max(temperature, 1e-6)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (k <= 0 or k >= V: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly better tokens
    sorted_logits = sorted_logits.masked_fill(before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: Tensor, settings: SamplingSettings, allowed: Tensor | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Draw one id per row: logits [B, V] -> LongTensor [B]."""
    logits = logits.float()
    if allowed is not None:
        logits = apply_mask(logits, allowed)
    logits = apply_top_p(apply_top_k(apply_temperature(logits, settings.temperature), settings.top_k),
                         settings.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
