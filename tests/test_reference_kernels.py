"""The PyTorch WKV-7 reference: chunked form and single step against the naive loop."""

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import CHUNK_LEN, wkv7_chunked, wkv7_naive, wkv7_step_


def wkv_inputs(B, T, H, N, dtype=torch.float64, seed=0):
    """Inputs shaped as RWKV-7 makes them: w soft-clamped below -0.5, a = -kk, b = kk * gate."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    w = -F.softplus(-2 * torch.randn(B, T, H, N, generator=g, dtype=dtype)) - 0.5
    kk = F.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    gate = torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=dtype))
    state0 = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return [r, w, k, v, -kk, kk * gate], state0


@pytest.mark.parametrize("T", [1, 15, CHUNK_LEN, 37, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_naive_values(T, with_state):
    x, s0 = wkv_inputs(2, T, 3, 16)
    s0 = s0 if with_state else None
    y_ref, s_ref = wkv7_naive(*x, s0)
    y, s = wkv7_chunked(*x, s0)
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(s, s_ref, rtol=1e-10, atol=1e-10)


def test_chunked_float32_close_to_float64_oracle():
    x, s0 = wkv_inputs(2, 100, 2, 64)
    y_ref, s_ref = wkv7_naive(*x, s0)
    y, s = wkv7_chunked(*(t.float() for t in x), s0.float())
    assert float((y.double() - y_ref).abs().max() / y_ref.abs().max()) < 1e-5
    assert float((s.double() - s_ref).abs().max() / s_ref.abs().max()) < 1e-5


def test_chunked_gradcheck_float64():
    x, s0 = wkv_inputs(1, 19, 1, 4, seed=1)
    inputs = [t.clone().requires_grad_() for t in x + [s0]]

    def fn(*args):
        y, s = wkv7_chunked(*args[:6], args[6])
        return y, s

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_chunked_gradients_match_naive_loop():
    x, s0 = wkv_inputs(2, 23, 2, 8, seed=2)
    grads = []
    for fn in (wkv7_naive, wkv7_chunked):
        inputs = [t.clone().requires_grad_() for t in x + [s0]]
        y, s = fn(*inputs[:6], inputs[6])
        (y.square().sum() + (s * s.detach().sin()).sum()).backward()
        grads.append([t.grad for t in inputs])
    for g_naive, g_chunk in zip(*grads):
        assert torch.allclose(g_chunk, g_naive, rtol=1e-9, atol=1e-9)


def test_step_matches_naive_and_updates_in_place():
    x, s0 = wkv_inputs(3, 12, 2, 16)
    y_ref, s_ref = wkv7_naive(*x, s0)
    state = s0.clone()
    address = state.data_ptr()
    ys = [wkv7_step_(*(t[:, i] for t in x), state) for i in range(12)]
    assert state.data_ptr() == address
    assert torch.allclose(torch.stack(ys, 1), y_ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(state, s_ref, rtol=1e-10, atol=1e-10)
