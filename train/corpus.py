"""`rwkv-music corpus`: real music from the corpus that music21 ships, written as MIDI files.

Each collection is a folder of music21's corpus. Score formats (MusicXML, Humdrum **kern) are
parsed by music21 and written as MIDI by music21; ABC files are split into tunes at their `X:`
headers and each tune is read by symusic, which is two orders of magnitude faster than music21's
ABC parser on the large folk collections. Every written file is read back with symusic to count
its notes, so a piece in the manifest is a MIDI file known to load.

Output layout: OUT_DIR/<collection>/<piece>.mid and OUT_DIR/manifest.json (see `CorpusManifest`).
A piece that fails is counted and listed in the manifest, never fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from train.errors import CorpusError, MissingExtraError

log = logging.getLogger(__name__)

# Bumped whenever the set of pieces or the way they are written changes; caches of built
# corpora (the test fixture's) are keyed by it.
CORPUS_FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.json"

# The folder music21 keeps its corpus in, relative to the music21 package.
_MUSIC21_CORPUS_SUBDIR = "corpus"

_ENCODING_NOTE = (
    "music21's corpus/license.txt: the encodings are distributed with the permission of the "
    "encoders and, to the best of music21's knowledge, are out of copyright in the United States "
    "or licensed for use; some may not be used commercially."
)


@dataclass(frozen=True)
class CollectionSpec:
    """One collection: where its files are in the corpus and how to read them."""

    name: str
    title: str
    reader: str  # "music21" (MusicXML, kern) or "abc" (split into tunes, read by symusic)
    patterns: tuple[str, ...]  # globs relative to the corpus root
    licence: str
    exclude: tuple[str, ...] = ()  # file names left out (test excerpts, duplicates)


COLLECTIONS: dict[str, CollectionSpec] = {
    spec.name: spec
    for spec in [
        CollectionSpec(
            name="bach",
            title="J. S. Bach, four-part chorales",
            reader="music21",
            patterns=("bach/*.mxl", "bach/*.xml", "bach/*.krn"),
            licence=(
                "MusicXML encodings of the chorales by Margaret Greentree (jsbchorales.net; the "
                "files say 'PDF (c) 2004 Margaret Greentree - used by permission'), distributed "
                "with music21 by permission; the music is in the public domain. " + _ENCODING_NOTE
            ),
        ),
        CollectionSpec(
            name="palestrina",
            title="G. P. da Palestrina, mass movements",
            reader="music21",
            patterns=("palestrina/*.krn",),
            licence=(
                "Humdrum **kern encodings by John Miller ('Copyright 2000, John Miller' in every "
                "file). Their headers say each file must be accompanied by the licensing agreement "
                "of the Ohio State Humdrum Palestrina database and reserve the rights to all "
                "derivative electronic formats: the MIDI files and token shards made from them "
                "are such derivatives. Use for private research; do not redistribute them. The "
                "music itself is in the public domain."
            ),
        ),
        CollectionSpec(
            name="monteverdi",
            title="C. Monteverdi, madrigals (books 3-5)",
            reader="music21",
            patterns=("monteverdi/*.mxl",),
            licence=(
                "MusicXML encodings distributed with music21; the files state no licence of their "
                "own. The music is in the public domain. " + _ENCODING_NOTE
            ),
        ),
        CollectionSpec(
            name="piano",
            title="Keyboard pieces (Chopin, Joplin, Mozart, C. Schumann, Schoenberg, C. P. E. Bach)",
            reader="music21",
            patterns=(
                "chopin/*.krn",
                "joplin/*.mxl",
                "mozart/k545/*.mxl",
                "schumann_clara/polonaise_op1n*.mxl",
                "schoenberg/opus19/*.mxl",
                "cpebach/*.mxl",
            ),
            licence=(
                "Encodings from several sources, named in the files where known: Chopin in "
                "Humdrum kern encoded by Craig Stuart Sapp (KernScores), Joplin from musescore.com, "
                "C. Schumann typeset for IMSLP; the files state no licence of their own. "
                "Schoenberg's Op. 19 (1911) is public domain in the United States but may still "
                "be under copyright where the term is life + 70 years (he died in 1951). "
                + _ENCODING_NOTE
            ),
        ),
        CollectionSpec(
            name="essen",
            title="Essen folksong collection (EsAC), ABC",
            reader="abc",
            patterns=("essenFolksong/*.abc",),
            # test*.abc are small excerpts music21 keeps for its own tests.
            exclude=("test0.abc", "test1.abc", "testd.abc", "teste.abc"),
            licence=(
                "corpus/essenFolksong/license.txt: the legal status of the Essen database is "
                "unclear (many encoders); Prof. Ewa Dahlig-Turek gave permission for "
                "non-commercial distribution and use in music21; the ABC conversion is by "
                "Seymour Shlien, distributed by his permission. Treat as non-commercial."
            ),
        ),
        CollectionSpec(
            name="oneills",
            title="O'Neill's Music of Ireland (1850 tunes, 1903), ABC",
            reader="abc",
            patterns=("oneills1850/*.abc",),
            licence=(
                "The tunes are traditional and the 1903 book is in the public domain; the ABC "
                "transcriptions name their transcribers (e.g. Norbert Paap) in Z: fields and "
                "carry no licence of their own. " + _ENCODING_NOTE
            ),
        ),
        CollectionSpec(
            name="ryans",
            title="Ryan's Mammoth Collection (1883), ABC",
            reader="abc",
            patterns=("ryansMammoth/*.abc",),
            licence=(
                "The 1883 book is in the public domain; the ABC transcriptions were contributed "
                "by volunteers (named in Z: fields) and carry no licence of their own. "
                + _ENCODING_NOTE
            ),
        ),
        CollectionSpec(
            name="airds",
            title="Aird's Selection of Scotch, English, Irish and Foreign Airs (1778-1803), ABC",
            reader="abc",
            patterns=("airdsAirs/*.abc",),
            licence=(
                "The 18th-century books are in the public domain; the ABC transcriptions carry "
                "no licence of their own. " + _ENCODING_NOTE
            ),
        ),
        CollectionSpec(
            name="misc_folk",
            title="American fife and Northumbrian minstrelsy tunes, ABC",
            reader="abc",
            patterns=("miscFolk/*.abc",),
            licence="Traditional tunes in 19th-century books; ABC transcriptions. " + _ENCODING_NOTE,
        ),
    ]
}

DEFAULT_COLLECTIONS: tuple[str, ...] = tuple(COLLECTIONS)


@dataclass(frozen=True)
class PieceJob:
    """One piece to write: a score file, or one tune of an ABC file (then `abc_text` is set)."""

    collection: str
    source: str  # path relative to the corpus root, POSIX separators
    output: str  # path relative to the output directory
    tune_index: int | None = None  # 1-based position of the tune in its ABC file
    tune_label: str | None = None  # the tune's X: value
    title: str | None = None
    abc_text: str | None = None


@dataclass
class PieceRecord:
    """A piece written to the corpus; `path` is relative to the output directory."""

    collection: str
    source: str
    path: str
    notes: int
    duration_s: float
    tune_index: int | None = None
    tune_label: str | None = None
    title: str | None = None


@dataclass
class PieceFailure:
    """A piece that could not be written, with the reason."""

    collection: str
    source: str
    reason: str
    tune_index: int | None = None


@dataclass
class CollectionSummary:
    """Counts of one collection in a built corpus."""

    name: str
    title: str
    pieces: int = 0
    failures: int = 0
    notes: int = 0
    duration_s: float = 0.0
    licence: str = ""


@dataclass
class CorpusManifest:
    """What `build_corpus` wrote: every piece, every failure, counts and licence notes."""

    version: int
    music21_version: str | None
    symusic_version: str
    licence: str
    collections: dict[str, CollectionSummary] = field(default_factory=dict)
    pieces: list[PieceRecord] = field(default_factory=list)
    failures: list[PieceFailure] = field(default_factory=list)

    def midi_paths(self, out_dir: Path | str) -> list[Path]:
        """Absolute paths of the written MIDI files, in manifest order."""
        root = Path(out_dir)
        return [root / p.path for p in self.pieces]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CorpusManifest:
        return cls(
            version=int(data["version"]),
            music21_version=data.get("music21_version"),
            symusic_version=data["symusic_version"],
            licence=data.get("licence", ""),
            collections={k: CollectionSummary(**v) for k, v in data["collections"].items()},
            pieces=[PieceRecord(**p) for p in data["pieces"]],
            failures=[PieceFailure(**f) for f in data["failures"]],
        )

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path | str) -> CorpusManifest:
        """Read OUT_DIR/manifest.json (or the given file)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorpusError(f"{path}: not a readable corpus manifest ({err})") from err


# ---------------------------------------------------------------------------------------------
# Finding the pieces


def music21_corpus_root() -> Path:
    """The folder of the corpus that ships with music21 (raises if music21 or its corpus is missing)."""
    try:
        import music21
    except ImportError as err:
        raise MissingExtraError("music21", "corpus") from err
    root = Path(music21.__file__).parent / _MUSIC21_CORPUS_SUBDIR
    if not (root / "bach").is_dir():
        raise CorpusError(f"music21 {music21.__version__} is installed without its corpus ({root})")
    return root


def _read_abc_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # The older folk transcriptions are Latin-1.
        return raw.decode("latin-1")


_TUNE_START = re.compile(r"^X:", re.MULTILINE)
_FIELD_LINE = re.compile(r"^[A-Za-z]:")


def split_abc_tunes(text: str) -> list[tuple[str, str, str | None]]:
    """Split an ABC file into tunes: [(X value, tune text, title)].

    Field lines of the file header (before the first `X:`) apply to every tune in ABC, so they
    are repeated in front of each tune; comment lines of the header are dropped.
    """
    starts = [m.start() for m in _TUNE_START.finditer(text)]
    if not starts:
        return []
    header = [ln for ln in text[: starts[0]].splitlines() if _FIELD_LINE.match(ln)]
    tunes = []
    for begin, end in zip(starts, starts[1:] + [len(text)], strict=True):
        body = text[begin:end].strip("\n")
        lines = body.splitlines()
        label = lines[0][2:].strip()
        title = next((ln[2:].strip() for ln in lines[1:] if ln.startswith("T:")), None)
        # The X: line comes first in a tune; the header fields follow it.
        tune = "\n".join([lines[0], *header, *lines[1:]]) + "\n"
        tunes.append((label, tune, title))
    return tunes


def _tune_fingerprint(tune_text: str) -> str:
    """Hash of a tune without its X: line, to drop the same tune filed twice."""
    body = "\n".join(ln.strip() for ln in tune_text.splitlines()[1:] if ln.strip())
    return hashlib.sha1(body.encode()).hexdigest()


def _source_files(root: Path, spec: CollectionSpec) -> list[Path]:
    files: dict[str, Path] = {}
    for pattern in spec.patterns:
        for path in sorted(root.glob(pattern)):
            if path.is_file() and path.name not in spec.exclude:
                files.setdefault(path.relative_to(root).as_posix(), path)
    if spec.reader == "music21":
        # A score encoded twice (kern next to MusicXML) is kept once, the MusicXML one.
        by_stem: dict[str, Path] = {}
        rank = {".mxl": 0, ".xml": 1, ".musicxml": 1, ".krn": 2}
        for _rel, path in sorted(files.items()):
            key = str(path.with_suffix(""))
            best = by_stem.get(key)
            if best is None or rank.get(path.suffix, 9) < rank.get(best.suffix, 9):
                by_stem[key] = path
        return sorted(by_stem.values())
    return [files[k] for k in sorted(files)]


def _output_name(spec: CollectionSpec, root: Path, path: Path) -> str:
    """A file name for a source: its path below the collection's folder, joined by '-'."""
    parts = path.relative_to(root).with_suffix("").parts
    top_folders = {pattern.split("/", 1)[0] for pattern in spec.patterns}
    # A collection spread over several composers' folders keeps the composer in the name.
    return "-".join(parts[1:] if len(top_folders) == 1 and len(parts) > 1 else parts)


def _collection_jobs(root: Path, spec: CollectionSpec) -> list[PieceJob]:
    jobs: list[PieceJob] = []
    seen: set[str] = set()
    for path in _source_files(root, spec):
        source = path.relative_to(root).as_posix()
        stem = _output_name(spec, root, path)
        if spec.reader == "music21":
            jobs.append(PieceJob(spec.name, source, f"{spec.name}/{stem}.mid"))
            continue
        try:
            tunes = split_abc_tunes(_read_abc_text(path))
        except OSError as err:
            log.warning("%s: cannot read (%s)", source, err)
            continue
        for index, (label, tune, title) in enumerate(tunes, start=1):
            fingerprint = _tune_fingerprint(tune)
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            jobs.append(
                PieceJob(
                    spec.name,
                    source,
                    f"{spec.name}/{stem}-{index:04d}.mid",
                    tune_index=index,
                    tune_label=label,
                    title=title,
                    abc_text=tune,
                )
            )
    return jobs


def _evenly_spaced(jobs: list[PieceJob], limit: int | None) -> list[PieceJob]:
    """At most `limit` jobs spread over the whole list, so a small corpus still spans every file."""
    if limit is None or limit >= len(jobs):
        return jobs
    if limit <= 0:
        return []
    step = len(jobs) / limit
    return [jobs[int(i * step)] for i in range(limit)]


def plan_corpus(
    collections: Sequence[str],
    limit: int | Mapping[str, int] | None = None,
    corpus_root: Path | None = None,
) -> list[PieceJob]:
    """The pieces `build_corpus` would write, in order.

    limit: at most this many pieces per collection, or a {collection: count} mapping
    (collections it does not name are not limited).
    """
    unknown = [c for c in collections if c not in COLLECTIONS]
    if unknown:
        raise CorpusError(f"unknown collection(s) {', '.join(unknown)}; known: {', '.join(COLLECTIONS)}")
    root = Path(corpus_root) if corpus_root is not None else music21_corpus_root()
    if not root.is_dir():
        raise CorpusError(f"corpus folder {root} does not exist")
    jobs: list[PieceJob] = []
    for name in collections:
        found = _collection_jobs(root, COLLECTIONS[name])
        if not found:
            log.warning("collection %s: no source files under %s", name, root)
        cap = limit.get(name) if isinstance(limit, Mapping) else limit
        jobs.extend(_evenly_spaced(found, cap))
    return jobs


# ---------------------------------------------------------------------------------------------
# Writing one piece (runs in worker processes)


@contextlib.contextmanager
def _silenced_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null: symusic's ABC reader prints a line per odd bar."""
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        libc.fflush(None)
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)  # flush C-level buffers while they still point at /dev/null
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _write_with_music21(source: Path, out: Path) -> None:
    from music21 import converter
    from music21.repeat import ExpanderException

    with warnings.catch_warnings():
        # music21 warns about every odd spelling in the encodings; the MIDI is still right.
        warnings.simplefilter("ignore")
        score = converter.parse(source, forceSource=True)
        try:
            score.write("midi", fp=str(out))
        except ExpanderException:
            # The MIDI writer unrolls repeats; a few encodings have repeat signs it cannot
            # pair up. Their music is still worth having, played once through.
            _drop_repeats(score)
            score.write("midi", fp=str(out))


def _drop_repeats(score) -> None:
    """Remove repeat barlines and repeat expressions (segno, D.C.) from a music21 score."""
    from music21 import bar, repeat, stream

    for measure in score.recurse().getElementsByClass(stream.Measure):
        if isinstance(measure.leftBarline, bar.Repeat):
            measure.leftBarline = None
        if isinstance(measure.rightBarline, bar.Repeat):
            measure.rightBarline = None
    for element in list(score.recurse().getElementsByClass(repeat.RepeatExpression)):
        element.activeSite.remove(element)


def read_abc_tune(text: str):
    """One ABC tune (text from `split_abc_tunes`) -> symusic.Score, with the parser's chatter muted."""
    import symusic

    with _silenced_stdout():
        return symusic.Score.from_abc(text)


def _write_abc_tune(text: str, out: Path) -> None:
    read_abc_tune(text).dump_midi(str(out))


def convert_piece(job: PieceJob, corpus_root: Path, out_dir: Path) -> PieceRecord | PieceFailure:
    """Write one piece as MIDI and read it back; any error becomes a `PieceFailure`."""
    import symusic

    out = out_dir / job.output
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.stem + ".tmp.mid")
        if job.abc_text is not None:
            _write_abc_tune(job.abc_text, tmp)
        else:
            _write_with_music21(corpus_root / job.source, tmp)
        score = symusic.Score(str(tmp))
        notes = sum(len(track.notes) for track in score.tracks)
        if notes == 0:
            tmp.unlink(missing_ok=True)
            return PieceFailure(job.collection, job.source, "no notes", job.tune_index)
        duration_s = float(score.to("second").end())
        os.replace(tmp, out)
    except Exception as err:  # noqa: BLE001 - any parser error means "skip this piece"
        with contextlib.suppress(OSError):
            out.with_name(out.stem + ".tmp.mid").unlink(missing_ok=True)
        reason = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
        return PieceFailure(job.collection, job.source, reason, job.tune_index)
    return PieceRecord(
        collection=job.collection,
        source=job.source,
        path=job.output,
        notes=notes,
        duration_s=round(duration_s, 3),
        tune_index=job.tune_index,
        tune_label=job.tune_label,
        title=job.title,
    )


# ---------------------------------------------------------------------------------------------
# Building the corpus


def _remove_previous_build(out_dir: Path, collections: Sequence[str]) -> None:
    """Delete the MIDI files an earlier build listed, for the collections being rebuilt."""
    manifest = out_dir / MANIFEST_NAME
    if not manifest.exists():
        return
    try:
        old = CorpusManifest.read(manifest)
    except CorpusError:
        return
    for piece in old.pieces:
        if piece.collection in collections:
            (out_dir / piece.path).unlink(missing_ok=True)


def build_corpus(
    out_dir: Path | str,
    collections: Sequence[str] = DEFAULT_COLLECTIONS,
    limit: int | Mapping[str, int] | None = None,
    jobs: int | None = None,
    corpus_root: Path | str | None = None,
    progress: bool = True,
) -> CorpusManifest:
    """Write the chosen collections as MIDI under `out_dir` and return (and write) the manifest.

    limit: at most this many pieces per collection (or a {collection: count} mapping), spread
        evenly over the collection's files.
    jobs: worker processes (default: all cores; 1 runs in this process).
    corpus_root: a folder laid out like music21's corpus (default: music21's own).
    Failures are counted per collection and listed in the manifest; they never raise.
    """
    out = Path(out_dir)
    root = Path(corpus_root) if corpus_root is not None else music21_corpus_root()
    collections = list(dict.fromkeys(collections))
    planned = plan_corpus(collections, limit, root)
    if any(COLLECTIONS[c].reader == "music21" for c in collections):
        try:
            import music21  # noqa: F401 - only checks that the extra is installed
        except ImportError as err:
            raise MissingExtraError("music21", "corpus") from err
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_build(out, collections)
    workers = max(1, jobs if jobs is not None else (os.cpu_count() or 1))
    log.info("corpus: %d pieces from %s with %d worker(s)", len(planned), ", ".join(collections), workers)

    results: list[PieceRecord | PieceFailure] = []
    bar = _progress_bar(len(planned), "corpus", progress)
    try:
        if workers == 1:
            for job in planned:
                results.append(convert_piece(job, root, out))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(convert_piece, job, root, out) for job in planned]
                for future in as_completed(futures):
                    results.append(future.result())
                    bar.update(1)
    finally:
        bar.close()

    manifest = _summarise(collections, results)
    manifest.write(out / MANIFEST_NAME)
    return manifest


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="piece", disable=not enabled, dynamic_ncols=True)


def _summarise(collections: Sequence[str], results: list[PieceRecord | PieceFailure]) -> CorpusManifest:
    import symusic

    try:
        import music21

        music21_version: str | None = music21.__version__
    except ImportError:
        music21_version = None
    order = {name: i for i, name in enumerate(collections)}

    def sort_key(r: PieceRecord | PieceFailure) -> tuple:
        return (order[r.collection], r.source, r.tune_index or 0)

    pieces = sorted((r for r in results if isinstance(r, PieceRecord)), key=sort_key)
    failures = sorted((r for r in results if isinstance(r, PieceFailure)), key=sort_key)
    summaries = {
        name: CollectionSummary(name=name, title=COLLECTIONS[name].title, licence=COLLECTIONS[name].licence)
        for name in collections
    }
    for piece in pieces:
        s = summaries[piece.collection]
        s.pieces += 1
        s.notes += piece.notes
        s.duration_s = round(s.duration_s + piece.duration_s, 3)
    for failure in failures:
        summaries[failure.collection].failures += 1
    return CorpusManifest(
        version=CORPUS_FORMAT_VERSION,
        music21_version=music21_version,
        symusic_version=getattr(symusic, "__version__", "unknown"),
        licence=_ENCODING_NOTE,
        collections=summaries,
        pieces=pieces,
        failures=failures,
    )


# ---------------------------------------------------------------------------------------------
# Command line

_EPILOG = """examples:
  rwkv-music corpus data/midi                               # every collection, all cores
  rwkv-music corpus data/midi --collections bach essen --limit 50
  rwkv-music corpus data/midi --jobs 1                      # one process, easier to debug

collections: {names}
Each piece becomes OUT_DIR/<collection>/<name>.mid; OUT_DIR/manifest.json lists the pieces,
their note counts and durations, the failures per collection and the licence notes.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "corpus",
        help="write music21's corpus (chorales, folk songs, piano pieces) as MIDI files",
        description=(
            "Write real music from the corpus that music21 ships as MIDI files: Bach chorales, "
            "Palestrina, Monteverdi, keyboard pieces and the folk collections (read as ABC, one "
            "piece per tune). Needs the corpus extra: pip install 'rwkv-music[corpus]'."
        ),
        epilog=_EPILOG.format(names=", ".join(COLLECTIONS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write into")
    parser.add_argument(
        "--collections",
        nargs="+",
        default=list(DEFAULT_COLLECTIONS),
        metavar="NAME",
        help="collections to write (default: all)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="at most N pieces per collection"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, metavar="J", help="worker processes (default: cores)"
    )
    parser.add_argument(
        "--corpus-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="read the collections from DIR (laid out like music21's corpus) instead of music21's own",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_corpus)


def run_corpus(args: argparse.Namespace) -> int:
    import time

    if args.limit is not None and args.limit < 0:
        raise CorpusError("--limit must be >= 0")
    if args.jobs is not None and args.jobs < 1:
        raise CorpusError("--jobs must be >= 1")
    started = time.perf_counter()
    manifest = build_corpus(
        args.out_dir,
        collections=args.collections,
        limit=args.limit,
        jobs=args.jobs,
        corpus_root=args.corpus_root,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - started
    for s in manifest.collections.values():
        print(
            f"  {s.name:<11} {s.pieces:>6} pieces {s.notes:>9} notes {s.duration_s / 3600:7.2f} h"
            f"  {s.failures} failed"
        )
    total_failed = len(manifest.failures)
    print(
        f"corpus: {len(manifest.pieces)} pieces, {sum(p.notes for p in manifest.pieces)} notes, "
        f"{total_failed} failed, {elapsed:.1f} s -> {args.out_dir / MANIFEST_NAME}"
    )
    return 0
