"""`rwkv-music score DATA CKPT [CKPT ...]`: NLL per note of checkpoints on the same music, side by side.

DATA is a folder of MIDI files (tokenized into a temporary directory with the first checkpoint's
tokenizer; unreadable files are skipped and counted) or a prepared directory (`--split`, default
test). Every piece is scored whole from BOS, as the daemon hears a conversation, and the NLL per
note is also given by position in the piece: over tokens 0-512, 512-2048 and from 2048 on, which
shows whether a tuned initial state still helps deep into a long piece. The first checkpoint is
the reference for the relative column, so put the base model first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

EPILOG = """examples:
  rwkv-music score mazurkas/ checkpoints/default.safetensors styles/mazurka.safetensors
  rwkv-music score data/prepared-piano checkpoints/default.safetensors styles/mazurka.safetensors --split test
  rwkv-music score my-pieces/ checkpoints/default.safetensors styles/mine.safetensors --json
"""

# Token positions in a piece (after BOS) at which the bands start: the opening, the middle, and
# "deep into the piece", where an initial state's influence may have faded.
BANDS = (0, 512, 2048)


@dataclass
class Score:
    """NLL per note (nats) of one checkpoint on one set of pieces, overall and by band."""

    checkpoint: str
    model_id: str
    nll_per_note: float
    bands: dict[str, float | None]  # "0-512", "512-2048", "2048+" -> NLL per note (None: no notes)
    seconds: float


def band_names() -> list[str]:
    return [f"{lo}-{hi}" for lo, hi in zip(BANDS, BANDS[1:], strict=False)] + [f"{BANDS[-1]}+"]


def score_pieces(model, pieces: list[np.ndarray], pitch_of: np.ndarray) -> tuple[float, dict[str, float | None]]:
    """(NLL per note overall, per band) of `model` on BOS-prefixed pieces int64 [n]."""
    from tools.evaluate import token_nlls

    edges = [*BANDS, np.inf]
    nll_sum = np.zeros(len(BANDS))
    note_count = np.zeros(len(BANDS))
    for piece, nll in zip(pieces, token_nlls(model, pieces), strict=True):  # target j is piece[j + 1]
        is_note = pitch_of[piece[1:]] >= 0
        position = np.arange(len(nll))
        for b in range(len(BANDS)):
            in_band = (position >= edges[b]) & (position < edges[b + 1])
            nll_sum[b] += nll[in_band].sum()
            note_count[b] += np.count_nonzero(is_note & in_band)
    overall = float(nll_sum.sum() / max(1.0, note_count.sum()))
    bands = {name: (float(nll_sum[b] / note_count[b]) if note_count[b] else None)
             for b, name in enumerate(band_names())}
    return overall, bands


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="NLL per note of checkpoints on a MIDI folder or prepared split, side by side",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a folder of MIDI files, or a prepared directory")
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CKPT", help="checkpoints (the first is the reference)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="split of a prepared directory (default test)")
    p.add_argument("--pieces", type=int, default=0, metavar="N", help="score only the first N pieces (0 = all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_score)


def _pieces(data: Path, split: str, meta, tmp: str) -> tuple[list[np.ndarray], int]:
    """BOS-prefixed pieces of DATA and the number of skipped files."""
    from tools.cli import UserError
    from tools.evaluate import checked_split, pieces_of
    from train.prepare import prepare
    from train.shards import TOKENIZER_FILE
    from train.windows import TokenTable

    bos = TokenTable.from_vocab(meta.tokenizer().vocab).bos_id
    if (data / TOKENIZER_FILE).is_file():
        return pieces_of(checked_split(data, split, Path("the checkpoints"), meta), 0, bos), 0
    if not data.is_dir():
        raise UserError(f"{data} is neither a folder of MIDI files nor a prepared directory")
    summary = prepare(data, tmp, tokenizer_params=meta.tokenizer_params, progress=False,
                      assign_split=lambda rel: "test")
    if summary.pieces == 0:
        raise UserError(f"no readable piece to score in {data} ({len(summary.skipped)} files skipped)")
    return pieces_of(checked_split(Path(tmp), "test", Path("the checkpoints"), meta), 0, bos), len(summary.skipped)


def run_score(args: argparse.Namespace) -> int:
    from model import load, read_meta
    from tools.cli import UserError
    from train.windows import TokenTable

    metas = [read_meta(path) for path in args.checkpoints]
    if len({m.vocab_hash for m in metas}) > 1:
        raise UserError("the checkpoints have different tokenizers; they cannot score the same tokens")
    pitch_of = TokenTable.from_vocab(metas[0].tokenizer().vocab).pitch_of
    if args.pieces < 0:
        raise UserError("--pieces must be >= 0")
    with tempfile.TemporaryDirectory(prefix="rwkv-music-score-") as tmp:
        pieces, skipped = _pieces(args.data, args.split, metas[0], tmp)
    pieces = pieces[: args.pieces or None]
    scores = []
    for path in args.checkpoints:
        started = time.perf_counter()
        model, meta = load(path)
        overall, bands = score_pieces(model, pieces, pitch_of)
        scores.append(Score(str(path), meta.model_id, overall, bands, round(time.perf_counter() - started, 1)))
    notes = sum(int(np.count_nonzero(pitch_of[p[1:]] >= 0)) for p in pieces)
    if args.json:
        print(json.dumps({"data": str(args.data), "pieces": len(pieces), "notes": notes, "skipped": skipped,
                          "scores": [asdict(s) for s in scores]}, indent=1))
        return 0
    print(f"{args.data}: {len(pieces)} pieces, {notes:,} notes" + (f", {skipped} files skipped" if skipped else ""))
    names = band_names()
    print(f"{'checkpoint':<44} {'NLL/note':>9} {'vs first':>9} " + " ".join(f"{n:>10}" for n in names))
    for s in scores:
        change = (s.nll_per_note / scores[0].nll_per_note - 1) * 100
        bands = " ".join(f"{s.bands[n]:>10.3f}" if s.bands[n] is not None else f"{'-':>10}" for n in names)
        print(f"{s.checkpoint[-44:]:<44} {s.nll_per_note:>9.3f} {change:>+8.1f}% {bands}")
    return 0
