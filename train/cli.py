"""`rwkv-music train`: config.toml [train] and [model] plus command-line overrides -> a run."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EPILOG = """examples:
  rwkv-music train --data data/prepared --out runs/mine
  rwkv-music train --data data/prepared --out runs/mine --max-steps 5000 --set train.lr=6e-4
  rwkv-music train --out runs/mine --resume              # continue exactly where it stopped
  rwkv-music train --data data/prepared --out runs/ft --init checkpoints/default.safetensors
                                                         # start from a checkpoint's weights
  torchrun --nproc-per-node 2 -m train --data data/prepared --out runs/ddp   # DDP

The run directory gets latest.safetensors (atomic; a running daemon can watch it),
best.safetensors, periodic step-N.safetensors, resume.safetensors, metrics.jsonl and loss.png.
Ctrl-C saves and stops; --resume continues with the same next loss.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="config.toml to read ([train], [model], [mqtt])")
    p.add_argument("--data", help="prepared directory (from `rwkv-music prepare`)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init", metavar="CKPT",
                   help="start from this checkpoint's weights and architecture, with a fresh optimizer "
                        "and schedule (staged training, adapting a model to your folder)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an RWKV-7 model on prepared token shards",
                       description="Train an RWKV-7 model on token shards written by `rwkv-music prepare`.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from model.rwkv7 import ModelConfig
    from model.settings import load_section, read_config
    from train.config import TrainConfig
    from train.errors import TrainError
    from train.loop import Trainer, distributed_cleanup

    overrides = list(args.set)
    if args.init and args.resume:
        raise TrainError("--init and --resume exclude each other: --resume continues a run, "
                         "--init starts a new one from a checkpoint")
    for key, value in (("data", args.data), ("out", args.out), ("max_steps", args.max_steps),
                       ("init", args.init)):
        if value is not None:
            overrides.append(f"train.{key}={json.dumps(value)}")
    table = read_config(args.config, overrides)
    cfg = load_section(TrainConfig, table, "train")
    model_cfg = load_section(ModelConfig, table, "model")
    with distributed_cleanup():
        trainer = Trainer(cfg, model_cfg, resume=args.resume, mqtt=table.get("mqtt"),
                          progress=not args.no_progress)
        summary = trainer.run()
    if trainer.dist.is_main:
        state = "interrupted, saved" if summary["interrupted"] else "done"
        val = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
        print(f"{state}: step {summary['step']}, val NLL {val} per token, "
              f"{summary['tokens_seen']:,} tokens in {summary['train_seconds']:.0f} s -> {summary['checkpoint']}")
    return 0
