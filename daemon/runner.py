"""How a `Daemon` runs: as the `rwkv-music daemon` command (`serve`), or on a thread of its own
(`BackgroundDaemon`, for tests, benchmarks and embedding).

Apart from `daemon.app` (the music) because neither touches what the daemon does, only how
long it lives and on which thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from daemon.app import _SHUTDOWN_LIMIT_S, Daemon
from daemon.config import DaemonSettings
from daemon.controls import Command
from daemon.errors import DaemonError

log = logging.getLogger(__name__)


async def serve(settings: DaemonSettings, stop: asyncio.Event | None = None, *, handle_signals: bool = True) -> None:
    """Run the daemon until `stop` is set (or SIGINT/SIGTERM when `handle_signals`)."""
    import signal

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with Daemon(settings):
            await stop.wait()
            log.info("stopping: releasing every note, closing the ports")
    finally:
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


class BackgroundDaemon:
    """A Daemon on a thread of its own, with its own event loop (tests, benchmarks, embedding).

    Use::

        with BackgroundDaemon(settings) as bg:
            status = bg.call(bg.daemon.status)
            bg.execute(SetParam("length", 4))
    """

    def __init__(self, settings: DaemonSettings):
        self.settings = settings
        self.daemon: Daemon | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> Daemon:
        """Start and wait until the daemon is ready; re-raises what stopped it from starting."""
        self._thread = threading.Thread(target=self._main, name="rwkv-daemon", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise DaemonError(f"the daemon did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        assert self.daemon is not None
        return self.daemon

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with Daemon(self.settings) as daemon:
                    self.daemon = daemon
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as err:  # noqa: BLE001 - handed to the starting thread
                if self._ready.is_set():
                    log.exception("the daemon stopped with an error")
                self._error = err
            finally:
                self._ready.set()

        asyncio.run(body())

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run `fn(*args)` on the daemon's loop and return its result (thread-safe access)."""
        assert self._loop is not None
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - returned to the caller
                future.set_exception(err)

        self._loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def execute(self, command: Command, timeout: float = 30.0) -> dict[str, Any] | None:
        """`Daemon.execute` from another thread."""
        assert self._loop is not None and self.daemon is not None
        return asyncio.run_coroutine_threadsafe(self.daemon.execute(command), self._loop).result(timeout)

    def stop(self, timeout: float = 2 * _SHUTDOWN_LIMIT_S) -> None:
        """Stop the daemon (note-offs, ports closed) and wait for its thread to end.

        Raises DaemonError if it has not ended within `timeout`: its ports may still be closing,
        and a caller that went on (opening new ones) would race libjack. The daemon's own
        shutdown is bounded by `exit_watchdog`, so the default wait is long enough."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise DaemonError(f"the daemon did not stop within {timeout:g} s")

    def __enter__(self) -> BackgroundDaemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
