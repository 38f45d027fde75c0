"""One entry point per WKV-7 operator; picks the CUDA kernels or the PyTorch reference."""

from __future__ import annotations

from torch import Tensor

from kernels import reference


def wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sequence form: inputs [B, T, H, N], state [B, H, N, N] fp32 -> (y [B, T, H, N], final state)."""
    return reference.wkv7_chunked(r, w, k, v, a, b, state0)


def wkv7_step_(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor) -> Tensor:
    """One token for B streams: inputs [B, H, N]; `state` [B, H, N, N] is updated in place."""
    return reference.wkv7_step_(r, w, k, v, a, b, state)
