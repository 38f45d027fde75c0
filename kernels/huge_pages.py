"""Memory on 2 MB pages for what the CPU step reads every token.

A token at L12-D512 bf16 streams 81 MB of packed weights. On 4 KB pages that is 20,000 page
translations a token, and the hardware prefetcher starts over at every 4 KB boundary; on 2 MB
pages both mostly go away. On the 2-core Zen 2 machine of docs/cpu-step.md a plain read of
80 MB ran 10 % faster on 2 MB pages and the bf16 matvec 12-15 % faster.

Linux gives an anonymous mapping 2 MB pages ("transparent huge pages") when the mapping asks
for them with madvise(MADV_HUGEPAGE) and the system allows it (/sys/kernel/mm/
transparent_hugepage/enabled set to "madvise" or "always"). Elsewhere, or when no 2 MB page is
free, the same calls give ordinary memory: nothing here is needed for correctness.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np
import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor placed by `gather` starts on a cache line


def huge_page_bytes(nbytes: int) -> Tensor:
    """A zeroed uint8 tensor [nbytes] starting on a 2 MB boundary, in memory that asks the
    kernel for 2 MB pages. The tensor keeps its mapping alive."""
    size = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to align the start
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Without MADV_HUGEPAGE (not Linux) or with a kernel built without transparent huge
    # pages, the mapping keeps ordinary pages: slower to stream, the same values.
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mapping.madvise(mmap.MADV_HUGEPAGE)
    array = np.frombuffer(mapping, dtype=np.uint8)
    start = (-array.ctypes.data) % HUGE_PAGE
    return torch.from_numpy(array[start:start + nbytes])


def huge_page_floats(n: int) -> Tensor:
    """A float32 tensor [n] of ones on 2 MB pages (the read pass's buffer, placed as the
    weights are, so that the floor is read from the same kind of memory)."""
    return huge_page_bytes(4 * n).view(torch.float32).fill_(1.0)


def gather(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of `tensors` (contiguous, CPU) placed one after another in one buffer on 2 MB
    pages, each on a cache line, with the same dtypes, shapes and values."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end = -(-(end + t.nbytes) // ALIGN) * ALIGN
    buffer = huge_page_bytes(end)
    placed = []
    for t, at in zip(tensors, offsets, strict=True):
        copy = buffer[at:at + t.nbytes].view(t.dtype).view(t.shape)
        copy.copy_(t)
        placed.append(copy)
    return placed
