"""A composer's pieces from the piano corpus, split into a folder to tune on and one to score.

    python -m tools.style_split PIANO_DIR COMPOSER SOURCE TUNE_DIR REST_DIR [--tune-pieces 8]

Reads PIANO_DIR/manifest.csv, keeps the rows of `SOURCE` (e.g. dcml) whose composer is
COMPOSER, ranks them by a hash of their path (so the choice does not depend on file order or
on this program's version of the corpus listing) and links the first `--tune-pieces` files
into TUNE_DIR and the others into REST_DIR (symbolic links: the corpus is not copied).
docs/styles.md uses it for the method comparison.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path


def split_pieces(paths: list[str], tune_pieces: int) -> tuple[list[str], list[str]]:
    """(to tune on, to score): the first `tune_pieces` paths by hash, then the rest."""
    ranked = sorted(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    return ranked[:tune_pieces], ranked[tune_pieces:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.style_split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("piano_dir", type=Path)
    parser.add_argument("composer", help='as in manifest.csv, e.g. "Frederic Chopin"')
    parser.add_argument("source", help="the manifest's source column, e.g. dcml")
    parser.add_argument("tune_dir", type=Path)
    parser.add_argument("rest_dir", type=Path)
    parser.add_argument("--tune-pieces", type=int, default=8)
    args = parser.parse_args(argv)
    with open(args.piano_dir / "manifest.csv", newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)
                 if row["source"] == args.source and row["composer"] == args.composer]
    if len(paths) <= args.tune_pieces:
        parser.error(f"{len(paths)} pieces of {args.composer} in {args.source}: not more than --tune-pieces")
    root = args.piano_dir.resolve()
    for folder, chosen in zip((args.tune_dir, args.rest_dir), split_pieces(paths, args.tune_pieces), strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        for rel in chosen:
            link = folder / Path(rel).name
            if not link.exists():
                link.symlink_to(root / rel)
        print(f"{folder}: {len(chosen)} pieces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
