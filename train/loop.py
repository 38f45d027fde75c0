"""The training loop: AdamW as RWKV-LM groups it, warmup + cosine, bf16 autocast on CUDA,
carried state across windows, evaluation, checkpoints, exact resume, DDP through torchrun.

Under DDP (torchrun sets RANK / WORLD_SIZE) every rank trains on its own lanes of windows; only
rank 0 logs, evaluates and writes files. Optional features are switched with `enabled=` or
`nullcontext` rather than separate code paths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.checkpoint import CheckpointMeta, save
from model.rwkv7 import RWKV7, ModelConfig, State
from train.config import TrainConfig
from train.errors import TrainError
from train.resume import load_resume, optimizer_from_tensors, optimizer_to_tensors, save_resume
from train.shards import TokenShards
from train.windows import IGNORE, TokenTable, WindowSampler, eval_windows

log = logging.getLogger(__name__)

# Layer 0 computes v_first but never mixes it back in, so its value-residual LoRA is unused;
# it is kept (BlinkDL's layout has it) but frozen, which DDP requires of unused parameters.
UNUSED_PARAMS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


class WindowLoss(nn.Module):
    """The unit DDP wraps: features from a (possibly carried) state, the head only where a target
    carries loss, and the summed cross-entropy."""

    def __init__(self, model: RWKV7):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, shift: torch.Tensor | None,
                wkv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """idx, targets [B, T]; shift/wkv the carried State tensors or None.
        Returns (summed loss, new shift, new wkv)."""
        state = State(shift, wkv) if shift is not None else None
        h, new_state = self.model.features(idx, state)
        mask = targets != IGNORE
        logits = self.model.head(h[mask])  # [M, V]: the head runs only where there is a loss
        loss = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
        assert new_state is not None or shift is None
        return loss, *((new_state.shift, new_state.wkv) if new_state is not None else (None, None))


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        if "RANK" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at the end of the run: at
    cfg.max_steps, or when cfg.max_minutes of training time have passed if that comes first."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = run_progress(step, cfg, elapsed)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def run_progress(step: int, cfg: TrainConfig, elapsed: float) -> float:
    """How far the decay has gone, 0..1, by steps or by the time budget, whichever is further."""
    by_steps = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    by_time = elapsed / (cfg.max_minutes * 60) if cfg.max_minutes > 0 else 0.0
    return min(1.0, max(0.0, by_steps, by_time))


def param_groups(model: RWKV7, weight_decay: float) -> list[dict]:
    """RWKV-LM's grouping: weight decay only on 2-D `.weight` matrices; w0 at twice the rate."""
    decay, plain, double = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            double.append(p)
        elif sum(size > 1 for size in p.shape) >= 2 and ".weight" in name and weight_decay > 0:
            decay.append(p)
        else:
            plain.append(p)
    groups = [{"params": plain, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": double, "weight_decay": 0.0, "lr_scale": 2.0}]
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0})
    return groups


def estimate_memory(model: RWKV7, cfg: TrainConfig, bytes_per_act: int) -> dict[str, float]:
    """A rough peak-memory estimate in MiB: fp32 weights, grads and two Adam moments, plus the
    activations autograd keeps (about 40 values of C per token and layer, measured from the
    saved tensors of this implementation; far fewer with gradient checkpointing)."""
    n = model.num_params()
    C, L = model.cfg.n_embd, model.cfg.n_layer
    tokens = cfg.batch_size * cfg.ctx_len
    per_token_layer = 40 * C + 4 * model.cfg.n_head * model.cfg.head_size
    layers_kept = 1 if cfg.grad_checkpointing else L
    acts = tokens * per_token_layer * layers_kept * bytes_per_act + tokens * C * L * bytes_per_act
    static = n * 16
    return {"params_M": n / 1e6, "weights_optimizer_MiB": static / 2**20, "activations_MiB": acts / 2**20,
            "total_MiB": (static + acts) / 2**20}


def shard_fully(model: RWKV7, module: nn.Module) -> nn.Module:
    """FSDP2: shard every block of `model`, then the rest of `module` (which holds `model`).
    Under torchrun with the process group initialised; returns `module`, now sharded."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(module)
    return module


class Trainer:
    """Owns one run directory. `run()` trains to cfg.max_steps (or until SIGINT/SIGTERM)."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, *, resume: bool = False,
                 mqtt: dict | None = None, progress: bool = True):
        self.cfg, self.mqtt, self.progress = cfg, mqtt or {}, progress
        self.dist = Distributed.from_env()
        self.out = Path(cfg.out)
        self.stop_requested = False
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = self._pick_device()
        self.use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        if self.dist.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

        self.train_shards = TokenShards(cfg.data, "train")
        self.val_shards = TokenShards(cfg.data, "val", expected_vocab_hash=self.train_shards.vocab_hash)
        self.table = TokenTable.from_vocab(self.train_shards.tokenizer().vocab)
        if len(self.val_shards) == 0 and self.dist.is_main:
            log.warning("the validation split of %s is empty: no val loss, no best checkpoint "
                        "(prepare with a larger --val-fraction)", cfg.data)

        resume_path = self._resume_path(self.dist.rank)
        resume_tensors, resume_info = load_resume(resume_path) if resume else ({}, {})
        if resume:
            # On resume the architecture comes from the run, not from the current config.
            model_cfg = ModelConfig.from_dict(resume_info["model_config"])
        if model_cfg.vocab_size != self.train_shards.vocab_size:
            model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": self.train_shards.vocab_size})

        init_weights, self.init_model_id = None, None
        if cfg.init and not resume:
            model_cfg, init_weights, self.init_model_id = self._init_weights(cfg.init)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = RWKV7(model_cfg).to(self.device)
        if init_weights is not None:
            self.model.load_state_dict(init_weights)
        self.model.grad_checkpointing = cfg.grad_checkpointing
        for name, p in self.model.named_parameters():
            p.requires_grad_(name not in UNUSED_PARAMS)
        self.loss_module: nn.Module = WindowLoss(self.model)
        if self.dist.world_size > 1:
            self.loss_module = self._wrap_distributed(self.loss_module)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
            eps=cfg.adam_eps, fused=self.device.type == "cuda")
        self.sampler = WindowSampler(
            self.train_shards, self.table, cfg.batch_size, cfg.ctx_len, carry_state=cfg.carry_state,
            transpose=cfg.transpose, tempo_jitter=cfg.tempo_jitter, loss_on=cfg.loss_on,
            context_bars=cfg.context_bars, seed=cfg.seed + 1000 * self.dist.rank)
        self.carry = self.model.init_state(cfg.batch_size)

        self.step = 0
        self.tokens_seen = 0
        self.best_val = float("inf")
        self.elapsed = 0.0
        self.history: list[dict] = []
        if resume:
            self._restore(resume_tensors, resume_info)

    # ----------------------------------------------------------------------------- set-up

    def _init_weights(self, path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
        """The architecture, weights and model id of checkpoint `path`, refused (TrainError, one
        line) when its tokenizer is not the one the data was prepared with."""
        from model.checkpoint import load
        from model.errors import CheckpointError

        try:
            model, meta = load(path)
        except CheckpointError as err:
            raise TrainError(f"--init: {err}") from err
        if meta.vocab_hash != self.train_shards.vocab_hash:
            raise TrainError(
                f"--init {path}: its tokenizer (vocabulary {meta.vocab_hash}) is not the one "
                f"{self.cfg.data} was prepared with ({self.train_shards.vocab_hash}); prepare the "
                f"data with the checkpoint's tokenizer")
        if self.dist.is_main:
            log.info("starting from %s (model %s, step %d of its own run)", path, meta.model_id, meta.step)
        return model.cfg, model.state_dict(), meta.model_id

    def _pick_device(self) -> torch.device:
        want = self.cfg.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise TrainError("train.device = 'cuda' but no CUDA GPU is available")
            return torch.device("cuda", self.dist.local_rank)
        return torch.device("cpu")

    def _wrap_distributed(self, module: nn.Module) -> nn.Module:
        if self.cfg.fsdp:
            return shard_fully(self.model, module)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def _resume_path(self, rank: int) -> Path:
        return self.out / ("resume.safetensors" if rank == 0 else f"resume.rank{rank}.safetensors")

    # ----------------------------------------------------------------------------- resume

    def _save_resume(self) -> None:
        tensors = {"carry.shift": self.carry.shift, "carry.wkv": self.carry.wkv,
                   "rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        info = {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "elapsed": self.elapsed, "sampler": self.sampler.state_dict(),
                "model_config": self.model.cfg.to_dict(), "train_config": self.cfg.to_dict(),
                "history": self.history[-2000:]}
        model_sd, optim_sd = self._full_state_dicts()
        if self.dist.is_main:
            tensors.update({f"model.{k}": v for k, v in model_sd.items()})
            opt_tensors, info["optimizer_groups"] = optimizer_to_tensors(optim_sd)
            tensors.update(opt_tensors)
        save_resume(self._resume_path(self.dist.rank), tensors, info)

    def _full_state_dicts(self) -> tuple[dict, dict]:
        """Unsharded model and optimizer state dicts. Under FSDP this gathers the shards (a
        collective: every rank must call it)."""
        if not self.cfg.fsdp or self.dist.world_size == 1:
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.model, self.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _restore(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        if self.dist.world_size > 1:
            main_tensors, main_info = load_resume(self._resume_path(0))
        else:
            main_tensors, main_info = tensors, info
        model_sd = {k[6:]: v for k, v in main_tensors.items() if k.startswith("model.")}
        optim_sd = optimizer_from_tensors(main_tensors, main_info["optimizer_groups"])
        if self.cfg.fsdp and self.dist.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                           options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(model_sd)
            self.optimizer.load_state_dict(optim_sd)
        self.step, self.tokens_seen = info["step"], info["tokens_seen"]
        self.best_val, self.elapsed = info["best_val"], info["elapsed"]
        self.history = info.get("history", [])
        self.sampler.load_state_dict(info["sampler"])
        self.carry = State(tensors["carry.shift"].to(self.device), tensors["carry.wkv"].to(self.device))
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        log.info("resumed %s at step %d", self.out, self.step)

    # ----------------------------------------------------------------------------- steps

    def train_step(self) -> tuple[float, int]:
        """One optimizer step (grad_accum micro-batches). Returns (mean loss, tokens)."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg, self.elapsed) * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, total_targets, total_tokens = 0.0, 0, 0
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)
        for _ in range(cfg.grad_accum):
            batch = self.sampler.next_batch()
            idx, targets = batch.idx.to(self.device), batch.targets.to(self.device)
            n_targets = int((batch.targets != IGNORE).sum())
            if cfg.carry_state:
                keep = (~batch.reset).to(self.device).float()
                shift = self.carry.shift * keep[None, None, :, None]
                wkv = self.carry.wkv * keep[None, :, None, None, None]
            else:
                shift = wkv = None
            with autocast:
                loss_sum, new_shift, new_wkv = self.loss_module(idx, targets, shift, wkv)
            (loss_sum / max(1, n_targets) / cfg.grad_accum).backward()
            if cfg.carry_state:
                self.carry = State(new_shift.detach().float(), new_wkv.detach().float())
            total_loss += float(loss_sum.detach())
            total_targets += n_targets
            total_tokens += int((batch.idx != self.table.pad_id).sum())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return total_loss / max(1, total_targets), total_tokens

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean NLL per token on the validation windows (nats), state carried within pieces;
        None when the validation split is empty."""
        if len(self.val_shards) == 0:
            return None
        self.model.eval()
        # FSDP's hooks (which gather the shards) run only through the wrapped module.
        scorer = self.loss_module if self.cfg.fsdp else WindowLoss(self.model)
        total, count = 0.0, 0
        state = self.model.init_state(1, self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)
        for _, x, y, first in eval_windows(self.val_shards, self.table, self.cfg.ctx_len, self.cfg.eval_windows):
            if first:
                state = self.model.init_state(1, self.device)
            targets = torch.from_numpy(y)[None].to(self.device)
            with autocast:
                loss_sum, shift, wkv = scorer(torch.from_numpy(x)[None].to(self.device), targets,
                                              state.shift, state.wkv)
            total += float(loss_sum)
            count += int((targets != IGNORE).sum())
            state = State(shift.float(), wkv.float())
        self.model.train()
        return total / max(1, count)

    # ----------------------------------------------------------------------------- files

    def _meta(self, val_loss: float | None) -> CheckpointMeta:
        return CheckpointMeta(
            self.model.cfg, self.train_shards.tokenizer_params, self.train_shards.vocab_hash,
            step=self.step, val_loss=val_loss,
            extra={"train": self.cfg.to_dict(), "init_model_id": self.init_model_id,
                   "tokens_seen": self.tokens_seen,
                   "train_seconds": round(self.elapsed, 1)})

    def save_checkpoints(self, val_loss: float | None, periodic: bool) -> None:
        """latest (always), best (when val improved), periodic step files (keep_last newest)."""
        if self.dist.world_size > 1:
            dist.barrier()
        self._save_resume()
        weights = self._full_state_dicts()[0] if self.cfg.fsdp else None
        if not self.dist.is_main:
            return
        meta = save(self.model, self.out / "latest.safetensors", self._meta(val_loss), weights)
        if val_loss is not None and val_loss <= self.best_val:
            self.best_val = val_loss
            save(self.model, self.out / "best.safetensors", self._meta(val_loss), weights)
        if periodic:
            save(self.model, self.out / f"step-{self.step:07d}.safetensors", self._meta(val_loss), weights)
            for old in sorted(self.out.glob("step-*.safetensors"))[: -self.cfg.keep_last]:
                old.unlink()
        self._announce(meta)

    def _announce(self, meta: CheckpointMeta) -> None:
        if not self.mqtt.get("enabled"):
            return
        from train.announce import announce_checkpoint

        announce_checkpoint(self.mqtt, self.out / "latest.safetensors", meta)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """loss.png: training and validation loss against steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("NLL per token (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)

    # ----------------------------------------------------------------------------- run

    def _finished(self) -> bool:
        budget_over = self.cfg.max_minutes > 0 and self.elapsed >= self.cfg.max_minutes * 60
        return self.step >= self.cfg.max_steps or budget_over

    def _remove_stale_temporaries(self) -> None:
        """Delete the half-written temporary files of an earlier run of this folder that was
        killed while saving (`atomic_write` names them .<name>.<random>.tmp). Nothing of this
        run writes yet: saving starts after the first step, behind a barrier under DDP."""
        for stale in self.out.glob(".*.safetensors.*.tmp"):
            log.info("removing %s, left by a run killed while saving", stale.name)
            stale.unlink(missing_ok=True)

    def _handle_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        log.warning("signal %d: saving at the end of this step, then stopping", signum)
        self.stop_requested = True

    def run(self) -> dict:
        """Train until max_steps or a stop signal. Returns a summary dict."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            self._remove_stale_temporaries()
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if self.dist.is_main:
            est = estimate_memory(self.model, cfg, 2 if self.use_bf16 else 4)
            log.info("model %s: %.2fM parameters on %s (%s); estimated memory %.0f MiB "
                     "(weights+optimizer %.0f, activations %.0f)",
                     self.model.cfg, est["params_M"], self.device, "bf16" if self.use_bf16 else "fp32",
                     est["total_MiB"], est["weights_optimizer_MiB"], est["activations_MiB"])
            log.info("data: %r", self.train_shards)
        self.model.train()
        bar = None
        if self.dist.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        val_loss = None
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while not self._finished() and not self.stop_requested:
                t0 = time.perf_counter()
                loss, tokens = self.train_step()
                self.elapsed += time.perf_counter() - t0
                self.tokens_seen += tokens * self.dist.world_size
                window_tokens += tokens * self.dist.world_size
                if not math.isfinite(loss):
                    raise TrainError(f"loss became {loss} at step {self.step}; lower train.lr")
                if self.step % cfg.log_every == 0 or self._finished():
                    rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                    window_start, window_tokens = time.perf_counter(), 0
                    if self.dist.is_main:
                        self._log({"step": self.step, "loss": round(loss, 5),
                                   "lr": lr_at(self.step - 1, cfg, self.elapsed),
                                   "tokens_per_s": round(rate, 1), "tokens": self.tokens_seen,
                                   "elapsed_s": round(self.elapsed, 2)})
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                if bar is not None:
                    bar.update(1)
                last = self._finished() or self.stop_requested
                if self.step % cfg.eval_every == 0 or last:
                    # Under FSDP every rank must take part in the forward passes (all-gathers).
                    val_loss = self.evaluate() if self.dist.is_main or self.cfg.fsdp else None
                    if val_loss is not None and self.dist.is_main:
                        self._log({"step": self.step, "val_loss": round(val_loss, 5)})
                        log.info("step %d: val NLL %.4f", self.step, val_loss)
                if self.step % cfg.save_every == 0 or last:
                    self.save_checkpoints(val_loss, periodic=self.step % cfg.save_every == 0)
                    if self.dist.is_main:
                        self.plot()
        finally:
            if bar is not None:
                bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return {"step": self.step, "val_loss": val_loss, "best_val": self.best_val,
                "tokens_seen": self.tokens_seen, "interrupted": self.stop_requested,
                "train_seconds": self.elapsed, "checkpoint": str(self.out / "latest.safetensors")}


@contextlib.contextmanager
def distributed_cleanup():
    """Destroy the process group on the way out: on a normal exit through
    `leave_process_group`; after an error at once, since the other ranks may never arrive."""
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    leave_process_group()


def leave_process_group() -> None:
    """Wait until every rank is here, then destroy the process group. The wait goes through the
    rendezvous store, not a collective: a rank that tore down gloo while another still used it
    aborted ("terminate called without an active exception") on a loaded machine, and a gloo
    barrier first only made that rarer (1 run in 10 with two busy loops): its own last messages
    may still be in flight when the faster rank destroys its context (pytorch/gloo#155). Once
    every rank has set its key, each has finished its last collective, so nothing is in flight."""
    if not dist.is_initialized():
        return
    store = dist.distributed_c10d._get_default_store()  # the one init_process_group rendezvoused on
    store.set(f"leave/{dist.get_rank()}", "1")
    store.wait([f"leave/{rank}" for rank in range(dist.get_world_size())])
    dist.destroy_process_group()
