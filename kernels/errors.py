"""Errors raised by the kernels package."""

from __future__ import annotations


class KernelError(Exception):
    """Base class for every error the kernels package raises."""


class CudaKernelsUnavailableError(KernelError):
    """The compiled WKV-7 CUDA kernels were asked for directly but could not be loaded."""

    def __init__(self, reason: str):
        super().__init__(f"WKV-7 CUDA kernels unavailable: {reason}")
        self.reason = reason


class MsvcNotFoundError(KernelError):
    """No usable Microsoft C++ compiler environment could be set up (Windows only)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
