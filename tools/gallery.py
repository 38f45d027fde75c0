"""The piano-roll gallery of docs/gallery.md: held-out pieces continued by two checkpoints.

    python -m tools.gallery PIANO_DIR DATA_DIR OUT_DIR [--pieces 3] [--checkpoints A B ...]

For `--pieces` pieces of DATA_DIR's test split (never trained on) whose files lie under
PIANO_DIR and whose first `--context-bars` bars keep one time signature, it cuts those bars into
a MIDI file of their own (in a temporary folder) and lets every checkpoint continue it
`--variations` times by `--bars` bars with `rwkv-music complete`'s drawing:
OUT_DIR/<piece>-<checkpoint>.png, context grey, one coloured row per variation. Pieces are
taken in order of notes per bar (densest first), so the pictures show two-hand texture;
`--prefix` keeps to one collection.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import symusic

from model import load
from tools.complete import CompletionRequest, complete_midi


def first_bars(score: symusic.Score, bars: int) -> symusic.Score | None:
    """The first `bars` bars of `score`, or None when its meter changes within them or it is
    shorter."""
    signatures = score.time_signatures
    meter = (signatures[0].numerator, signatures[0].denominator) if len(signatures) else (4, 4)
    bar_ticks = score.ticks_per_quarter * 4 * meter[0] // meter[1]
    end = bars * bar_ticks
    if any(0 < ts.time < end for ts in signatures) or score.end() < end:
        return None
    return score.clip(0, end, clip_end=True)


def pick_pieces(piano_dir: Path, data_dir: Path, count: int, context_bars: int, prefix: str) -> list[Path]:
    """The densest `count` test pieces (notes per bar in their first bars) under `prefix`."""
    names = json.loads((data_dir / "test.names.json").read_text())
    scored = []
    for name in names:
        if not name.startswith(prefix):
            continue
        path = piano_dir / name
        cut = first_bars(symusic.Score(str(path)), context_bars)
        if cut is not None:
            scored.append((sum(len(t.notes) for t in cut.tracks), name))
    return [piano_dir / name for _, name in sorted(scored, key=lambda item: (-item[0], item[1]))[:count]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gallery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("piano_dir", type=Path)
    p.add_argument("data_dir", type=Path, help="prepared from PIANO_DIR (its test split is held out)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--checkpoints", nargs="+", type=Path,
                   default=[Path("checkpoints/default.safetensors"), Path("checkpoints/chorale.safetensors")])
    p.add_argument("--pieces", type=int, default=3)
    p.add_argument("--prefix", default="openscore-lieder/")
    p.add_argument("--context-bars", type=int, default=8)
    p.add_argument("--bars", type=int, default=4)
    p.add_argument("--variations", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    models = [(path.stem, *load(path)) for path in args.checkpoints]
    request = CompletionRequest(bars=args.bars, context_bars=args.context_bars, variations=args.variations,
                                seed=args.seed)
    # Only the pictures go to OUT_DIR: the MIDI excerpts are the corpus's data, not ours to publish.
    with tempfile.TemporaryDirectory(prefix="rwkv-gallery-") as scratch:
        for piece in pick_pieces(args.piano_dir, args.data_dir, args.pieces, args.context_bars, args.prefix):
            slug = re.sub(r"[^A-Za-z0-9]+", "-", piece.stem).strip("-")[:60]
            context = Path(scratch) / f"{slug}.mid"
            cut = first_bars(symusic.Score(str(piece)), args.context_bars)
            assert cut is not None
            cut.dump_midi(str(context))
            for label, model, meta in models:
                png = args.out_dir / f"{slug}-{label}.png"
                complete_midi(context, Path(scratch) / f"{slug}-{label}.mid", model, meta, request, png=png)
                print(f"{piece.relative_to(args.piano_dir)}: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
