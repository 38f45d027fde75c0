"""The trainer's settings: one commented dataclass, filled from config.toml's [train] section and
`--set train.key=value` overrides, validated once at start."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from model.settings import ConfigError, check_range


@dataclass
class TrainConfig:
    """[train] in config.toml. Every field has a working default for a laptop-sized run."""

    data: str = "data/prepared"  # a directory written by `rwkv-music prepare`
    out: str = "runs/default"  # run directory: latest/best/periodic checkpoints, metrics
    init: str = ""  # start from this checkpoint's weights (fresh optimizer and schedule); "" = random
    max_steps: int = 2000  # optimizer steps
    max_minutes: float = 0.0  # wall-clock budget: the schedule ends at whichever comes first (0 = off)
    batch_size: int = 8  # windows per step (per process under DDP)
    ctx_len: int = 512  # tokens per window; windows start at bar lines
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # end of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # AdamW, on 2-D weight matrices only (as RWKV-LM)
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    carry_state: bool = True  # carry the recurrent state across consecutive windows of a piece
    loss_on: Literal["all", "completion"] = "all"  # completion: no loss on the first context_bars
    context_bars: int = 4  # with loss_on = "completion"
    transpose: int = 5  # random transposition in semitones, +-this many (0 = off)
    tempo_jitter: int = 2  # random shift of tempo tokens by +-this many bins (0 = off)
    eval_every: int = 200  # steps between validation passes
    eval_windows: int = 64  # validation windows per pass
    save_every: int = 200  # steps between checkpoints (latest always; periodic kept)
    keep_last: int = 3  # periodic checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl lines
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    grad_checkpointing: bool = False
    fsdp: bool = False  # shard parameters across processes (under torchrun) for large models
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "ctx_len", "grad_accum", "eval_every", "eval_windows",
                    "save_every", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} = {getattr(self, key)}: must be >= 1")
        check_range("train.ctx_len", self.ctx_len, 16, 1 << 16)
        check_range("train.lr", self.lr, 1e-7, 1.0)
        check_range("train.min_lr", self.min_lr, 0.0, self.lr)
        check_range("train.warmup_steps", self.warmup_steps, 0, 10**9)
        check_range("train.weight_decay", self.weight_decay, 0.0, 10.0)
        check_range("train.beta1", self.beta1, 0.0, 0.9999)
        check_range("train.beta2", self.beta2, 0.0, 0.99999)
        check_range("train.grad_clip", self.grad_clip, 0.0, 1e6)
        check_range("train.context_bars", self.context_bars, 0, 1024)
        check_range("train.transpose", self.transpose, 0, 24)
        check_range("train.tempo_jitter", self.tempo_jitter, 0, 16)
        check_range("train.num_threads", self.num_threads, 0, 1024)
        check_range("train.max_minutes", self.max_minutes, 0.0, 1e7)

    def to_dict(self) -> dict:
        return asdict(self)
