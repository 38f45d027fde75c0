"""WKV-7 in plain PyTorch: the oracle loop, a chunked form with autograd (the CPU path), one step.

The operator, per batch element and head, with the state S[i, j] indexed (value i, key j):

    d_t = exp(-exp(w_t))                                          decay, over the key index
    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

RWKV-7 passes a = -kk and b = kk * a_gate (a rank-one "delta rule" correction) and soft-clamps
w <= -0.5, so every d lies in (exp(-exp(-0.5)), 1) = (0.545, 1). The chunked form relies on
that: within a chunk of 16 steps the cumulative decay stays above 0.545**16 ~ 6e-5, so the
divided-out decays below never overflow float32.

Shapes: r, w, k, v, a, b are [B, T, H, N]; states are [B, H, N, N] float32 (float64 allowed).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_LEN = 16


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def wkv7_naive(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The oracle: one time step after another, exactly as the equations read.

    Returns y [B, T, H, N] (dtype of r) and the final state [B, H, N, N].
    """
    B, T, H, N = r.shape
    dt = _compute_dtype(r)
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    S = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state0 is None else state0.to(dt)
    decay = torch.exp(-torch.exp(w))
    ys = []
    for t in range(T):
        sa = S @ a[:, t, :, :, None]  # [B, H, N, 1]
        S = S * decay[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None])[..., 0])
    y = torch.stack(ys, dim=1) if ys else torch.zeros_like(r)
    return y.to(r.dtype), S


def wkv7_chunked(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The same operator, computed a chunk of 16 steps at a time with batched matmuls.

    Differentiable in every input (plain autograd). Within a chunk, with cumulative log decay
    G_t = sum_{s<=t} log d_s and the state S0 at the chunk start, the row-vector recurrence
    unrolls to
        c_t = S_{t-1} a_t = S0 â_t + sum_{s<t} c_s (b̂_s . â_t) + v_s (k̂_s . â_t)
        y_t = S0 r̂_t + sum_{s<=t} c_s (b̂_s . r̂_t) + v_s (k̂_s . r̂_t)
    with â_t = a_t e^{G_{t-1}}, r̂_t = r_t e^{G_t}, b̂_s = b_s e^{-G_s}, k̂_s = k_s e^{-G_s}.
    The first line is a unit lower-triangular system for all c at once. Everything but the
    chunk-to-chunk state hand-over (one matmul per chunk) runs in parallel over chunks.
    Returns y [B, T, H, N] (dtype of r) and the final state [B, H, N, N].
    """
    B, T, H, N = r.shape
    dt = _compute_dtype(r)
    L = CHUNK_LEN
    n_chunks = max(1, -(-T // L))
    pad = n_chunks * L - T

    def prep(x: Tensor, fill: float = 0.0) -> Tensor:
        # [B, T, H, N] -> [B, H, n_chunks, L, N]; padded steps are identities (d=1, no update).
        x = x.to(dt)
        if pad:
            x = torch.cat([x, x.new_full((B, pad, H, N), fill)], dim=1)
        return x.view(B, n_chunks, L, H, N).permute(0, 3, 1, 2, 4)

    r_, k_, v_, a_, b_ = (prep(x) for x in (r, k, v, a, b))
    log_d = prep(-torch.exp(w.to(dt)))  # padding: log d = 0
    G = log_d.cumsum(dim=-2)  # inclusive
    G_prev = G - log_d  # exclusive
    G_end = G[..., -1:, :]  # [B, H, C, 1, N]

    a_hat = a_ * torch.exp(G_prev)
    r_hat = r_ * torch.exp(G)
    b_hat = b_ * torch.exp(-G)
    k_hat = k_ * torch.exp(-G)

    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)
    zero = torch.zeros((), dtype=dt, device=r.device)
    A_ab = torch.where(strict, a_hat @ b_hat.transpose(-1, -2), zero)  # [.., L, L]
    A_ak = torch.where(strict, a_hat @ k_hat.transpose(-1, -2), zero)
    A_rb = torch.where(incl, r_hat @ b_hat.transpose(-1, -2), zero)
    A_rk = torch.where(incl, r_hat @ k_hat.transpose(-1, -2), zero)

    # Solve (I - A_ab) [W1 | U] = [â | A_ak V]: c = W1 S0^T + U for every chunk at once.
    # A_ab is strictly lower triangular, so (I - A_ab)^-1 = I + A + ... + A^(L-1), computed as
    # (I + A)(I + A^2)(I + A^4)(I + A^8): a few batched matmuls instead of many tiny LAPACK
    # solves (which cost ~100x more on CPU for 16x16 systems).
    inverse = _unit_lower_inverse(A_ab)
    W1 = inverse @ a_hat
    U = inverse @ (A_ak @ v_)

    # y = P S0^T + Q and S_next = S0 E + F, with P, Q, E, F independent of S0.
    P = r_hat + A_rb @ W1  # [.., L, N_key]
    Q = A_rb @ U + A_rk @ v_  # [.., L, N_value]
    decay_end = torch.exp(G_end)  # [.., 1, N_key]
    E = (torch.eye(N, dtype=dt, device=r.device) + W1.transpose(-1, -2) @ b_hat) * decay_end  # [.., N_key, N_key]
    F = (U.transpose(-1, -2) @ b_hat + v_.transpose(-1, -2) @ k_hat) * decay_end  # [.., N_v, N_key]

    S = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state0 is None else state0.to(dt)
    starts = []
    # unbind once: indexing E[:, :, c] in the loop would make autograd write a full-size zero
    # gradient per chunk (quadratic in the number of chunks).
    for E_c, F_c in zip(E.unbind(2), F.unbind(2)):
        starts.append(S)
        S = S @ E_c + F_c
    S_starts = torch.stack(starts, dim=2)  # [B, H, C, N_v, N_key]
    y = P @ S_starts.transpose(-1, -2) + Q  # [B, H, C, L, N_v]
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * L, H, N)[:, :T]
    return y.to(r.dtype), S


def _unit_lower_inverse(A: Tensor) -> Tensor:
    """(I - A)^-1 for strictly lower-triangular A [..., L, L] (L a power of two), by products."""
    L = A.shape[-1]
    inverse = torch.eye(L, dtype=A.dtype, device=A.device) + A
    power = A
    for _ in range(max(0, L.bit_length() - 2)):
        power = power @ power
        inverse = inverse + inverse @ power
    return inverse


def wkv7_step_(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor) -> Tensor:
    """One time step for B streams, updating `state` [B, H, N, N] in place; inputs are [B, H, N].

    Returns y [B, H, N] in the state's dtype. Both rank-one updates go through one batched
    matmul so a step costs a handful of kernel launches.
    """
    Bsz, H, N = r.shape
    S = state.view(Bsz * H, N, N)
    dt = state.dtype
    a, b, k, v, r = (x.to(dt).reshape(Bsz * H, N) for x in (a, b, k, v, r))
    decay = torch.exp(-torch.exp(w.to(dt))).view(Bsz * H, 1, N)
    sa = torch.bmm(S, a.unsqueeze(-1))  # [BH, N, 1], uses S_{t-1}
    left = torch.cat([sa, v.unsqueeze(-1)], dim=-1)  # [BH, N, 2]
    right = torch.stack([b, k], dim=1)  # [BH, 2, N]
    S.mul_(decay).baddbmm_(left, right)
    return torch.bmm(S, r.unsqueeze(-1)).view(Bsz, H, N)
