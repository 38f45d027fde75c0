"""RWKV-7 ("x070", BlinkDL's RWKV-LM) for symbolic music: parallel forward, recurrent step, State.

Read bottom-up: the config, the recurrent State, the time mix (attention-like WKV part), the
channel mix (MLP), the block, then the model. Parameter names and shapes follow BlinkDL's
layout (`blocks.0.att.x_r`, `blocks.0.att.w1`, ...) except that per-channel vectors are stored
1-D ([C] instead of [1, 1, C]); `model.interop` converts to and from the original layout.

The same weights run two ways:
- `forward`/`features` over a whole sequence [B, T] through the chunked WKV operator (training,
  prefill), optionally starting from and returning a State;
- `step` on one token per stream [B] updating a State in place (live inference, O(1) memory).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kernels.cpu_step import cpu_step_kernel
from kernels.dispatch import wkv7, wkv7_step_

# GroupNorm epsilon of the WKV output, from RWKV-LM's x070 (ln_x): larger than the default
# because each group is one 64-wide head.
LN_X_EPS = 64e-5
# e^-0.5: the decay w = -softplus(-z) - 0.5 soft-clamps log-log decay below -0.5, and
# exp(-exp(w)) = exp(-e^-0.5 * sigmoid(z)), the cheaper form the step uses.
EXP_MINUS_HALF = math.exp(-0.5)


def lora_rank(n_embd: int, factor: float, power: float) -> int:
    """The published RWKV-7 LoRA size rule: factor * C**power rounded to a multiple of 32, >= 32."""
    return max(32, int(round(factor * n_embd**power / 32) * 32))


@dataclass
class ModelConfig:
    """Architecture of an RWKV-7 network. LoRA ranks default to the RWKV-7 paper's formulas."""

    n_layer: int = 6
    n_embd: int = 256
    vocab_size: int = 380
    head_size: int = 64
    d_decay: int = 0  # 0: from the formula max(32, round(1.8 sqrt(C) / 32) * 32)
    d_aaa: int = 0  # same formula as d_decay
    d_mv: int = 0  # max(32, round(1.3 sqrt(C) / 32) * 32)
    d_gate: int = 0  # max(32, round(0.6 C^0.8 / 32) * 32)
    ffn_mult: int = 4  # channel-mix hidden size = ffn_mult * C
    # A learned initial State (`rwkv-music tune --method state`): the conversation starts from
    # it instead of zeros. Stored as the tensors state0.shift and state0.wkv.
    learned_state: bool = False

    def __post_init__(self) -> None:
        from model.settings import ConfigError

        for name in ("n_layer", "n_embd", "vocab_size", "head_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} = {getattr(self, name)}: must be >= 1")
        if self.n_embd % self.head_size:
            raise ConfigError(
                f"model.n_embd = {self.n_embd}: must be a multiple of head_size ({self.head_size})"
            )
        self.d_decay = self.d_decay or lora_rank(self.n_embd, 1.8, 0.5)
        self.d_aaa = self.d_aaa or lora_rank(self.n_embd, 1.8, 0.5)
        self.d_mv = self.d_mv or lora_rank(self.n_embd, 1.3, 0.5)
        self.d_gate = self.d_gate or lora_rank(self.n_embd, 0.6, 0.8)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class State:
    """Recurrent state of B streams; always float32, fixed shapes, updated in place by `step`.

    shift: [n_layer, 2, B, C]  the previous token's normalised input to the time mix (0) and
                               to the channel mix (1), for token shift
    wkv:   [n_layer, B, H, N, N] the WKV matrix state of every head (value index, key index)
    """

    shift: Tensor
    wkv: Tensor

    @property
    def batch_size(self) -> int:
        return self.shift.shape[2]

    def clone(self) -> State:
        return State(self.shift.clone(), self.wkv.clone())

    def __getitem__(self, index: int | slice | list[int] | Tensor) -> State:
        """The streams at `index` (a batch index, slice or list) as a new State (copies)."""
        if isinstance(index, int):
            index = [index]
        return State(self.shift[:, :, index].clone(), self.wkv[:, index].clone())

    def repeat(self, n: int) -> State:
        """Each stream repeated n times (e.g. one context fanned out into n variations)."""
        return State(self.shift.repeat_interleave(n, dim=2), self.wkv.repeat_interleave(n, dim=1))

    @staticmethod
    def cat(states: list[State]) -> State:
        """Stack several States along the batch dimension."""
        return State(torch.cat([s.shift for s in states], dim=2), torch.cat([s.wkv for s in states], dim=1))

    def copy_(self, other: State) -> State:
        """Overwrite this state's tensors in place (keeps addresses, e.g. for captured graphs)."""
        self.shift.copy_(other.shift)
        self.wkv.copy_(other.wkv)
        return self

    def to(self, device: torch.device | str) -> State:
        return State(self.shift.to(device), self.wkv.to(device))


def _ortho_(w: Tensor, gain: float) -> Tensor:
    """Orthogonal init with RWKV-LM's gain rule: scaled by sqrt(rows/cols) for tall matrices."""
    rows, cols = w.shape
    nn.init.orthogonal_(w, gain=gain * (math.sqrt(rows / cols) if rows > cols else 1.0))
    return w


class TimeMix(nn.Module):
    """The WKV-7 "attention": token shift, r/w/k/v/a/g, the state recurrence, GroupNorm, gate."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (
            nn.Parameter(torch.zeros(C)) for _ in range(6)
        )
        self.w0, self.a0, self.v0 = (nn.Parameter(torch.zeros(C)) for _ in range(3))
        self.w1, self.w2 = nn.Parameter(torch.zeros(C, cfg.d_decay)), nn.Parameter(torch.zeros(cfg.d_decay, C))
        self.a1, self.a2 = nn.Parameter(torch.zeros(C, cfg.d_aaa)), nn.Parameter(torch.zeros(cfg.d_aaa, C))
        self.v1, self.v2 = nn.Parameter(torch.zeros(C, cfg.d_mv)), nn.Parameter(torch.zeros(cfg.d_mv, C))
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, cfg.d_gate)), nn.Parameter(torch.zeros(cfg.d_gate, C))
        self.k_k, self.k_a = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        """RWKV-LM train_temp's x070 initialisation (schedules over channels and depth)."""
        C, N, i = self.x_r.numel(), self.head_size, self.layer_id
        ratio_0_to_1 = i / max(n_layer - 1, 1)
        ratio_1_to_almost0 = 1.0 - i / n_layer
        ddd = torch.arange(C) / C
        for p, power in [(self.x_r, 0.2), (self.x_w, 0.9), (self.x_k, 0.7),
                         (self.x_v, 0.7), (self.x_a, 0.9), (self.x_g, 0.2)]:
            p.copy_(1.0 - ddd.pow(power * ratio_1_to_almost0))
        n = torch.arange(C, dtype=torch.float32)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + 1 * ratio_0_to_1**0.3)
        self.w0.copy_(www + 0.5 + zigzag * 2.5)  # +0.5 undoes the softplus clamp's offset
        self.a0.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        self.v0.copy_(0.73 - linear * 0.4)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        for lora_in, lora_out in [(self.w1, self.w2), (self.a1, self.a2), (self.v1, self.v2), (self.g1, self.g2)]:
            lora_in.zero_()
            _ortho_(lora_out, 0.1)
        _ortho_(self.receptance.weight, 1.0)
        _ortho_(self.key.weight, 0.1)
        _ortho_(self.value.weight, 1.0)
        self.output.weight.zero_()
        self.ln_x.weight.fill_(((1 + i) / n_layer) ** 0.7)
        self.ln_x.bias.zero_()

    def forward(
        self, x: Tensor, v_first: Tensor | None, x_prev: Tensor | None, wkv_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, C] (already ln1-normalised); x_prev [B, C] (token before x[:, 0]) or None;
        wkv_state [B, H, N, N] or None. Returns (out [B, T, C], v_first [B, T, C], final wkv)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        shifted = torch.cat([x_prev.unsqueeze(1).to(x.dtype) if x_prev is not None
                             else torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        xx = shifted - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # log-log decay < -0.5
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:  # value residual: mix in layer 0's value
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)

        heads = [t.view(B, T, H, N) for t in (r, w, k, v, -kk, kk * a)]
        y, wkv_state = wkv7(*heads, wkv_state)  # y [B, T, H, N]
        y = self.ln_x(y.reshape(B * T, C).to(x.dtype)).view(B, T, C)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(-1, keepdim=True)
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), v_first, wkv_state

    def step(self, x: Tensor, v_first: Tensor | None, x_prev: Tensor, wkv_state: Tensor) -> tuple[Tensor, Tensor]:
        """One token: x [B, C] (ln1 output); x_prev [B, C] and wkv_state [B, H, N, N] are the
        layer's state (wkv_state updated in place). Returns (out [B, C], v_first [B, C])."""
        B, C = x.shape
        H, N = self.n_head, self.head_size
        xx = x_prev - x
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, self.mix6).unbind(0)  # mix6 [6, 1, C]
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        decay_z = torch.addmm(self.w0, torch.tanh(xw @ self.w1), self.w2)
        a = torch.sigmoid(torch.addmm(self.a0, xa @ self.a1, self.a2))
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        if self.layer_id == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(torch.addmm(self.v0, xv @ self.v1, self.v2)))
        kk = F.normalize((k * self.k_k).view(B, H, N), dim=-1)
        k = k * (1 + (a - 1) * self.k_a)
        # exp(-exp(w)) with w = -softplus(-z) - 0.5, i.e. exp(-e^-0.5 * sigmoid(z)); the kernel
        # takes log-log decay, so hand it log(e^-0.5 * sigmoid(z)) = logsigmoid(z) - 0.5.
        w = F.logsigmoid(decay_z) - 0.5
        kh, vh = k.view(B, H, N), v.view(B, H, N)
        y = wkv7_step_(r.view(B, H, N), w.view(B, H, N), kh, vh, -kk, kk * a.view(B, H, N), wkv_state)
        y = F.group_norm(y.reshape(B, C), H, self.ln_x.weight, self.ln_x.bias, LN_X_EPS)
        bonus = (r.view(B, H, N) * kh * self.r_k).sum(-1, keepdim=True)
        y = y + (bonus * vh).view(B, C)
        return self.output(y * g), v_first

    @property
    def mix6(self) -> Tensor:
        return torch.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g]).unsqueeze(1)


class ChannelMix(nn.Module):
    """The MLP: token shift, relu(x W_k)^2 W_v with a 4C hidden layer."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C = cfg.n_embd
        self.x_k = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, cfg.ffn_mult * C, bias=False)
        self.value = nn.Linear(cfg.ffn_mult * C, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        C = self.x_k.numel()
        ratio_1_to_almost0 = 1.0 - self.layer_id / n_layer
        self.x_k.copy_(1.0 - (torch.arange(C) / C).pow(ratio_1_to_almost0**4))
        _ortho_(self.key.weight, 1.0)
        self.value.weight.zero_()

    def forward(self, x: Tensor, x_prev: Tensor | None) -> Tensor:
        """x [B, T, C] (ln2 output), x_prev [B, C] or None -> [B, T, C]."""
        shifted = torch.cat([x_prev.unsqueeze(1).to(x.dtype) if x_prev is not None
                             else torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        k = x + (shifted - x) * self.x_k
        return self.value(torch.relu(self.key(k)).square())

    def step(self, x: Tensor, x_prev: Tensor) -> Tensor:
        """x, x_prev [B, C] -> [B, C]."""
        k = torch.addcmul(x, x_prev - x, self.x_k)
        return self.value(torch.relu(self.key(k)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)  # normalises the embedding once, before the first block
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(
        self, x: Tensor, v_first: Tensor | None, att_prev: Tensor | None, ffn_prev: Tensor | None,
        wkv_state: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, C] -> (x, v_first of layer 0 or None, last ln1 output [B, C], last ln2
        output [B, C], wkv state).

        Only layer 0 returns v_first: a later layer would return its own input, which FSDP2
        sees as a view (it hooks inputs through views) and warns about, as for the slices."""
        if self.layer_id == 0:
            x = self.ln0(x)
        h = self.ln1(x)
        att_out, v_first, wkv_state = self.att(h, v_first, att_prev, wkv_state)
        x = x + att_out
        h2 = self.ln2(x)
        x = x + self.ffn(h2, ffn_prev)
        # Copies, not views of h and h2: FSDP2 hooks a block's outputs for its backward
        # all-gather, and an in-place op on a view would drop that hook (wrong gradients).
        return x, v_first if self.layer_id == 0 else None, h[:, -1].clone(), h2[:, -1].clone(), wkv_state


class LearnedState(nn.Module):
    """A trainable initial State shared by every stream (state tuning).

    shift [n_layer, 2, C] and wkv [n_layer, H, N, N]: one stream's State. A model with one
    starts every conversation from it instead of zeros; zeros (the initial value) leave the
    model's predictions exactly as without it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(cfg.n_layer, 2, cfg.n_embd))
        self.wkv = nn.Parameter(torch.zeros(cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size))

    def expand(self, batch_size: int) -> State:
        """The learned State repeated for batch_size streams (differentiable views, no copy)."""
        L, two, C = self.shift.shape
        return State(self.shift[:, :, None].expand(L, two, batch_size, C),
                     self.wkv[:, None].expand(L, batch_size, *self.wkv.shape[1:]))


class RWKV7(nn.Module):
    """The RWKV-7 language model over REMI token ids."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False  # trade compute for activation memory in training
        # How the compiled CPU step stores the large matrices: "fp32" (the parameters in place),
        # "bf16" or "int8" (packed copies, half or a quarter of the bytes a token reads; see
        # kernels/weight_formats.py). Only the CPU step reads it; training and CUDA are float32.
        self.step_weights = "fp32"
        if cfg.learned_state:
            self.state0 = LearnedState(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-LM's initialisation: tiny embedding, orthogonal head, zeroed output projections."""
        cfg = self.cfg
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        head_gain = 0.5 * math.sqrt(cfg.vocab_size / cfg.n_embd) if cfg.vocab_size > cfg.n_embd else 0.5
        nn.init.orthogonal_(self.head.weight, gain=head_gain)
        for block in self.blocks:
            for ln in [getattr(block, "ln0", None), block.ln1, block.ln2]:
                if ln is not None:
                    ln.reset_parameters()
            block.att.reset_parameters(cfg.n_layer)
            block.ffn.reset_parameters(cfg.n_layer)
        self.ln_out.reset_parameters()

    # ----------------------------------------------------------------------------- state

    def init_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> State:
        """The State a conversation starts from, for `batch_size` streams (float32, a copy):
        zeros, or the learned initial state of a state-tuned model."""
        cfg = self.cfg
        device = device or self.emb.weight.device
        if cfg.learned_state:
            with torch.no_grad():
                return self.state0.expand(batch_size).clone().to(device)
        return State(
            shift=torch.zeros(cfg.n_layer, 2, batch_size, cfg.n_embd, device=device),
            wkv=torch.zeros(cfg.n_layer, batch_size, cfg.n_head, cfg.head_size, cfg.head_size,
                            device=device),
        )

    # ----------------------------------------------------------------------------- parallel

    def features(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """Hidden states after ln_out for a run of tokens.

        idx [B, T] -> (x [B, T, C], new State or None). With `state` given, the run continues
        from it and a new State is returned (differentiable; the trainer detaches it between
        windows); the input State is not modified. Without it the run starts from the model's
        initial state (zeros, or the learned one) and no State is returned.
        """
        x = self.emb(idx)  # [B, T, C]
        v_first = None
        shifts, wkvs = [], []
        start = state
        if start is None and self.cfg.learned_state:  # differentiable: tuning trains it
            start = self.state0.expand(idx.shape[0])
        for i, block in enumerate(self.blocks):
            args = (x, v_first) + ((start.shift[i, 0], start.shift[i, 1], start.wkv[i])
                                   if start is not None else (None, None, None))
            if self.grad_checkpointing and self.training:
                # Recompute the block in the backward pass instead of keeping its activations.
                x, layer_v, att_last, ffn_last, wkv = checkpoint(block, *args, use_reentrant=False)
            else:
                x, layer_v, att_last, ffn_last, wkv = block(*args)
            if layer_v is not None:
                v_first = layer_v
            if state is not None:
                shifts.append(torch.stack([att_last, ffn_last]).float())
                wkvs.append(wkv.float())
        x = self.ln_out(x)
        if state is None:
            return x, None
        return x, State(torch.stack(shifts), torch.stack(wkvs))

    def forward(self, idx: Tensor) -> Tensor:
        """idx [B, T] -> logits [B, T, V], from the model's initial state (training)."""
        x, _ = self.features(idx)
        return self.head(x)

    @torch.no_grad()
    def prefill(self, idx: Tensor, state: State) -> tuple[Tensor, State]:
        """Feed a run of tokens idx [B, T] through the chunked path, continuing from `state`.

        Returns (logits [B, V] after the last token, the new State); the same result as T calls
        of `step` (up to float rounding), much faster for long runs.
        """
        x, new_state = self.features(idx, state)
        assert new_state is not None
        return self.head(x[:, -1]).float(), new_state

    # ----------------------------------------------------------------------------- recurrent

    def _uses_cpu_step(self) -> bool:
        weight = self.emb.weight
        return weight.device.type == "cpu" and weight.dtype == torch.float32

    @contextlib.contextmanager
    def weights_fixed(self) -> Iterator[None]:
        """A block of `step` calls in which the caller does not change the parameters (an
        answer being sampled): the compiled CPU step checks them once here instead of on every
        token (`CpuStepKernel.weights_fixed`). Nothing changes on other paths."""
        kernel = cpu_step_kernel(self, self.step_weights) if self._uses_cpu_step() else None
        with kernel.weights_fixed() if kernel is not None else contextlib.nullcontext():
            yield

    @torch.no_grad()
    def step(self, idx: Tensor, state: State) -> tuple[Tensor, State]:
        """One token per stream: idx [B] -> (logits [B, V], state). `state` is updated in place.

        On the CPU in float32 this runs the compiled C step (kernels/cpu_step.py: one call per
        token, the weights streamed once, the large matrices stored as `self.step_weights`);
        elsewhere, or without a C compiler, `step_torch` (float32 weights).
        """
        if self._uses_cpu_step() and idx.device.type == "cpu" and state.wkv.dtype == torch.float32:
            kernel = cpu_step_kernel(self, self.step_weights)  # cached; None -> the PyTorch path
            if kernel is not None:
                return kernel.step(idx, state.shift, state.wkv), state
        return self.step_torch(idx, state)

    @torch.no_grad()
    def step_torch(self, idx: Tensor, state: State) -> tuple[Tensor, State]:
        """The PyTorch step (the reference for the C step, and the CUDA path).

        No Python-side branching on values and fixed state shapes, so the call can be captured
        (CUDA graphs) or compiled.
        """
        x = self.emb(idx)  # [B, C]
        v_first = None
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            h = block.ln1(x)
            att_out, v_first = block.att.step(h, v_first, state.shift[i, 0], state.wkv[i])
            state.shift[i, 0].copy_(h)
            x = x + att_out
            h = block.ln2(x)
            x = x + block.ffn.step(h, state.shift[i, 1])
            state.shift[i, 1].copy_(h)
        return self.head(self.ln_out(x)), state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
