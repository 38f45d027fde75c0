"""Hot reload: notice a new checkpoint, load and check it off the event loop, refuse a bad one.

Three ways in, one path through: the watcher sees the checkpoint file change (the trainer
replaces it atomically), `/rwkv/reload [path]` asks for it, or the trainer announces a new
checkpoint over MQTT. `load_compatible` then loads the file (in a worker thread; it blocks)
and refuses it with `ReloadError` when it is unreadable, corrupt, or made for another
vocabulary: the running model keeps playing. The daemon swaps an accepted model in at the
next bar line (`EngineProcess.swap_checkpoint` re-primes it from the conversation's tokens).

The file is read once, with plain reads, into a private copy that is then loaded: loading maps
the file into memory, and a checkpoint truncated or rewritten in place while mapped (`cp` onto
the watched path, a second trainer) killed the process with SIGBUS. A copy that changed while it
was read fails its weights hash and is refused like any corrupt file.

Paths that come from outside (OSC, MQTT) are confined to the configured checkpoint's folder
and the extra `reload_dirs` (`resolve_reload_path`), so a controller on the network cannot
make the daemon open arbitrary files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon.errors import DaemonError
from model.checkpoint import CheckpointMeta, load, read_meta
from model.errors import CheckpointError
from model.rwkv7 import RWKV7

log = logging.getLogger(__name__)


class ReloadError(DaemonError):
    """A checkpoint was refused; the running model stays. `path` and `reason` say why."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"reload of {path} refused: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class FileSignature:
    """What the watcher compares: a replaced or rewritten file changes at least one of these."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: str | Path) -> FileSignature | None:
        """The file's signature, None when it does not exist (or cannot be read)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint loaded and checked, ready to be swapped in."""

    model: RWKV7
    meta: CheckpointMeta
    path: Path
    signature: FileSignature | None


def resolve_reload_path(requested: str | Path, checkpoint: str | Path, extra_dirs: Iterable[str | Path] = ()) -> Path:
    """The file a reload request names, as an absolute path inside the allowed folders.

    A relative path is taken relative to the checkpoint's folder when such a file exists there,
    else relative to the working directory. Allowed: the checkpoint's folder, the folders in
    `extra_dirs`, and everything below them (after resolving symbolic links). Raises ReloadError.
    """
    base = Path(checkpoint).expanduser().resolve().parent
    path = Path(requested).expanduser()
    if not path.is_absolute():
        beside = base / path
        path = beside if beside.exists() else Path.cwd() / path
    path = path.resolve()
    roots = [base, *(Path(d).expanduser().resolve() for d in extra_dirs)]
    if not any(path.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise ReloadError(requested, f"outside the folders reloads may read ({shown}; see daemon.reload_dirs)")
    return path


def load_compatible(
    path: str | Path, *, vocab_hash: str, vocab_size: int, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Load a checkpoint and check it can replace the running model (blocking: call it in a
    worker thread). Same vocabulary hash and size, tokenizer rebuildable. Raises ReloadError."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="rwkv-music-reload-") as private:
        copy = Path(private) / "checkpoint.safetensors"
        signature = _copy_file(path, copy)
        try:
            header = read_meta(copy)
            if header.vocab_hash != vocab_hash:
                raise ReloadError(
                    path, f"its tokenizer differs (vocabulary {header.vocab_hash}, the running model's {vocab_hash})"
                )
            model, meta = load(copy, device=device)
            tokenizer = meta.tokenizer()
        except CheckpointError as err:
            raise ReloadError(path, err.reason.replace(str(copy), str(path))) from err
    if model.cfg.vocab_size != vocab_size or len(tokenizer) != vocab_size:
        raise ReloadError(path, f"vocabulary of {model.cfg.vocab_size} tokens, the running model has {vocab_size}")
    return LoadedModel(model, meta, path, signature)


def _copy_file(source: Path, target: Path) -> FileSignature | None:
    """Copy `source` to `target` with plain reads (never mapped); the source's signature as
    it was when opened. Raises ReloadError when it cannot be read."""
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            st = os.fstat(src.fileno())
            shutil.copyfileobj(src, dst, 1 << 20)
    except FileNotFoundError as err:
        raise ReloadError(source, "no such file") from err
    except OSError as err:
        raise ReloadError(source, f"cannot read it into a private copy ({err})") from err
    return FileSignature(st.st_mtime_ns, st.st_size, st.st_ino)


class CheckpointWatcher:
    """Polls one file's signature every `interval` seconds; `on_change(path)` runs (awaited)
    once a changed signature has held still for one more poll (a writer that does not rename
    atomically is not read half-way). A signature is handled once, accepted or refused.

    `path` may be changed while it runs (the daemon watches the checkpoint it plays).
    """

    def __init__(self, path: str | Path, interval: float, on_change: Callable[[Path], Awaitable[None]]):
        self.path = Path(path)
        self.interval = interval
        self._on_change = on_change
        self._seen: tuple[Path, FileSignature | None] = (self.path, FileSignature.of(self.path))

    def mark_seen(self, path: str | Path, signature: FileSignature | None) -> None:
        """Treat this version of the file as handled (e.g. the one just loaded)."""
        self.path = Path(path)
        self._seen = (self.path, signature)

    async def run(self) -> None:
        """The polling loop (a task of its own); never raises but CancelledError."""
        candidate: FileSignature | None = None
        while True:
            await asyncio.sleep(self.interval)
            try:
                path = self.path
                signature = FileSignature.of(path)
                if (path, signature) == self._seen or signature is None:
                    candidate = None
                    continue
                if signature != candidate:
                    candidate = signature  # changed: wait one poll for it to hold still
                    continue
                self._seen = (path, signature)
                candidate = None
                log.info("checkpoint %s changed", path)
                await self._on_change(path)
            except asyncio.CancelledError:
                raise
            except Exception:  # a reload problem must never stop the watching
                log.exception("checkpoint watcher failed on %s", self.path)
