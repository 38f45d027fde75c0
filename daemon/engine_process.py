"""The engine in a process of its own, behind the same calls as `daemon.engine.Engine`.

Why a process: every Python thread of a process shares one interpreter lock. The model's step
is C and torch calls with Python in between (the grammar mask, sampling, decoding), so while it
runs, the output scheduler's thread waits for the lock each time it wakes up, up to the switch
interval, and notes leave late (docs/timing.md: p99 4.4 ms with the engine in a thread on a
2-core CPU, against a 2 ms target). In a child process the model holds its own lock; the
daemon's process keeps only the light work (MIDI input, encoder, OSC, scheduler).

The protocol is one duplex pipe, one request at a time, each answered in order:

    ("feed", ids) / ("reset", None)           -> ("ok", None)
    ("swap", (path, model_id))                -> ("ok", CheckpointMeta)
    ("generate", (bars, settings, seed, K))   -> ("event", variation, DecodedEvent)*, ("ok", Completion)
    ("close", None)                           -> the child exits
    any request that fails                    -> ("error", exception)

Generation is stopped through a second pipe, which the child looks at before each token, so a
takeover does not wait behind a queue. The child is a fresh interpreter (`python -m
daemon.engine_process`, no fork of a process that runs threads and torch, and unlike
multiprocessing's spawn it does not re-import the caller's main script) and lowers its own
priority (`niceness`), so on a busy CPU the operating system wakes the scheduler first.

If the child dies (killed, out of memory), the next call starts a new one, feeds it the
token history kept on this side, and raises `EngineProcessError` for the call that found it
dead: one answer is lost, the conversation is not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from daemon.engine import Completion, Engine
from daemon.errors import DaemonError
from model.checkpoint import CheckpointMeta
from model.remi_grammar import DecodedEvent
from model.sampling import SamplingSettings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # spawning imports torch and loads the checkpoint
CLOSE_TIMEOUT_S = 5.0
STOP_POLL_S = 0.002  # how often a waiting generate() looks at should_stop()


class EngineProcessError(DaemonError):
    """The engine process failed to start or died during a call."""


class RemoteEngineError(DaemonError):
    """A call raised in the engine process; `reason` is the child's exception, as text."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _serve(conn: Connection, stop: Connection, checkpoint: str, device: str, history_tokens: int, threads: int,
           niceness: int, weights: str = "fp32") -> None:
    """The child: build the engine, then answer requests until "close" or the pipe closes."""
    if niceness:
        try:
            os.nice(niceness)
        except OSError as err:  # not fatal: a platform without nice, or a limit
            log.warning("engine process keeps its priority: %s", err)
    import torch

    from model.checkpoint import load

    if threads:
        torch.set_num_threads(threads)
    try:
        model, meta = load(checkpoint, device=device)
        engine = Engine(model, meta, history_limit=history_tokens, step_weights=weights)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", (meta, str(engine.device))))
    with torch.no_grad():
        while True:
            try:
                kind, args = conn.recv()
            except (EOFError, OSError):  # the daemon is gone
                return
            if kind == "close":
                return
            try:
                result = _handle(engine, conn, stop, kind, args, device)
            except Exception as err:  # noqa: BLE001 - every failure is the caller's to handle
                conn.send(("error", f"{type(err).__name__}: {err}"))
            else:
                conn.send(("ok", result))


def _stop_requested(stop: Connection) -> bool:
    """True once the parent has written to the stop pipe (read and forget what is there)."""
    requested = False
    while stop.poll(0):
        stop.recv_bytes()
        requested = True
    return requested


def _handle(engine: Engine, conn: Connection, stop: Connection, kind: str, args: Any, device: str) -> Any:
    from model.checkpoint import load

    if kind == "feed":
        engine.feed(args)
    elif kind == "reset":
        engine.reset()
    elif kind == "swap":
        path, model_id = args
        model, meta = load(path, device=device)
        if meta.model_id != model_id:  # the file changed after the daemon checked it
            raise ValueError(f"{path} now holds model {meta.model_id}, not the checked {model_id}")
        engine.swap_model(model, meta)
        return meta
    elif kind == "generate":
        bars, settings, seed, variations = args
        _stop_requested(stop)  # a stop meant for an earlier generation
        stopped = False

        def should_stop() -> bool:
            nonlocal stopped
            stopped = stopped or _stop_requested(stop)
            return stopped

        return engine.generate(
            bars, settings, seed=seed, variations=variations,
            on_event=lambda i, event: conn.send(("event", i, event)),
            should_stop=should_stop,
        )
    else:
        raise ValueError(f"unknown request {kind!r}")
    return None


class EngineProcess:
    """`Engine`'s calls, run in a child process. Call it from one thread at a time (the
    daemon's engine thread); each call blocks that thread, not the event loop.

    Use as a context manager, or call `close()`."""

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu", history_tokens: int = 4096,
                 threads: int = 1, niceness: int = 5, weights: str = "fp32"):
        self.checkpoint = str(checkpoint)
        self._device, self._threads, self._niceness = device, threads, niceness
        self._weights = weights  # the CPU step's storage of the large matrices
        self._history_tokens = history_tokens
        # The conversation so far, to re-prime a replacement child (the child keeps its own).
        self.history: deque[int] = deque(maxlen=history_tokens)
        self._lock = threading.Lock()  # one request/answer exchange at a time
        self._conn: Connection | None = None
        self._stop: Connection | None = None
        self._process: subprocess.Popen | None = None
        self.restarts = 0
        self._start()

    # ----------------------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        requests, child_requests = socket.socketpair()
        stop, child_stop = socket.socketpair()
        settings = {"checkpoint": self.checkpoint, "device": self._device, "history_tokens": self._history_tokens,
                    "threads": self._threads, "niceness": self._niceness, "weights": self._weights,
                    "log_level": logging.getLogger().getEffectiveLevel()}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "daemon.engine_process", str(child_requests.fileno()),
                 str(child_stop.fileno()), json.dumps(settings)],
                pass_fds=(child_requests.fileno(), child_stop.fileno()),
            )
        finally:
            child_requests.close()  # only the child holds these ends: its death shows here as EOF
            child_stop.close()
        conn, stop_conn = Connection(requests.detach()), Connection(stop.detach())
        if not conn.poll(START_TIMEOUT_S):
            process.kill()
            raise EngineProcessError(f"the engine process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = conn.recv()
        except EOFError as err:
            raise EngineProcessError(f"the engine process exited while starting (code {process.wait()})") from err
        if kind != "ready":
            process.wait(CLOSE_TIMEOUT_S)
            raise EngineProcessError(f"the engine process could not load {self.checkpoint}: {payload}")
        self.meta, self.device = payload
        self.tokenizer = self.meta.tokenizer()
        self._conn, self._stop, self._process = conn, stop_conn, process
        log.debug("engine process %d ready (%s)", process.pid, self.device)

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not."""
        conn, stop, process = self._conn, self._stop, self._process
        self._conn = self._stop = self._process = None
        if conn is not None:
            with contextlib.suppress(OSError):  # the child is gone already
                conn.send(("close", None))
            conn.close()
        if stop is not None:
            stop.close()
        if process is not None:
            try:
                process.wait(CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(CLOSE_TIMEOUT_S)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    @property
    def vocab_size(self) -> int:
        return self.meta.model_config.vocab_size

    # ----------------------------------------------------------------------------- calls

    def feed(self, ids: list[int]) -> None:
        """Advance the child's state through final tokens."""
        if not ids:
            return
        try:
            self._call("feed", list(ids))
        finally:  # also when the child died during the call: its replacement gets them
            self.history.extend(ids)

    def reset(self) -> None:
        """Forget the conversation (the child starts again from BOS)."""
        self.history.clear()
        self._call("reset", None)

    def swap_checkpoint(self, path: str | Path, model_id: str) -> CheckpointMeta:
        """Load `path` in the child and re-prime it from the history. The file must still hold
        `model_id` (the model the daemon validated); otherwise the old model stays."""
        meta = self._call("swap", (str(path), model_id))
        self.meta, self.checkpoint = meta, str(path)
        return meta

    def generate(self, bars: int, settings: SamplingSettings, *, seed: int = -1, variations: int = 1,
                 on_event: Callable[[int, DecodedEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Completion:
        """As `Engine.generate`: events reach `on_event` (in this thread) as the child draws them."""
        return self._call("generate", (bars, settings, seed, variations), on_event=on_event, should_stop=should_stop)

    def _call(self, kind: str, args: Any, *, on_event: Callable[[int, DecodedEvent], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> Any:
        with self._lock:
            if self._conn is None or self._process is None or self._process.poll() is not None:
                self._replace_dead_child()
            conn = self._conn
            assert conn is not None
            try:
                conn.send((kind, args))
                while True:
                    # Waiting in poll() releases the interpreter lock: the scheduler runs. The
                    # stop condition is checked between polls and after every message alike
                    # (a child that streams events fast never leaves poll() waiting).
                    while should_stop is not None:
                        if should_stop():
                            assert self._stop is not None
                            self._stop.send_bytes(b"stop")
                            should_stop = None  # asked once; now wait for the child to finish
                        elif conn.poll(STOP_POLL_S):
                            break
                    message = conn.recv()
                    if message[0] == "event":
                        if on_event is not None:
                            on_event(message[1], message[2])
                        continue
                    if message[0] == "error":
                        raise RemoteEngineError(message[1])
                    return message[1]
            except (EOFError, OSError) as err:
                code = None
                if self._process is not None:  # make sure it is gone, so the next call replaces it
                    self._process.kill()
                    code = self._process.wait(CLOSE_TIMEOUT_S)
                raise EngineProcessError(f"the engine process died during {kind} (exit code {code})") from err

    def _replace_dead_child(self) -> None:
        code = self._process.poll() if self._process is not None else None
        for conn in (self._conn, self._stop):
            if conn is not None:
                conn.close()
        self._conn = self._stop = self._process = None
        self.restarts += 1
        log.error("the engine process is gone (exit code %s): starting a new one from %s", code, self.checkpoint)
        t0 = time.perf_counter()
        self._start()
        history = list(self.history)
        if history:
            self._call_unlocked_feed(history)
        log.info("engine process restarted and re-primed with %d tokens in %.2f s", len(history),
                 time.perf_counter() - t0)

    def _call_unlocked_feed(self, ids: list[int]) -> None:
        conn = self._conn
        assert conn is not None
        # The new child has fed itself BOS already, like a reset; the history holds what came after.
        conn.send(("feed", ids))
        kind, payload = conn.recv()
        if kind == "error":
            raise RemoteEngineError(payload)


def main(argv: list[str]) -> None:
    """`python -m daemon.engine_process REQUEST_FD STOP_FD SETTINGS_JSON` (started by EngineProcess)."""
    # Ctrl-C in a terminal reaches the whole process group; the daemon stops this process over
    # the pipe when it is done with it (a KeyboardInterrupt here would only print a traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = json.loads(argv[2])
    logging.basicConfig(level=settings.pop("log_level"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _serve(Connection(int(argv[0])), Connection(int(argv[1])), **settings)


if __name__ == "__main__":
    main(sys.argv[1:])
