"""The playing model and the one waiting for its bar line: hot reload and styles.

A checkpoint that should play next comes from one of three places: the watcher saw the playing
file change, an OSC or MQTT `reload` named a file, or a `style` named one of the tuned styles.
`ModelSwap.load` reads and checks it in a worker thread while the old model plays on
(`daemon.reload.load_compatible`). A compatible one waits until the bar it arrived in is over;
then `at_beat` has the engine swap it in, between two jobs of the engine thread. A refused one
is logged, counted and reported, and the old model keeps playing.

The daemon hands `start` what the swap needs once the engine runs: the engine, the clock, and
its engine thread (`daemon.engine_thread.EngineThread`: run a call there, bring a finished
call back to the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from daemon.clock import Clock
from daemon.engine_process import EngineProcess
from daemon.engine_thread import EngineThread
from daemon.reload import CheckpointWatcher, FileSignature, LoadedModel, ReloadError, load_compatible
from daemon.status import DaemonStats
from model.checkpoint import CheckpointMeta

log = logging.getLogger(__name__)

class ModelSwap:
    """Which checkpoint plays, which one waits for the next bar line, and the last refusal.

    `publish(event, **fields)` sends an event to the MQTT bridge; `status_changed()` says the
    status is worth sending again. Counters go to `stats` (reloads, reload_errors,
    last_swap_beat)."""

    def __init__(self, checkpoint: Path, stats: DaemonStats, *,
                 publish: Callable[..., None], status_changed: Callable[[], None]):
        self.checkpoint_path = checkpoint  # the file the playing model came from
        self.playing: CheckpointMeta | None = None  # as the event loop knows it (see _swapped)
        self.pending: tuple[LoadedModel, int] | None = None  # loaded, and the bar it arrived in
        self.last_error: str | None = None
        self.watcher: CheckpointWatcher | None = None
        self._stats = stats
        self._publish = publish
        self._status_changed = status_changed
        self._lock = asyncio.Lock()  # one load at a time
        self._engine: EngineProcess | None = None
        self._clock: Clock | None = None
        self._engine_thread: EngineThread | None = None

    @property
    def model_id(self) -> str:
        return self.playing.model_id if self.playing is not None else ""

    def start(self, engine: EngineProcess, clock: Clock, engine_thread: EngineThread,
              watch_interval_s: float, signature: FileSignature | None) -> CheckpointWatcher:
        """The engine plays `checkpoint_path` (read with `signature`): swaps may begin. Returns
        the watcher of that file (the daemon runs it when watching is on)."""
        self._engine, self._clock, self._engine_thread = engine, clock, engine_thread
        self.playing = engine.meta
        self.watcher = CheckpointWatcher(self.checkpoint_path, watch_interval_s, self.on_file_changed)
        self.watcher.mark_seen(self.checkpoint_path, signature)
        return self.watcher

    async def on_file_changed(self, path: Path) -> None:
        """The watcher saw `path` change: load it (a refusal is logged and reported)."""
        with contextlib.suppress(ReloadError):
            await self.load(path, origin="watch")

    async def load(self, path: Path, *, origin: str) -> None:
        """Load `path` in a worker thread; on success it is swapped in at the next bar line.
        `origin`: "request" (OSC, MQTT, a style) or "watch".

        Raises ReloadError (logged, counted; the running model stays)."""
        engine = self._engine
        assert engine is not None and self._clock is not None
        async with self._lock:
            try:
                loaded = await asyncio.to_thread(
                    load_compatible,
                    path,
                    vocab_hash=engine.meta.vocab_hash,
                    vocab_size=engine.vocab_size,
                    device="cpu",  # only checked here; the engine process loads it again to play
                )
            except ReloadError as err:
                self.refused(err, origin)
                raise
        if self.watcher is not None:
            self.watcher.mark_seen(path, loaded.signature)
        if loaded.meta.model_id == self.model_id and self.pending is None:
            log.info("%s holds the model already playing (%s); nothing to swap", path, self.model_id)
            self.checkpoint_path = path
            return
        self.pending = (loaded, self._clock.bar_index(self._clock.now_beat()))
        log.info("model %s (step %d) loaded from %s; swapping in at the next bar line",
                 loaded.meta.model_id, loaded.meta.step, path)

    def refused(self, err: ReloadError, origin: str) -> None:
        """Log and count a refused reload. A request's sender gets the error as its reply (OSC)
        or as an error event (MQTT bridge); a change the watcher saw gets an event here."""
        self._stats.reload_errors += 1
        self.last_error = str(err)
        log.error("%s (%s); model %s keeps playing", err, origin, self.model_id)
        if origin != "request":
            self._publish("error", reason=str(err), path=err.path, source=origin)
        self._status_changed()

    def at_beat(self, beat: float) -> None:
        """Time has reached `beat` (the ticker): once the bar a loaded model arrived in is over,
        the engine thread swaps it in."""
        if self.pending is None or self._clock is None:
            return
        loaded, bar = self.pending
        if self._clock.bar_index(beat) <= bar:
            return
        assert self._engine is not None and self._engine_thread is not None
        self.pending = None
        future = self._engine_thread.submit(self._engine.swap_checkpoint, "swap", loaded.path, loaded.meta.model_id)
        future.add_done_callback(self._engine_thread.on_loop(functools.partial(self._swapped, loaded, beat)))

    def _swapped(self, loaded: LoadedModel, beat: float, future: Future[Any]) -> None:
        try:
            future.result()
        except Exception as err:  # noqa: BLE001 - the old state is gone only if swap_model got far
            self._stats.reload_errors += 1
            self.last_error = f"swap failed: {err}"
            log.exception("swapping in %s failed", loaded.path)
            self._publish("error", reason=self.last_error, path=str(loaded.path))
            return
        # The engine thread swapped its own reference first; status shows the new id only now.
        self.playing = loaded.meta
        self._stats.reloads += 1
        self._stats.last_swap_beat = round(beat, 4)
        self.last_error = None
        self.checkpoint_path = loaded.path
        if self.watcher is not None:
            self.watcher.mark_seen(loaded.path, loaded.signature)
        log.info("model %s (step %d) from %s is playing now", loaded.meta.model_id, loaded.meta.step, loaded.path)
        self._publish("model_reloaded", model_id=loaded.meta.model_id, step=loaded.meta.step, path=str(loaded.path))
        self._status_changed()
