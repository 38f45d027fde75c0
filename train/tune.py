"""`rwkv-music tune MIDI_DIR OUT`: adapt a checkpoint to a player's style in minutes on the CPU.

A folder of MIDI files goes in; one checkpoint file comes out that `model.load` plays like any
other. The folder is tokenized with the base checkpoint's own tokenizer into a temporary
directory (nothing is ever written into MIDI_DIR; a file that cannot be read is skipped and
counted), some pieces are held out for validation when there are enough, and one of three
methods trains for a number of steps (the same result on any machine, given the seed), within
a wall-clock cap:

  lora   (the default) low-rank updates of the time mix's r/k/v/output and the channel mix's
         projections, merged into the weights when saved (same file size as the base).
  state  only the initial recurrent State (every layer's WKV matrices and token-shift vectors),
         the network's weights untouched; the tuned file is the base weights plus that State,
         and `init_state()` returns it. The conversation starts "already in the style".
  full   every weight, with a small learning rate.

Training windows start at random bar lines of the pieces (tempo and meter restated, as in
`train`), transposed and tempo-jittered a little. Against forgetting, the loss also keeps the
tuned model's predictions close to the base's on music the base generates itself before
training (`--replay`, a KL term; no base data needed). The validation NLL per note is measured
before training, every `eval_every` steps and at the end; the best point is kept. The
metadata records the base model id, the method, the pieces and the NLL before and after. The
base checkpoint is never modified, and OUT is written atomically: Ctrl-C leaves no half file.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("state", "lora", "full")
# Learning rates tried on Chopin mazurkas against the piano model (docs/styles.md). Adam moves
# every number by about the learning rate per step: a State's entries (WKV matrices, with no
# weights to keep consistent) move far and need a large step to matter within minutes (0.1
# and 0.5 did little); full fine-tuning needs a small one or it forgets the piano corpus.
DEFAULT_LR = {"state": 1.0, "lora": 3e-3, "full": 3e-4}
# Projections that get a low-rank update in `lora` (names inside each Block).
LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")

EPILOG = """examples:
  rwkv-music tune my-improvisations/ styles/mine.safetensors
  rwkv-music tune mazurkas/ styles/mazurka.safetensors --method state --steps 100
  rwkv-music tune my-band/ styles/band.safetensors --steps 0 --minutes 3     # as many steps as 3 minutes allow
  rwkv-music tune ragtime/ styles/rag.safetensors --base checkpoints/default.safetensors --method lora
  rwkv-music complete phrase.mid out.mid --checkpoint styles/mine.safetensors

Put the file in the daemon's styles_dir ([daemon] in config.toml) and switch to it live with
`rwkv-music osc style mine` (OSC /rwkv/style mine). docs/styles.md compares the methods.
"""


@dataclass
class TuneConfig:
    """How to tune; every field has a command-line flag."""

    method: str = "lora"  # chosen by measurement, docs/styles.md
    steps: int = 40  # optimizer steps; 0: as many as --minutes allows
    minutes: float = 6.0  # wall-clock cap on training (preparation and scoring come on top)
    lr: float = 0.0  # 0: the method's default (DEFAULT_LR)
    ctx_len: int = 512  # tokens per training window
    batch_size: int = 4
    val_pieces: int = -1  # held out for validation; -1: one in five once there are five pieces
    lora_rank: int = 8
    transpose: int = 5  # random transposition within +-N semitones (kept inside the piano)
    tempo_jitter: int = 1  # random tempo shift within +-N tempo bins
    eval_every: int = 10  # steps between validations
    # Anti-forgetting: the weight of a KL term that keeps the tuned model's predictions equal to
    # the base's on music the base generates itself (no base data needed); 0 turns it off.
    replay: float = 1.0
    replay_windows: int = 16  # generated windows of ctx_len tokens, made once before training
    seed: int = 0
    threads: int = 0  # torch threads; 0: every core

    def __post_init__(self) -> None:
        from train.errors import TrainError

        if self.method not in METHODS:
            raise TrainError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        checks = [("steps", self.steps >= 0, ">= 0"), ("eval-every", self.eval_every >= 1, ">= 1"),
                  ("minutes", self.minutes > 0, "> 0"), ("lr", self.lr >= 0, ">= 0"),
                  ("ctx-len", self.ctx_len >= 16, ">= 16"), ("batch-size", self.batch_size >= 1, ">= 1"),
                  ("val-pieces", self.val_pieces >= -1, ">= 0 (or -1 for automatic)"),
                  ("lora-rank", self.lora_rank >= 1, ">= 1"), ("transpose", self.transpose >= 0, ">= 0"),
                  ("tempo-jitter", self.tempo_jitter >= 0, ">= 0"), ("threads", self.threads >= 0, ">= 0"),
                  ("replay", self.replay >= 0, ">= 0"), ("replay-windows", self.replay_windows >= 1, ">= 1")]
        for name, ok, allowed in checks:
            if not ok:
                raise TrainError(f"--{name} {getattr(self, name.replace('-', '_'))}: must be {allowed}")

    @property
    def learning_rate(self) -> float:
        return self.lr or DEFAULT_LR[self.method]


@dataclass
class TuneReport:
    """What a tuning run did; stored in the checkpoint's metadata under extra["tune"]."""

    method: str
    base: str  # the base checkpoint's file name
    base_model_id: str
    pieces: list[str]
    val_pieces: list[str]
    skipped: list[dict[str, str]]
    lr: float
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    val_nll_per_note_before: float | None = None
    val_nll_per_note_after: float | None = None
    best_step: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------- the methods


def tunable_model(base, method: str, lora_rank: int, seed: int):
    """A copy of `base` set up for `method`, and the parameters to train.

    state: a model with a LearnedState (zeros: the same predictions as the base), only it trains;
    lora: low-rank parametrizations on LORA_TARGETS, only they train; full: every weight trains.
    """
    from model.low_rank import add_low_rank
    from model.rwkv7 import RWKV7, ModelConfig

    if method == "state":
        cfg = ModelConfig(**{**base.cfg.to_dict(), "learned_state": True})
        model = RWKV7(cfg)
        # Every base weight; the State stays zero unless the base is state-tuned already.
        missing, _ = model.load_state_dict(base.state_dict(), strict=False)
        assert all(k.startswith("state0.") for k in missing), missing
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("state0."))
        return model, list(model.state0.parameters())
    model = copy.deepcopy(base)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    return model, add_low_rank(lora_linears(model), lora_rank, seed)


def lora_linears(model) -> list:
    """The nn.Linear modules `lora` updates: LORA_TARGETS in every block."""
    return [block.get_submodule(target) for block in model.blocks for target in LORA_TARGETS]


# --------------------------------------------------------------------------------- replay


def generate_replay(base, bos_id: int, windows: int, length: int, seed: int):
    """Music the base model makes up, and its own predictions on it, to tune against forgetting.

    Returns (ids int64 [windows, length + 1] starting with BOS, teacher log-probabilities
    float32 [windows, length, V] of the base at each position). Sampled at temperature 1 with
    the recurrent step, all windows as one batch.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((windows, length + 1), bos_id, dtype=torch.long)
    with torch.no_grad(), base.weights_fixed():
        state = base.init_state(windows)
        for t in range(length):
            logits, _ = base.step(ids[:, t], state)
            ids[:, t + 1] = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]
        h, _ = base.features(ids[:, :-1])
        teacher = torch.log_softmax(base.head(h).float(), -1)
    return ids, teacher


def replay_kl(model, ids, teacher):
    """Mean KL(base || tuned) per token over replay windows ids [B, T + 1], teacher [B, T, V]."""
    import torch.nn.functional as F

    h, _ = model.features(ids[:, :-1])
    student = F.log_softmax(model.head(h).float(), -1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


# --------------------------------------------------------------------------------- data


def choose_val_pieces(rels: list[str], requested: int) -> set[str]:
    """Relative paths held out for validation: `requested`, or with -1 one in five once there are
    five files. Chosen by a hash of the path, so the choice does not depend on file order."""
    n = len(rels) // 5 if requested < 0 else min(requested, max(0, len(rels) - 1))
    ranked = sorted(rels, key=lambda rel: hashlib.sha256(rel.encode()).hexdigest())
    return set(ranked[:n])


def nll_per_note(model, shards, table) -> float | None:
    """Mean NLL per note (nats) of the model over every piece of `shards`, or None if empty."""
    from tools.evaluate import pieces_of, token_nlls

    pieces = pieces_of(shards, 0, table.bos_id)
    if not pieces:
        return None
    model.eval()
    total = sum(float(nll.sum()) for nll in token_nlls(model, pieces))
    notes = sum(int(np.count_nonzero(table.pitch_of[piece] >= 0)) for piece in pieces)
    model.train()
    return total / max(1, notes)


# --------------------------------------------------------------------------------- the run


def _check_paths(midi_dir: Path, out: Path, base: Path) -> None:
    from train.errors import TrainError

    if not midi_dir.is_dir():
        raise TrainError(f"{midi_dir} is not a folder of MIDI files")
    if out.suffix != ".safetensors":
        raise TrainError(f"{out}: the tuned checkpoint must be a .safetensors file")
    if out.resolve() == base.resolve():
        raise TrainError(f"{out} is the base checkpoint; the base is never overwritten, name another file")
    if out.resolve().is_relative_to(midi_dir.resolve()):
        raise TrainError(f"{out} is inside {midi_dir}; tuning never writes into the MIDI folder")


def tune(midi_dir: Path | str, out: Path | str, base: Path | str, cfg: TuneConfig,
         progress: bool = True) -> TuneReport:
    """Tune `base` on the MIDI files under `midi_dir` and write the result to `out`."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from model import load, save
    from model.checkpoint import CheckpointMeta
    from train.errors import TrainError
    from train.prepare import find_sources, prepare
    from train.shards import TokenShards
    from train.windows import IGNORE, TokenTable, WindowSampler

    midi_dir, out, base = Path(midi_dir), Path(out), Path(base)
    _check_paths(midi_dir, out, base)
    base_model, base_meta = load(base)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    table = TokenTable.from_vocab(base_meta.tokenizer().vocab)

    with tempfile.TemporaryDirectory(prefix="rwkv-music-tune-") as tmp:
        rels = [s.rel for s in find_sources(midi_dir)]
        val_rels = choose_val_pieces(rels, cfg.val_pieces)
        summary = prepare(midi_dir, tmp, tokenizer_params=base_meta.tokenizer_params, progress=progress,
                          assign_split=lambda rel: "val" if rel in val_rels else "train")
        for item in summary.skipped:
            log.warning("skipped %s: %s", item["path"], item["reason"])
        train_shards, val_shards = TokenShards(tmp, "train"), TokenShards(tmp, "val")
        if len(train_shards) == 0:
            raise TrainError(f"no readable piece to tune on in {midi_dir} "
                             f"({len(summary.skipped)} skipped)")
        report = TuneReport(cfg.method, base.name, base_meta.model_id, train_shards.piece_names,
                            val_shards.piece_names, summary.skipped, cfg.learning_rate,
                            settings=asdict(cfg))
        replay_ids = replay_teacher = None
        if cfg.replay > 0:
            replay_ids, replay_teacher = generate_replay(base_model, table.bos_id, cfg.replay_windows,
                                                         cfg.ctx_len, cfg.seed)
        model, params = tunable_model(base_model, cfg.method, cfg.lora_rank, cfg.seed)
        model.train()
        sampler = WindowSampler(train_shards, table, cfg.batch_size, cfg.ctx_len, carry_state=False,
                                transpose=cfg.transpose, tempo_jitter=cfg.tempo_jitter, seed=cfg.seed)
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.99),
                                      weight_decay=0.01 if cfg.method == "full" else 0.0)
        best = report.val_nll_per_note_before = nll_per_note(model, val_shards, table)
        best_params = [p.detach().clone() for p in params]
        budget_s = cfg.minutes * 60.0
        log.info("tuning on %d pieces (%d held out) with %s for %s steps, at most %g minutes", len(train_shards),
                 len(val_shards), cfg.method, cfg.steps or "as many", cfg.minutes)
        bar = tqdm(total=cfg.steps or None, desc=f"tune ({cfg.method})", unit="step", disable=not progress,
                   dynamic_ncols=True)
        started = time.perf_counter()
        elapsed = fraction = 0.0
        try:
            while fraction < 1.0:
                # Linear warm-up over 10 steps, then cosine decay to a tenth over the steps (or the
                # time cap, whichever comes first).
                warmup = min(1.0, (report.steps + 1) / 10)
                lr = cfg.learning_rate * warmup * (0.55 + 0.45 * math.cos(math.pi * fraction))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = sampler.next_batch()
                h, _ = model.features(batch.idx)
                mask = batch.targets != IGNORE
                loss = F.cross_entropy(model.head(h[mask]).float(), batch.targets[mask])
                if replay_ids is not None:
                    pick = torch.randint(len(replay_ids), (cfg.batch_size,))
                    loss = loss + cfg.replay * replay_kl(model, replay_ids[pick], replay_teacher[pick])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                report.steps += 1
                report.tokens += int(mask.sum())
                elapsed = time.perf_counter() - started
                fraction = max(report.steps / cfg.steps if cfg.steps else 0.0, elapsed / budget_s)
                if best is not None and (report.steps % cfg.eval_every == 0 or fraction >= 1.0):
                    score = nll_per_note(model, val_shards, table)
                    if score is not None and score < best:
                        best, report.best_step = score, report.steps
                        best_params = [p.detach().clone() for p in params]
                    bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{score:.3f}")
                else:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
        finally:
            bar.close()
        report.train_seconds = round(time.perf_counter() - started, 1)
        if report.val_nll_per_note_before is not None:  # keep the best point on validation
            with torch.no_grad():
                for p, kept in zip(params, best_params, strict=True):
                    p.copy_(kept)
            report.val_nll_per_note_after = best
        else:
            report.best_step = report.steps
        if cfg.method == "lora":
            from model.low_rank import merge_low_rank

            merge_low_rank(lora_linears(model))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        meta = CheckpointMeta(model.cfg, base_meta.tokenizer_params, base_meta.vocab_hash,
                              step=report.best_step,
                              extra={"tune": asdict(report), "init_model_id": base_meta.model_id})
        save(model, out, meta)
    return report


# --------------------------------------------------------------------------------- command line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="adapt a checkpoint to a folder of MIDI files (your style) in minutes",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("midi_dir", metavar="MIDI_DIR", type=Path, help="folder of .mid/.midi files in the style")
    p.add_argument("out", metavar="OUT", type=Path, help="the tuned checkpoint to write (.safetensors)")
    p.add_argument("--base", type=Path, default=Path("checkpoints/default.safetensors"),
                   help="checkpoint to start from; never modified (default checkpoints/default.safetensors)")
    defaults = TuneConfig()
    p.add_argument("--method", choices=METHODS, default=defaults.method,
                   help=f"what to train (default {defaults.method}; docs/styles.md compares them)")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help=f"optimizer steps of {defaults.batch_size} windows; 0 = until --minutes "
                        f"(default {defaults.steps})")
    p.add_argument("--minutes", type=float, default=defaults.minutes,
                   help=f"cap on the training time (default {defaults.minutes:g})")
    lr_defaults = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
    p.add_argument("--lr", type=float, default=0.0, help=f"learning rate (default per method: {lr_defaults})")
    p.add_argument("--ctx-len", type=int, default=defaults.ctx_len,
                   help=f"tokens per window (default {defaults.ctx_len})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    p.add_argument("--val-pieces", type=int, default=defaults.val_pieces,
                   help="pieces held out for validation (default: one in five once there are five)")
    p.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help=f"default {defaults.lora_rank}")
    p.add_argument("--replay", type=float, default=defaults.replay,
                   help="weight of keeping the base's predictions on music it generates itself, against "
                        f"forgetting other styles; 0 = off (default {defaults.replay:g})")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    cfg = TuneConfig(method=args.method, steps=args.steps, minutes=args.minutes, lr=args.lr, ctx_len=args.ctx_len,
                     batch_size=args.batch_size, val_pieces=args.val_pieces, lora_rank=args.lora_rank,
                     replay=args.replay, seed=args.seed, threads=args.threads)
    started = time.perf_counter()
    try:
        report = tune(args.midi_dir, args.out, args.base, cfg, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"rwkv-music tune: interrupted; {args.out} was not written")
        return 130
    size_mb = args.out.stat().st_size / 1e6
    print(f"tuned {len(report.pieces)} pieces ({len(report.skipped)} skipped) with {report.method} "
          f"in {report.steps} steps, {report.tokens:,} tokens, {report.train_seconds:.0f} s of training")
    before, after = report.val_nll_per_note_before, report.val_nll_per_note_after
    if before is not None and after is not None:
        print(f"validation NLL per note on {len(report.val_pieces)} held-out pieces: {before:.3f} -> {after:.3f} "
              f"({(after / before - 1) * 100:+.1f} %)")
    else:
        print("no piece held out for validation (fewer than five pieces); the last step was kept")
    print(f"wrote {args.out} ({size_mb:.1f} MB) in {time.perf_counter() - started:.0f} s")
    return 0
