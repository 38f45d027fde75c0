"""The WKV-7 CUDA kernels as PyTorch functions: the sequence operator with autograd, and the
in-place single step for inference.

Both need the compiled extension (kernels.cuda_build) and CUDA tensors; kernels.dispatch decides
when to call them. Inputs may be float32 or bfloat16 (other float types run in float32); the
state is always float32.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from kernels import cuda_build
from kernels.errors import CudaKernelsUnavailableError, KernelError

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _extension() -> ModuleType:
    module = cuda_build.load_extension()
    if module is None:
        outcome = cuda_build.cached_outcome()
        raise CudaKernelsUnavailableError(outcome.reason if outcome else "not built")
    return module


def supports_head_size(head_size: int) -> bool:
    """Whether the compiled kernels cover this head size (loads the extension)."""
    return _extension().supports_head_size(head_size)


def _kernel_dtype(r: Tensor) -> torch.dtype:
    return r.dtype if r.dtype in KERNEL_DTYPES else torch.float32


class _Wkv7Sequence(torch.autograd.Function):
    """y, state_T = WKV-7 over [B, T, H, N] inputs; the backward pass is the CUDA kernel too."""

    @staticmethod
    def forward(ctx: FunctionCtx, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                state0: Tensor | None) -> tuple[Tensor, Tensor]:
        y, state_T, checkpoints, sa = _extension().forward(r, w, k, v, a, b, state0, True)
        ctx.save_for_backward(r, w, k, v, a, b, checkpoints, sa)
        ctx.has_state0 = state0 is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return y, state_T

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: Tensor | None, dstate_T: Tensor | None) -> tuple[Tensor | None, ...]:
        r, w, k, v, a, b, checkpoints, sa = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        dstate_T = None if dstate_T is None else dstate_T.float().contiguous()
        need_dstate0 = ctx.has_state0 and ctx.needs_input_grad[6]
        dr, dw, dk, dv, da, db, dstate0 = _extension().backward(
            r, w, k, v, a, b, dy, dstate_T, checkpoints, sa, need_dstate0)
        return dr, dw, dk, dv, da, db, (dstate0 if need_dstate0 else None)


def wkv7_cuda(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """WKV-7 over a sequence on the GPU, differentiable in every input.

    r, w, k, v, a, b: [B, T, H, N] CUDA tensors (w the log-log decay); state0: [B, H, N, N] or
    None for zeros. Returns y [B, T, H, N] (dtype of r) and the final state [B, H, N, N] float32.
    """
    dtype = _kernel_dtype(r)
    inputs = [x.to(dtype).contiguous() for x in (r, w, k, v, a, b)]
    s0 = None if state0 is None else state0.float().contiguous()
    if torch.is_grad_enabled() and any(x.requires_grad for x in (r, w, k, v, a, b, state0) if x is not None):
        y, state_T = _Wkv7Sequence.apply(*inputs, s0)
    else:  # inference (prefill): no checkpoints to save
        y, state_T, _, _ = _extension().forward(*inputs, s0, False)
    return y.to(r.dtype), state_T


def wkv7_step_cuda_(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor
) -> Tensor:
    """One token for B streams on the GPU: inputs [B, H, N]; `state` [B, H, N, N] float32 is
    updated in place. Returns y [B, H, N] float32. Not differentiable (inference only)."""
    if state.dtype != torch.float32:
        raise KernelError(f"the CUDA step keeps float32 states, got {state.dtype}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (r, w, k, v, a, b, state)):
        raise KernelError("the CUDA step has no backward pass; use the sequence operator for training")
    dtype = _kernel_dtype(r)
    inputs = [x.to(dtype).contiguous() for x in (r, w, k, v, a, b)]
    if state.is_contiguous():
        return _extension().step_(*inputs, state)
    work = state.contiguous()
    y = _extension().step_(*inputs, work)
    state.copy_(work)
    return y
