"""Reading the token shards that `rwkv-music prepare` writes (format: docs/data.md).

`TokenShards(prepared_dir, split)` memory-maps one split and checks it on open: every file is
there, the shapes agree, offsets and bar indices are in range, and the stored vocabulary hash is
the one the installed miditok builds from the stored parameters. A problem is a `ShardError`
naming the file, never a silent misread later in training.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from train.errors import ShardError

SPLITS: tuple[str, ...] = ("train", "val", "test")
TOKENIZER_FILE = "tokenizer.json"


def read_tokenizer_record(prepared_dir: Path | str) -> dict[str, Any]:
    """OUT_DIR/tokenizer.json: {"tokenizer", "params", "vocab_hash", "vocab_size"}."""
    path = Path(prepared_dir) / TOKENIZER_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ShardError(path, "missing; run `rwkv-music prepare` first") from err
    except (OSError, ValueError) as err:
        raise ShardError(path, f"unreadable ({err})") from err
    for key in ("params", "vocab_hash", "vocab_size"):
        if key not in record:
            raise ShardError(path, f"has no {key!r}")
    return record


class TokenShards:
    """One split of a prepared directory.

    tokens: uint16 memmap [N]; piece_offsets: int64 [P+1] (piece i is tokens[o[i]:o[i+1]]);
    bars: int64 [B] index in `tokens` of every Bar token; bar_context: int32 [B, 2], the ids of
    the Tempo and TimeSig tokens in force at each bar (-1 if none), see `train.prepare.bar_index`.
    """

    def __init__(
        self, prepared_dir: Path | str, split: str, expected_vocab_hash: str | None = None
    ) -> None:
        if split not in SPLITS:
            raise ShardError(prepared_dir, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.prepared_dir = Path(prepared_dir)
        self.split = split
        if not self.prepared_dir.is_dir():
            raise ShardError(self.prepared_dir, "no such prepared directory")
        record = read_tokenizer_record(self.prepared_dir)
        self.tokenizer_params: dict[str, Any] = record["params"]
        self.vocab_hash: str = record["vocab_hash"]
        self.vocab_size: int = int(record["vocab_size"])
        if expected_vocab_hash is not None and expected_vocab_hash != self.vocab_hash:
            raise ShardError(
                self.prepared_dir / TOKENIZER_FILE,
                f"vocabulary {self.vocab_hash} differs from the expected {expected_vocab_hash}",
            )
        self.tokens: np.ndarray = self._load("tokens", np.uint16, mmap=True)
        self.piece_offsets: np.ndarray = self._load("pieces", np.int64)
        self.bars: np.ndarray = self._load("bars", np.int64)
        self.bar_context: np.ndarray = self._load("bar_context", np.int32)
        self._validate()

    # -- loading and checks ---------------------------------------------------------------

    def _path(self, kind: str) -> Path:
        return self.prepared_dir / f"{self.split}.{kind}.npy"

    def _load(self, kind: str, dtype: type, mmap: bool = False) -> np.ndarray:
        path = self._path(kind)
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError as err:
            raise ShardError(path, "missing; run `rwkv-music prepare` again") from err
        except (OSError, ValueError) as err:
            raise ShardError(path, f"unreadable ({err})") from err
        if array.dtype != np.dtype(dtype):
            raise ShardError(path, f"dtype {array.dtype}, expected {np.dtype(dtype)}")
        return array

    def _validate(self) -> None:
        from model.vocab import build_tokenizer, vocab_hash

        tokens, offsets, bars, context = self.tokens, self.piece_offsets, self.bars, self.bar_context
        if tokens.ndim != 1:
            raise ShardError(self._path("tokens"), f"shape {tokens.shape}, expected 1-D")
        if offsets.ndim != 1 or len(offsets) < 1:
            raise ShardError(self._path("pieces"), f"shape {offsets.shape}, expected [n_pieces + 1]")
        if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
            raise ShardError(
                self._path("pieces"), f"offsets do not cover the {len(tokens)} tokens in order"
            )
        if bars.ndim != 1:
            raise ShardError(self._path("bars"), f"shape {bars.shape}, expected 1-D")
        if context.shape != (len(bars), 2):
            raise ShardError(
                self._path("bar_context"), f"shape {context.shape}, expected ({len(bars)}, 2)"
            )
        if len(bars) and (bars[0] < 0 or bars[-1] >= len(tokens) or np.any(np.diff(bars) <= 0)):
            raise ShardError(self._path("bars"), "bar indices are not increasing inside the tokens")
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise ShardError(self._path("tokens"), f"token id >= vocabulary size {self.vocab_size}")
        try:
            rebuilt = vocab_hash(build_tokenizer(self.tokenizer_params))
        except Exception as err:  # noqa: BLE001 - any miditok failure means "cannot rebuild"
            raise ShardError(self.prepared_dir / TOKENIZER_FILE, f"cannot rebuild tokenizer ({err})") from err
        if rebuilt != self.vocab_hash:
            raise ShardError(
                self.prepared_dir / TOKENIZER_FILE,
                f"vocabulary hash {self.vocab_hash} but this miditok builds {rebuilt}; "
                "run `rwkv-music prepare` again",
            )

    # -- access ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of pieces."""
        return len(self.piece_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def piece(self, i: int) -> np.ndarray:
        """Token ids of piece i: uint16 [n] (a view into the memmap)."""
        start, end = self._bounds(i)
        return self.tokens[start:end]

    def bar_slice(self, i: int) -> slice:
        """The slice of `bars` / `bar_context` that belongs to piece i."""
        start, end = self._bounds(i)
        lo, hi = np.searchsorted(self.bars, [start, end], side="left")
        return slice(int(lo), int(hi))

    def bars_of_piece(self, i: int) -> np.ndarray:
        """Offsets of piece i's Bar tokens relative to the piece start: int64 [n_bars_i]."""
        return self.bars[self.bar_slice(i)] - self._bounds(i)[0]

    def _bounds(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"piece {i} out of range for {n} pieces")
        i %= n
        return int(self.piece_offsets[i]), int(self.piece_offsets[i + 1])

    @cached_property
    def piece_names(self) -> list[str]:
        """Name of each piece (relative path; "#<tune>" appended for ABC tunes)."""
        path = self.prepared_dir / f"{self.split}.names.json"
        try:
            names = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ShardError(path, f"unreadable ({err})") from err
        if len(names) != len(self):
            raise ShardError(path, f"{len(names)} names for {len(self)} pieces")
        return names

    def tokenizer(self):
        """The miditok REMI tokenizer these shards were made with."""
        from model.vocab import build_tokenizer

        return build_tokenizer(self.tokenizer_params)

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.prepared_dir)!r}, {self.split!r}: {len(self)} pieces, "
            f"{self.n_tokens} tokens, {len(self.bars)} bars, vocab {self.vocab_size})"
        )
