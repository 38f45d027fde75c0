"""`rwkv-music eval CKPT DATA_DIR`: how well a checkpoint predicts held-out music.

NLL per token and per note (nats) of the model on a split of prepared shards, beside an n-gram
baseline over the same tokens fitted on the train split. Pieces are scored whole, from BOS,
with the recurrent state carried through windows, as the daemon hears them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EPILOG = """examples:
  rwkv-music eval checkpoints/default.safetensors data/prepared-default
  rwkv-music eval runs/mine/best.safetensors data/prepared --split val --max-tokens 100000 --json
"""


@dataclass
class NllResult:
    name: str
    nll_per_token: float
    nll_per_note: float
    tokens: int
    notes: int
    seconds: float


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="NLL of a checkpoint on held-out pieces, beside an n-gram baseline",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint")
    p.add_argument("data", type=Path, help="a prepared directory (rwkv-music prepare)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="held-out split (default test)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens' pieces (0 = all)")
    p.add_argument("--ngram-order", type=int, default=0,
                   help="n-gram order; 0 = pick the best of 2..6 on the val split (default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_eval)


def pieces_of(shards, max_tokens: int, bos_id: int) -> list[list[int]]:
    """The split's pieces as BOS-prefixed id lists, stopping after max_tokens (0 = all)."""
    out, total = [], 0
    for i in range(len(shards)):
        piece = [bos_id] + shards.piece(i).astype(int).tolist()
        out.append(piece)
        total += len(piece) - 1
        if max_tokens and total >= max_tokens:
            break
    return out


def model_nll(model, pieces: list[list[int]], window: int = 1024) -> tuple[float, int]:
    """Summed NLL (nats) of every token after BOS, and the count, state carried per piece."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for piece in pieces:
            state = model.init_state(1)
            ids = torch.tensor(piece)
            for start in range(0, len(piece) - 1, window):
                x = ids[start: start + window][None]
                y = ids[start + 1: start + window + 1]
                h, state = model.features(x[:, : len(y)], state)
                total += float(F.cross_entropy(model.head(h[0]).float(), y, reduction="sum"))
                count += len(y)
    return total, count


def fit_ngram(train_shards, vocab_size: int, order: int, bos_id: int):
    from tools.ngram import NGramModel

    return NGramModel(order, vocab_size).fit(pieces_of(train_shards, 0, bos_id))


def run_eval(args: argparse.Namespace) -> int:
    from model import load
    from tools.cli import UserError
    from train.shards import TokenShards

    model, meta = load(args.checkpoint)
    shards = TokenShards(args.data, args.split, expected_vocab_hash=None)
    if shards.vocab_hash != meta.vocab_hash:
        raise UserError(f"{args.data} was prepared with another vocabulary than {args.checkpoint}")
    if len(shards) == 0:
        raise UserError(f"the {args.split} split of {args.data} is empty")
    tokenizer = meta.tokenizer()
    bos = tokenizer.vocab["BOS_None"]
    is_pitch = [name.startswith("Pitch_") for name, _ in sorted(tokenizer.vocab.items(), key=lambda kv: kv[1])]
    pieces = pieces_of(shards, args.max_tokens, bos)
    notes = sum(is_pitch[t] for piece in pieces for t in piece)

    results = []
    t0 = time.perf_counter()
    total, count = model_nll(model, pieces)
    results.append(NllResult(f"RWKV-7 {meta.model_id}", total / count, total / max(1, notes), count, notes,
                             time.perf_counter() - t0))

    train = TokenShards(args.data, "train")
    order = args.ngram_order
    if order == 0:  # the baseline gets its best order, chosen on val (not on the scored split)
        val_pieces = pieces_of(TokenShards(args.data, "val"), 50_000, bos)
        full = fit_ngram(train, model.cfg.vocab_size, 6, bos)
        scores = {}
        for candidate in range(2, 7):
            nll, n = full.with_order(candidate).nll(val_pieces)
            scores[candidate] = nll / n
            log.info("n-gram order %d: val NLL %.4f", candidate, nll / n)
        order = min(scores, key=scores.get)
        ngram = full.with_order(order)
    else:
        ngram = fit_ngram(train, model.cfg.vocab_size, order, bos)
    t0 = time.perf_counter()
    total, count = ngram.nll(pieces)
    results.append(NllResult(f"{order}-gram (abs. discounting)", total / count, total / max(1, notes), count,
                             notes, time.perf_counter() - t0))

    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split,
                          "results": [asdict(r) for r in results]}, indent=1))
    else:
        print(f"{args.split} split of {args.data}: {len(pieces)} pieces, {count:,} tokens, {notes:,} notes")
        print(f"{'model':<32} {'NLL/token':>10} {'NLL/note':>10}")
        for r in results:
            print(f"{r.name:<32} {r.nll_per_token:>10.4f} {r.nll_per_note:>10.3f}")
    return 0
