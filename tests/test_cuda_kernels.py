"""The WKV-7 CUDA kernels against the float64 reference loop (kernels.reference.wkv7_naive).

Needs a CUDA GPU and a CUDA toolkit (nvcc): `pytest -m cuda tests/test_cuda_kernels.py`.
Skipped when torch sees no GPU; on a GPU machine a failed kernel build fails the tests, with
the reason from kernels.cuda_build.cuda_status().
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kernels import cuda_build, cuda_ops, dispatch, reference
from kernels.reference import wkv7_naive

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
# Relative error bounds (max abs error / max abs reference value). float32 kernels accumulate in
# float32; bfloat16 inputs are compared with the oracle run on the same rounded values, so the
# bound covers bfloat16 rounding of the outputs and gradients (8 significant bits).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

# (B, T, H, N): T below, at, and off multiples of the 16-step chunk; every compiled head size.
SHAPES = [
    (1, 1, 1, 64),
    (2, 15, 3, 64),
    (2, 16, 2, 64),
    (1, 37, 2, 64),
    (2, 100, 4, 64),
    (1, 45, 2, 32),
    (1, 40, 2, 128),
]


@pytest.fixture(scope="module", autouse=True)
def extension():
    module = cuda_build.load_extension()
    if module is None:
        pytest.fail(cuda_build.cuda_status())
    return module


def wkv_inputs(B, T, H, N, seed=0):
    """float64 inputs shaped as RWKV-7 makes them: w <= -0.5, a = -kk, b = kk * gate."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = -F.softplus(-2 * torch.randn(B, T, H, N, generator=g, dtype=torch.float64)) - 0.5
    kk = F.normalize(torch.randn(B, T, H, N, generator=g, dtype=torch.float64), dim=-1)
    gate = torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=torch.float64))
    state0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    return [t.to(DEVICE) for t in (r, w, k, v, -kk, kk * gate)], state0.to(DEVICE)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def oracle(x, state0, dy, dstate):
    """float64 outputs and gradients of sum(y * dy) + sum(state_T * dstate)."""
    leaves = [t.detach().double().requires_grad_() for t in x]
    s0 = None if state0 is None else state0.detach().double().requires_grad_()
    y, s = wkv7_naive(*leaves, s0)
    ((y * dy).sum() + (s * dstate).sum()).backward()
    grads = [t.grad for t in leaves] + [None if s0 is None else s0.grad]
    return y.detach(), s.detach(), grads


def kernel_run(x, state0, dy, dstate):
    leaves = [t.detach().clone().requires_grad_() for t in x]
    s0 = None if state0 is None else state0.detach().clone().requires_grad_()
    y, s = cuda_ops.wkv7_cuda(*leaves, s0)
    ((y.double() * dy).sum() + (s.double() * dstate).sum()).backward()
    grads = [t.grad for t in leaves] + [None if s0 is None else s0.grad]
    return y.detach(), s.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}N{}".format(*s))
def test_wkv7_cuda_matches_float64_oracle(shape, with_state, dtype):
    B, T, H, N = shape
    x, s0 = wkv_inputs(*shape, seed=T * 7 + N)
    x = [t.to(dtype) for t in x]  # the oracle sees exactly the kernel's (rounded) inputs
    s0 = s0.float() if with_state else None
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64).to(DEVICE)
    dstate = torch.randn(B, H, N, N, generator=g, dtype=torch.float64).to(DEVICE)

    y_ref, s_ref, grads_ref = oracle(x, s0, dy, dstate)
    y, s, grads = kernel_run(x, s0, dy, dstate)

    assert y.dtype == dtype and s.dtype == torch.float32
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(s, s_ref) < tol
    names = ["r", "w", "k", "v", "a", "b", "state0"]
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        if want is None:
            assert got is None, name
            continue
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < tol, f"d{name}: {rel_err(got, want):.2e}"


def test_wkv7_cuda_gradient_of_state_only():
    """Loss on the final state alone: y's gradient never arrives and dr must be zero."""
    x, s0 = wkv_inputs(1, 33, 2, 64, seed=4)
    x, s0 = [t.float() for t in x], s0.float()
    dstate = torch.randn(1, 2, 64, 64, dtype=torch.float64, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in x]
    _, s = cuda_ops.wkv7_cuda(*leaves, s0)
    (s.double() * dstate).sum().backward()
    _, _, grads_ref = oracle(x, s0, torch.zeros(1, 33, 2, 64, dtype=torch.float64, device=DEVICE), dstate)
    assert torch.equal(leaves[0].grad, torch.zeros_like(leaves[0]))
    for got, want in zip([t.grad for t in leaves[1:]], grads_ref[1:6], strict=True):
        assert rel_err(got, want) < TOL[torch.float32]


def test_wkv7_cuda_is_repeatable():
    x, s0 = wkv_inputs(2, 50, 2, 64, seed=5)
    x, s0 = [t.to(torch.bfloat16) for t in x], s0.float()
    dy = torch.randn(2, 50, 2, 64, dtype=torch.float64, device=DEVICE)
    dstate = torch.randn(2, 2, 64, 64, dtype=torch.float64, device=DEVICE)
    first = kernel_run(x, s0, dy, dstate)
    second = kernel_run(x, s0, dy, dstate)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("w_value", [-0.5, -8.0], ids=["fast_decay", "slow_decay"])
def test_wkv7_cuda_long_sequence_stays_finite(w_value):
    B, T, H, N = 1, 2048, 2, 64
    x, s0 = wkv_inputs(B, T, H, N, seed=6)
    x = [t.to(torch.bfloat16) for t in x]
    x[1] = torch.full_like(x[1], w_value)
    leaves = [t.clone().requires_grad_() for t in x]
    y, s = cuda_ops.wkv7_cuda(*leaves, s0.float())
    (y.float().square().mean() + s.square().mean()).backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(t.grad.float()).all() for t in leaves)
    y_ref, s_ref = wkv7_naive(*[t.double() for t in x], s0.float().double())
    assert rel_err(y, y_ref) < TOL[torch.bfloat16]


def test_wkv7_cuda_without_grad_matches_with_grad():
    x, s0 = wkv_inputs(2, 40, 2, 64, seed=7)
    x, s0 = [t.float() for t in x], s0.float()
    with torch.no_grad():
        y_inf, s_inf = cuda_ops.wkv7_cuda(*x, s0)
    y_train, s_train = cuda_ops.wkv7_cuda(*[t.clone().requires_grad_() for t in x], s0)
    assert torch.equal(y_inf, y_train.detach()) and torch.equal(s_inf, s_train.detach())


def test_wkv7_cuda_accepts_mixed_dtypes_and_strides():
    """As the model calls it under autocast: bf16 projections, float32 decay, strided views."""
    x, s0 = wkv_inputs(2, 30, 2, 64, seed=8)
    r, w, k, v, a, b = x
    bf = [t.to(torch.bfloat16) for t in (r, k, v, a, b)]
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in bf]  # same values, other strides
    assert not strided[0].is_contiguous()
    y, s = cuda_ops.wkv7_cuda(strided[0], w.float(), *strided[1:], s0.float())
    w_bf = w.to(torch.bfloat16)  # the kernel computes in the type of r
    ref_inputs = [bf[0].double(), w_bf.double(), *[t.double() for t in bf[1:]]]
    y_ref, s_ref = wkv7_naive(*ref_inputs, s0.float().double())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < TOL[torch.bfloat16] and rel_err(s, s_ref) < TOL[torch.bfloat16]


def test_dispatch_on_cuda_uses_the_kernels():
    x, s0 = wkv_inputs(2, 37, 2, 64, seed=9)
    x, s0 = [t.float() for t in x], s0.float()
    y, s = dispatch.wkv7(*x, s0)
    y_cuda, s_cuda = cuda_ops.wkv7_cuda(*x, s0)
    assert torch.equal(y, y_cuda) and torch.equal(s, s_cuda)
    y_ref, s_ref = reference.wkv7_chunked(*x, s0)
    assert rel_err(y, y_ref) < TOL[torch.float32]


def test_dispatch_falls_back_for_a_head_size_without_kernel(caplog):
    x, s0 = wkv_inputs(1, 20, 2, 16, seed=10)
    x, s0 = [t.float() for t in x], s0.float()
    with caplog.at_level(logging.WARNING, logger="kernels.dispatch"):
        y, s = dispatch.wkv7(*x, s0)
        dispatch.wkv7(*x, s0)
    y_ref, s_ref = reference.wkv7_chunked(*x, s0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    assert len([r for r in caplog.records if "head size 16" in r.getMessage()]) <= 1


# ------------------------------------------------------------------------------------------------
# Single step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [32, 64, 128])
def test_step_matches_float64_reference(N, dtype):
    B, H = 5, 3
    x, s0 = wkv_inputs(B, 1, H, N, seed=N)
    inputs = [t[:, 0].to(dtype) for t in x]
    state_ref = s0.float().double()
    y_ref = reference.wkv7_step_(*[t.double() for t in inputs], state_ref)
    state = s0.float()
    y = cuda_ops.wkv7_step_cuda_(*inputs, state)
    assert y.dtype == torch.float32 and y.shape == (B, H, N)
    # Inputs are the same rounded values, and the step computes in float32 throughout.
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(state, state_ref) < TOL[torch.float32]


def test_steps_reproduce_the_sequence_kernel():
    B, T, H, N = 3, 24, 2, 64
    x, s0 = wkv_inputs(B, T, H, N, seed=11)
    x, s0 = [t.float() for t in x], s0.float()
    with torch.no_grad():
        y_seq, s_seq = cuda_ops.wkv7_cuda(*x, s0)
    state = s0.clone()
    ys = [cuda_ops.wkv7_step_cuda_(*[t[:, i] for t in x], state) for i in range(T)]
    assert torch.allclose(torch.stack(ys, dim=1), y_seq, rtol=1e-5, atol=1e-5)
    assert torch.allclose(state, s_seq, rtol=1e-5, atol=1e-5)


def test_step_updates_a_strided_state_in_place():
    B, H, N = 2, 2, 64
    x, s0 = wkv_inputs(B, 1, H, N, seed=12)
    inputs = [t[:, 0].float() for t in x]
    big = torch.zeros(B, 2 * H, N, N, device=DEVICE)
    state = big[:, ::2]  # every other head: a non-contiguous view
    state.copy_(s0.float())
    expected = s0.float().clone()
    y_ref = reference.wkv7_step_(*inputs, expected)
    y = dispatch.wkv7_step_(*inputs, state)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(big[:, ::2], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(big[:, 1::2], torch.zeros_like(big[:, 1::2]))


def test_dispatch_step_with_gradients_uses_the_reference(caplog):
    B, H, N = 2, 2, 64
    x, s0 = wkv_inputs(B, 1, H, N, seed=13)
    inputs = [t[:, 0].float().requires_grad_() for t in x]
    state, state_ref = s0.float(), s0.float()
    with caplog.at_level(logging.WARNING, logger="kernels.dispatch"):
        y = dispatch.wkv7_step_(*inputs, state)
    with torch.no_grad():
        y_ref = reference.wkv7_step_(*inputs, state_ref)
    assert torch.equal(y.detach(), y_ref) and torch.equal(state.detach(), state_ref)
    assert y.requires_grad  # the reference ran (the CUDA step would return a plain tensor)
