"""`rwkv-music prepare`: a folder of MIDI (and ABC) files -> REMI token shards per split.

Every file is read with symusic, its tracks are merged into one piano stream (drum tracks
dropped; tempo changes, time signatures and sustain pedal kept) and encoded by the REMI
tokenizer of `model.vocab`. An ABC file gives one piece per tune. Pieces go to train, val or
test by a hash of their file's relative path, so the split never changes when files are added.

Output (see `train.shards` for the reader and docs/data.md for the format):

    OUT_DIR/<split>.tokens.npy       uint16 [n_tokens]        every piece of the split, concatenated
    OUT_DIR/<split>.pieces.npy       int64  [n_pieces + 1]    piece i is tokens[offsets[i]:offsets[i+1]]
    OUT_DIR/<split>.bars.npy         int64  [n_bars]          index into tokens of every Bar token
    OUT_DIR/<split>.bar_context.npy  int32  [n_bars, 2]       Tempo and TimeSig id in force, -1 if none
    OUT_DIR/<split>.names.json       [n_pieces] piece names (relative path, "#<tune>" for ABC)
    OUT_DIR/tokenizer.json           tokenizer params, vocabulary hash and size
    OUT_DIR/prepare.json             summary: counts per split, skipped files with reasons
    OUT_DIR/cache/                   one entry per input file, reused while the file is unchanged

Unreadable files (truncated, not MIDI, empty, no notes) are skipped and listed with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.errors import PrepareError
from train.shards import SPLITS, TOKENIZER_FILE

log = logging.getLogger(__name__)

# Part of every cache key: bump when the way a file becomes tokens changes.
PREPARE_FORMAT_VERSION = 1

INPUT_SUFFIXES = frozenset({".mid", ".midi", ".abc"})
SUMMARY_FILE = "prepare.json"
CACHE_DIR = "cache"
ABC_TUNE_SEPARATOR = "#"  # piece name of tune i of a.abc: "a.abc#i"
# Up to this many files to tokenize, `jobs=None` uses no worker processes (each would import
# miditok and torch first, seconds of start-up for a moment's work).
IN_PROCESS_FILES = 16


@dataclass(frozen=True)
class SourceFile:
    """An input file and what its cache key is made of."""

    rel: str  # path relative to the input folder, POSIX separators
    path: Path
    size: int
    mtime_ns: int


@dataclass
class FileTokens:
    """What one input file gave: its pieces' token ids and the parts that were skipped."""

    rel: str
    pieces: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (name, uint16 [n])
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


@dataclass
class SplitSummary:
    pieces: int = 0
    tokens: int = 0
    bars: int = 0


@dataclass
class PrepareSummary:
    """prepare.json: what went in, what came out, and what was skipped (with reasons)."""

    files_found: int
    files_reused: int
    files_tokenized: int
    pieces: int
    tokens: int
    vocab_hash: str
    vocab_size: int
    val_fraction: float
    test_fraction: float
    splits: dict[str, SplitSummary]
    folders: dict[str, dict[str, int]]  # top-level input folder -> {"pieces", "tokens"}
    skipped: list[dict[str, str]]  # [{"path", "reason"}]
    elapsed_s: float = 0.0

    def line(self) -> str:
        """The one-line summary the command prints."""
        parts = ", ".join(f"{name} {s.pieces}" for name, s in self.splits.items())
        return (
            f"prepare: {self.files_found} files -> {self.pieces} pieces ({parts}), "
            f"{self.tokens} tokens; skipped {len(self.skipped)}; "
            f"reused {self.files_reused}, tokenized {self.files_tokenized}; {self.elapsed_s:.1f} s"
        )


# ---------------------------------------------------------------------------------------------
# Tokenizer configuration


def resolve_tokenizer_params(config: str | None) -> dict[str, Any]:
    """The tokenizer params: `model.vocab.DEFAULT_TOKENIZER_PARAMS` with overrides applied.

    config: None, a path to a JSON file, or inline JSON ("{...}"), holding a dict of miditok
    TokenizerConfig parameters in the JSON-friendly form of `model.vocab`.
    """
    from model.vocab import DEFAULT_TOKENIZER_PARAMS

    params = json.loads(json.dumps(DEFAULT_TOKENIZER_PARAMS))  # deep copy
    if config is None:
        return params
    text = config
    if not config.lstrip().startswith("{"):
        try:
            text = Path(config).read_text()
        except OSError as err:
            raise PrepareError(f"--tokenizer-config {config}: {err.strerror or err}") from err
    try:
        overrides = json.loads(text)
    except ValueError as err:
        raise PrepareError(f"--tokenizer-config: not valid JSON ({err})") from err
    if not isinstance(overrides, dict):
        raise PrepareError("--tokenizer-config: expected a JSON object of tokenizer parameters")
    unknown = sorted(set(overrides) - _known_tokenizer_keys())
    if unknown:
        raise PrepareError(f"--tokenizer-config: unknown tokenizer parameter(s) {', '.join(unknown)}")
    params.update(overrides)
    return params


def _known_tokenizer_keys() -> set[str]:
    import inspect

    from miditok import TokenizerConfig

    from model.vocab import DEFAULT_TOKENIZER_PARAMS

    names = set(inspect.signature(TokenizerConfig.__init__).parameters) - {"self", "kwargs"}
    return names | set(DEFAULT_TOKENIZER_PARAMS)


def build_checked_tokenizer(params: dict[str, Any]):
    """The REMI tokenizer for `params`; its ids must fit the uint16 shards."""
    from model.vocab import build_tokenizer

    try:
        tokenizer = build_tokenizer(params)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise PrepareError(f"tokenizer parameters rejected by miditok: {err}") from err
    if len(tokenizer) > np.iinfo(np.uint16).max + 1:
        raise PrepareError(f"vocabulary of {len(tokenizer)} tokens does not fit uint16 shards")
    return tokenizer


def encoding_hash(params: dict[str, Any], vocab_hash: str) -> str:
    """What the cache trusts: same params, vocabulary, miditok version and format -> same ids."""
    from importlib.metadata import version as dist_version

    version = dist_version("miditok")
    blob = json.dumps(
        [PREPARE_FORMAT_VERSION, version, vocab_hash, params], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading and encoding one file (runs in worker processes)


def merge_to_piano(score):
    """All non-drum tracks of a symusic Score in one track (program 0), tempo/meter kept.

    Notes, sustain pedals and control changes of every melodic track go to one "piano" track;
    tempos, time signatures and key signatures are score-level in symusic and stay as they are.
    """
    import symusic

    merged = symusic.Score(score.ticks_per_quarter)
    merged.tempos = score.tempos
    merged.time_signatures = score.time_signatures
    merged.key_signatures = score.key_signatures
    piano = symusic.Track("piano", 0, False)
    for track in score.tracks:
        if track.is_drum:
            continue
        piano.notes.extend(track.notes)
        piano.pedals.extend(track.pedals)
        piano.controls.extend(track.controls)
    piano.sort()
    merged.tracks.append(piano)
    return merged


def encode_score(tokenizer, score) -> np.ndarray:
    """REMI ids (uint16 [n]) of a score merged to one piano stream; empty if nothing is left."""
    return _encode_merged(tokenizer, merge_to_piano(score))


def _encode_merged(tokenizer, merged) -> np.ndarray:
    if merged.note_num() == 0:
        return np.zeros(0, dtype=np.uint16)
    encoded = tokenizer.encode(merged)
    if isinstance(encoded, list):
        # One sequence per track; miditok drops the track if preprocessing removed every note.
        if not encoded:
            return np.zeros(0, dtype=np.uint16)
        encoded = encoded[0]
    return np.asarray(encoded.ids, dtype=np.uint16)


_worker_tokenizer = None


def _init_worker(params: dict[str, Any]) -> None:
    global _worker_tokenizer
    from model.vocab import build_tokenizer

    _worker_tokenizer = build_tokenizer(params)


def _encode_checked(name: str, score, result: FileTokens) -> None:
    merged = merge_to_piano(score)
    if merged.note_num() == 0:
        reason = "only drum notes" if score.note_num() else "no notes"
        result.skipped.append((name, reason))
        return
    ids = _encode_merged(_worker_tokenizer, merged)
    if ids.size == 0:
        result.skipped.append((name, "no notes in the tokenizer's pitch range"))
        return
    result.pieces.append((name, ids))


def tokenize_file(path: Path, rel: str) -> FileTokens:
    """Read one .mid/.midi/.abc file and encode its piece(s); problems become skip reasons."""
    import symusic

    from train.corpus import read_abc_tune, split_abc_tunes

    result = FileTokens(rel)
    try:
        if path.stat().st_size == 0:
            result.skipped.append((rel, "empty file"))
            return result
        if path.suffix.lower() == ".abc":
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            tunes = split_abc_tunes(text)
            if not tunes:
                result.skipped.append((rel, "no ABC tune (no X: header)"))
            for index, (_label, tune, _title) in enumerate(tunes, start=1):
                name = f"{rel}{ABC_TUNE_SEPARATOR}{index}"
                try:
                    score = read_abc_tune(tune)
                except RuntimeError as err:
                    result.skipped.append((name, f"unreadable ABC: {err}"))
                    continue
                _encode_checked(name, score, result)
            return result
        try:
            score = symusic.Score(str(path))
        except RuntimeError as err:
            result.skipped.append((rel, f"unreadable MIDI: {_clean_reason(err)}"))
            return result
        _encode_checked(rel, score, result)
    except Exception as err:  # noqa: BLE001 - one bad file must not stop the run
        result.skipped.append((rel, f"{type(err).__name__}: {_clean_reason(err)}"))
    return result


def _clean_reason(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for noise in ("MiniMidi: ", ": iostream error"):
        text = text.replace(noise, "")
    return text[:300]


# ---------------------------------------------------------------------------------------------
# Cache


def _cache_key(source: SourceFile, enc_hash: str) -> str:
    blob = f"{source.rel}\0{source.size}\0{source.mtime_ns}\0{enc_hash}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _write_cache(path: Path, result: FileTokens) -> None:
    ids = [ids for _, ids in result.pieces]
    tmp = path.with_name(path.stem + ".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(
            fh,
            rel=np.array(result.rel),
            ids=np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16),
            lengths=np.array([len(i) for i in ids], dtype=np.int64),
            names=np.array([n for n, _ in result.pieces], dtype=str),
            skipped_names=np.array([n for n, _ in result.skipped], dtype=str),
            skipped_reasons=np.array([r for _, r in result.skipped], dtype=str),
        )
    os.replace(tmp, path)


def _read_cache(path: Path, rel: str) -> FileTokens | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["rel"]) != rel:
                return None
            ids = data["ids"].astype(np.uint16, copy=False)
            bounds = np.concatenate([[0], np.cumsum(data["lengths"])])
            names = [str(n) for n in data["names"]]
            pieces = [(n, ids[bounds[i] : bounds[i + 1]]) for i, n in enumerate(names)]
            skipped = [
                (str(n), str(r)) for n, r in zip(data["skipped_names"], data["skipped_reasons"], strict=True)
            ]
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is simply redone
    return FileTokens(rel, pieces, skipped)


# ---------------------------------------------------------------------------------------------
# Splits, bars and shards


def is_excluded(rel: str, exclude: Sequence[str]) -> bool:
    """True when `rel` matches one of the `exclude` patterns.

    A pattern is a folder relative to the input folder ("noncommercial", "a/b") that takes
    everything under it, or a glob over the whole relative path ("*/drafts/*.mid").
    """
    for pattern in exclude:
        folder = pattern.strip("/")
        if rel.startswith(folder + "/") or fnmatch.fnmatchcase(rel, pattern):
            return True
    return False


def find_sources(midi_dir: Path, exclude: Sequence[str] = ()) -> list[SourceFile]:
    """Every .mid/.midi/.abc file under `midi_dir` (recursive, hidden folders skipped), sorted.

    Files matching a pattern of `exclude` (see `is_excluded`) are left out.
    """
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(midi_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() not in INPUT_SUFFIXES or name.endswith(".tmp.mid"):
                continue
            rel = path.relative_to(midi_dir).as_posix()
            if is_excluded(rel, exclude):
                continue
            st = path.stat()
            found.append(SourceFile(rel, path, st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda s: s.rel)


def split_of(rel: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a file, from a hash of its relative path: stable as files come and go."""
    digest = hashlib.sha256(rel.encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def token_id_sets(tokenizer) -> tuple[int, np.ndarray, np.ndarray]:
    """(Bar id, Tempo ids, TimeSig ids) of a REMI vocabulary."""
    vocab = tokenizer.vocab
    bar = vocab["Bar_None"]
    tempos = np.array(sorted(v for k, v in vocab.items() if k.startswith("Tempo_")), dtype=np.int64)
    meters = np.array(sorted(v for k, v in vocab.items() if k.startswith("TimeSig_")), dtype=np.int64)
    return bar, tempos, meters


def bar_index(
    tokens: np.ndarray, offsets: np.ndarray, bar_id: int, tempo_ids: np.ndarray, timesig_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bar positions and the tempo/meter in force at each bar.

    tokens: uint16 [N]; offsets: int64 [P+1] piece boundaries.
    Returns bars: int64 [B] (index of every Bar token) and context: int32 [B, 2], the ids of
    the last Tempo and the last TimeSig token before that Bar token in the same piece (-1 if
    none). A window that starts at a bar can put these in front to re-state tempo and meter.
    """
    bars = np.flatnonzero(tokens == bar_id).astype(np.int64)
    context = np.full((len(bars), 2), -1, dtype=np.int32)
    if len(bars) == 0:
        return bars, context
    piece_start = offsets[np.searchsorted(offsets, bars, side="right") - 1]
    for column, ids in enumerate((tempo_ids, timesig_ids)):
        positions = np.flatnonzero(np.isin(tokens, ids))
        if len(positions) == 0:
            continue
        last = np.searchsorted(positions, bars, side="left") - 1
        found = last >= 0
        candidate = positions[np.where(found, last, 0)]
        valid = found & (candidate >= piece_start)
        context[valid, column] = tokens[candidate[valid]]
    return bars, context


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_split(
    out_dir: Path, split: str, pieces: Sequence[tuple[str, np.ndarray]], tokenizer
) -> SplitSummary:
    """Write the four shard files and the names of one split; pieces in the given order."""
    lengths = np.array([len(ids) for _, ids in pieces], dtype=np.int64)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = (
        np.concatenate([ids for _, ids in pieces]).astype(np.uint16, copy=False)
        if pieces
        else np.zeros(0, dtype=np.uint16)
    )
    bars, context = bar_index(tokens, offsets, *token_id_sets(tokenizer))
    _save_npy(out_dir / f"{split}.tokens.npy", tokens)
    _save_npy(out_dir / f"{split}.pieces.npy", offsets)
    _save_npy(out_dir / f"{split}.bars.npy", bars)
    _save_npy(out_dir / f"{split}.bar_context.npy", context)
    _write_json(out_dir / f"{split}.names.json", [name for name, _ in pieces])
    return SplitSummary(pieces=len(pieces), tokens=int(len(tokens)), bars=int(len(bars)))


# ---------------------------------------------------------------------------------------------
# The whole run


def prepare(
    midi_dir: Path | str,
    out_dir: Path | str,
    tokenizer_params: dict[str, Any] | None = None,
    jobs: int | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    progress: bool = True,
    exclude: Sequence[str] = (),
    assign_split: Callable[[str], str] | None = None,
) -> PrepareSummary:
    """Tokenize every file under `midi_dir` into shards under `out_dir`; returns the summary.

    `assign_split(rel)` names the split of a file (its relative path) instead of the hash rule of
    `split_of` with the two fractions (`rwkv-music tune` holds out chosen pieces this way).

    Files unchanged since the last run (same relative path, size, mtime and tokenizer) are
    read from OUT_DIR/cache instead of being tokenized again; the shards are always rebuilt.
    """
    from model.vocab import DEFAULT_TOKENIZER_PARAMS, vocab_hash

    started = time.perf_counter()
    midi_dir, out_dir = Path(midi_dir), Path(out_dir)
    if not midi_dir.is_dir():
        raise PrepareError(f"{midi_dir} is not a folder")
    for name, value in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise PrepareError(f"--{name}-fraction must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise PrepareError("--val-fraction + --test-fraction must leave something to train on")
    params = json.loads(json.dumps(tokenizer_params or DEFAULT_TOKENIZER_PARAMS))
    tokenizer = build_checked_tokenizer(params)
    v_hash = vocab_hash(tokenizer)
    enc_hash = encoding_hash(params, v_hash)

    sources = find_sources(midi_dir, exclude)
    if not sources:
        left_out = f" outside {', '.join(exclude)}" if exclude else ""
        raise PrepareError(f"no .mid, .midi or .abc files under {midi_dir}{left_out}")
    cache_dir = out_dir / CACHE_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, FileTokens] = {}
    keys = {s.rel: _cache_key(s, enc_hash) for s in sources}
    todo: list[SourceFile] = []
    for source in sources:
        cached = _read_cache(cache_dir / f"{keys[source.rel]}.npz", source.rel)
        if cached is None:
            todo.append(source)
        else:
            results[source.rel] = cached
    reused = len(results)
    log.info("prepare: %d files, %d unchanged, %d to tokenize", len(sources), reused, len(todo))

    for result in _tokenize_all(todo, params, jobs, progress):
        _write_cache(cache_dir / f"{keys[result.rel]}.npz", result)
        results[result.rel] = result
    _prune_cache(cache_dir, set(keys.values()))

    by_split: dict[str, list[tuple[str, np.ndarray]]] = {split: [] for split in SPLITS}
    skipped: list[dict[str, str]] = []
    folders: dict[str, dict[str, int]] = {}
    for source in sources:
        result = results[source.rel]
        split = (assign_split(source.rel) if assign_split is not None
                 else split_of(source.rel, val_fraction, test_fraction))
        by_split[split].extend(result.pieces)
        skipped.extend({"path": name, "reason": reason} for name, reason in result.skipped)
        folder = folders.setdefault(source.rel.split("/", 1)[0] if "/" in source.rel else ".", {})
        folder["pieces"] = folder.get("pieces", 0) + len(result.pieces)
        folder["tokens"] = folder.get("tokens", 0) + sum(len(ids) for _, ids in result.pieces)

    splits = {split: write_split(out_dir, split, by_split[split], tokenizer) for split in SPLITS}
    _write_json(
        out_dir / TOKENIZER_FILE,
        {"tokenizer": "REMI", "params": params, "vocab_hash": v_hash, "vocab_size": len(tokenizer)},
    )
    summary = PrepareSummary(
        files_found=len(sources),
        files_reused=reused,
        files_tokenized=len(todo),
        pieces=sum(s.pieces for s in splits.values()),
        tokens=sum(s.tokens for s in splits.values()),
        vocab_hash=v_hash,
        vocab_size=len(tokenizer),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        splits=splits,
        folders=folders,
        skipped=skipped,
        elapsed_s=round(time.perf_counter() - started, 2),
    )
    _write_json(out_dir / SUMMARY_FILE, asdict(summary))
    for split, s in splits.items():
        if s.pieces == 0:
            log.warning("prepare: the %s split is empty", split)
    return summary


def _tokenize_all(
    todo: list[SourceFile], params: dict[str, Any], jobs: int | None, progress: bool
) -> Iterable[FileTokens]:
    from tqdm import tqdm

    if not todo:
        return
    if jobs is None:  # a few files are tokenized sooner here than by starting worker processes
        jobs = 1 if len(todo) <= IN_PROCESS_FILES else (os.cpu_count() or 1)
    workers = max(1, min(jobs, len(todo)))
    bar = tqdm(total=len(todo), desc="prepare", unit="file", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            _init_worker(params)
            for source in todo:
                yield tokenize_file(source.path, source.rel)
                bar.update(1)
            return
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(params,)) as pool:
            futures = [pool.submit(tokenize_file, s.path, s.rel) for s in todo]
            for future in as_completed(futures):
                yield future.result()
                bar.update(1)
    finally:
        bar.close()


def _prune_cache(cache_dir: Path, keep: set[str]) -> None:
    """Drop entries of files that are gone or changed, so the cache does not grow forever."""
    for entry in cache_dir.glob("*.npz"):
        if entry.stem not in keep:
            with contextlib.suppress(OSError):
                entry.unlink()


# ---------------------------------------------------------------------------------------------
# Command line

_EPILOG = """examples:
  rwkv-music prepare data/midi data/prepared
  rwkv-music prepare data/midi data/prepared --jobs 2 --val-fraction 0.1 --test-fraction 0
  rwkv-music prepare data/midi data/prepared --tokenizer-config '{"num_velocities": 8}'
  rwkv-music prepare ../data/piano data/prepared-piano --exclude noncommercial --exclude performances

Files are found recursively (.mid, .midi, .abc; one piece per ABC tune). Each piece goes to a
split by a hash of its file's relative path, so the split is the same on every run. A second
run reuses the tokens of unchanged files from OUT_DIR/cache and rebuilds the shards.
Unreadable files are skipped and listed in OUT_DIR/prepare.json; the exit code stays 0.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize a folder of MIDI files into REMI token shards for training",
        description=(
            "Tokenize every MIDI/ABC file under MIDI_DIR with the REMI tokenizer (tracks merged "
            "into one piano stream) and write train/val/test token shards to OUT_DIR."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("midi_dir", metavar="MIDI_DIR", type=Path, help="folder of .mid/.midi/.abc files")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder for the shards")
    parser.add_argument(
        "--tokenizer-config",
        metavar="JSON",
        default=None,
        help="JSON file (or inline JSON object) overriding model.vocab's default tokenizer params",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, metavar="J",
        help=f"worker processes (default: cores; none for {IN_PROCESS_FILES} files or fewer)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="F", help="default 0.05")
    parser.add_argument("--test-fraction", type=float, default=0.05, metavar="F", help="default 0.05")
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out a folder under MIDI_DIR, or files matching a glob over the relative "
        "path (repeatable); the split of the other files does not change",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise PrepareError("--jobs must be >= 1")
    params = resolve_tokenizer_params(args.tokenizer_config)
    summary = prepare(
        args.midi_dir,
        args.out_dir,
        tokenizer_params=params,
        jobs=args.jobs,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        progress=not args.no_progress,
        exclude=args.exclude,
    )
    shown = 20
    for item in summary.skipped[:shown]:
        print(f"  skipped {item['path']}: {item['reason']}")
    if len(summary.skipped) > shown:
        print(f"  ... {len(summary.skipped) - shown} more in {args.out_dir / SUMMARY_FILE}")
    print(summary.line())
    return 0
