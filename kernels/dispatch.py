"""One entry point per WKV-7 operator; picks the CUDA kernels or the PyTorch reference.

The CUDA kernels run when every tensor is on a CUDA device, the extension is available
(kernels.cuda_build builds it on the first such call, or logs once why it cannot) and the head
size has a compiled kernel. Everything else takes the reference: the chunked form for sequences,
the batched step for one token. float64 inputs always take the reference (the kernels compute in
float32), and so does a step whose inputs need gradients (the CUDA step has no backward; the
reference step runs forward but, updating the state in place, cannot be differentiated either).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from kernels import cuda_build, reference
from kernels.cuda_ops import wkv7_cuda, wkv7_step_cuda_

log = logging.getLogger(__name__)

_warned_head_sizes: set[int] = set()
_warned_step_grad = False


def _cuda_kernels_fit(tensors: tuple[Tensor | None, ...], head_size: int) -> bool:
    present = [t for t in tensors if t is not None]
    if not all(t.is_cuda for t in present) or any(t.dtype == torch.float64 for t in present):
        return False
    module = cuda_build.load_extension()
    if module is None:
        return False
    if not module.supports_head_size(head_size):
        if head_size not in _warned_head_sizes:
            _warned_head_sizes.add(head_size)
            log.warning("no WKV-7 CUDA kernel for head size %d (compiled: %s); the PyTorch reference "
                        "path is used for it", head_size, ", ".join(map(str, module.HEAD_SIZES)))
        return False
    return True


def wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sequence form: inputs [B, T, H, N], state [B, H, N, N] fp32 -> (y [B, T, H, N], final state)."""
    if _cuda_kernels_fit((r, w, k, v, a, b, state0), r.shape[-1]):
        return wkv7_cuda(r, w, k, v, a, b, state0)
    return reference.wkv7_chunked(r, w, k, v, a, b, state0)


def wkv7_step_(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor) -> Tensor:
    """One token for B streams: inputs [B, H, N]; `state` [B, H, N, N] is updated in place."""
    tensors = (r, w, k, v, a, b, state)
    if state.dtype == torch.float32 and _cuda_kernels_fit(tensors, r.shape[-1]):
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return wkv7_step_cuda_(r, w, k, v, a, b, state)
        global _warned_step_grad
        if not _warned_step_grad:
            _warned_step_grad = True
            log.warning("wkv7_step_ got inputs that need gradients and the CUDA step has no backward, "
                        "so the PyTorch reference step runs; call the step under torch.no_grad() or "
                        "torch.inference_mode() to use the CUDA kernel")
    return reference.wkv7_step_(r, w, k, v, a, b, state)
