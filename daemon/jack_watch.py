"""Notice a JACK server that goes away, and tell when a change of its graph has settled,
from a small child process of its own.

`JackServerWatch` starts this file as a script. The child opens a port-less JACK client with
the system's libjack (through ctypes), asks for libjack's shutdown and graph-order callbacks,
activates the client, prints one line ("watching" with the server's period) and then waits
for its standard input to close. When the server goes away the callback ends the child with
`EXIT_SERVER_GONE`; when the daemon closes the watch (or dies) the child's stdin reaches end of
file and it exits; the server drops its client.

Settling (`graph_mark` / `settle`): after every change of the graph (a client activated or
closed, a port registered or unregistered, a connection made) the server sends each client a
latency notification, one client after the other, waiting for each answer, and then a
graph-order notification. libjack (jack2 up to at least 1.9.22, also the copy inside
python-rtmidi's wheel) walks the client's list of ports for the latency notification on its
own thread, without a lock; a port registered or unregistered by that client meanwhile crashes
the process (jack2 issue 216; here in MidiInJack::closePort while the same client handled a
latency notification, 1 run in 8 of 60 open/close cycles with both cores loaded). The child
writes one byte to its stdout for every graph-order notification, so the daemon can wait,
before it registers or unregisters a port, until the notifications about its own previous
change have all been answered. A server that sends none gets a fixed wait per change instead
(`FALLBACK_SETTLE_S`).

Why a process and not a client in the daemon: python-rtmidi's wheel carries a libjack of its
own, so a watch client in the daemon's process put a second libjack beside it. Closing that
never-activated client deadlocked now and then inside the system libjack (the closing thread
waiting on one of libjack's mutexes while a libjack thread waited on a condition variable,
no Python code on either stack; it happened in a process with one libjack too), and a thread
blocked in C cannot be interrupted: the daemon (and the test suite) hung on the way out. The
child never calls jack_client_close; it exits, and a child that does not exit when asked is
killed: closing the watch takes bounded time, whatever libjack does.

Run as a script: python -I -S daemon/jack_watch.py CLIENT_NAME (stdlib only, so it starts fast).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

# The child's exit codes.
EXIT_STOPPED = 0  # its stdin closed: asked to stop
EXIT_SERVER_GONE = 3  # libjack's shutdown callback: the server went away or dropped the client
EXIT_NO_SERVER = 4  # no server to watch
EXIT_NO_LIBJACK = 5  # libjack cannot be loaded

# The child's first line: b"watching <period frames> <sample rate> <1 if it saw a round, else 0>\n".
_READY_WORD = b"watching"
_ROUND_MARK = b"g"  # one byte on the child's stdout per graph-order notification
_NO_START_SERVER = 0x01  # JackNoStartServer: never start a server as a side effect
_START_TIMEOUT_S = 10.0  # for the child to open its client (a loaded machine is slow)
_STOP_TIMEOUT_S = 2.0  # for the child to exit when asked, before it is killed
# How long `settle` waits for the notifications about a change. The server sends them at the
# start of its next cycle; a loaded machine delays them by milliseconds, rarely by more.
SETTLE_TIMEOUT_S = 1.0
# A server that sends no graph-order notification (none came at the watch's own arrival, or
# none after two changes in a row) is not waited for: each change then waits this long.
FALLBACK_SETTLE_S = 0.02
_MISSES_BEFORE_FALLBACK = 2
_ACTIVATION_ROUND_TIMEOUT_S = 2.0
# Two changes made back to back may straddle a cycle and come as two rounds of notifications:
# after the first round, wait until none has come for this many periods (and at least
# _MIN_QUIET_S, at most _MAX_QUIET_S), so that the second is not missed.
_QUIET_PERIODS = 3
_MIN_QUIET_S = 0.004
_MAX_QUIET_S = 0.1


class JackServerWatch:
    """A child process watching the JACK server named by JACK_DEFAULT_SERVER (or the default).

    `open()` starts it and returns once it watches (False: no server, or no libjack); `gone`
    becomes true when the server went away; `close()` ends the child within a bounded time.
    `graph_mark()` before a change of the graph and `settle(mark)` after it wait until the
    server has told every client about the change (see the module docstring).
    """

    def __init__(self, name: str):
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._broken_reported = False
        self._rounds = 0  # graph-order notifications the child reported
        self._last_round = 0.0  # time.monotonic() when the last one was read
        self._quiet_s = _MIN_QUIET_S
        self._reports_rounds = True
        self._server_sends_rounds = True  # as the child saw at its arrival
        self._misses_in_a_row = 0
        self.settle_timeouts = 0  # `settle` calls that saw no notification in time

    def __enter__(self) -> JackServerWatch:
        """`open()` (whether or not a server is there: `settle` then returns at once)."""
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def gone(self) -> bool:
        """True once the watched server went away (until the next `open`)."""
        process = self._process
        if process is None:
            return False
        code = process.poll()
        if code is None:
            return False
        if code in (EXIT_SERVER_GONE, EXIT_NO_SERVER):
            return True
        if not self._broken_reported:  # the child died for another reason: stop watching
            self._broken_reported = True
            log.warning("MIDI: the JACK watch ended (exit code %s); a server that goes away will "
                        "not be noticed", code)
        return False

    def open(self) -> bool:
        """Start watching; True when the child holds a client on a running server."""
        self.close()
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), self.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # libjack's chatter while no server runs
            start_new_session=True,  # a Ctrl-C in the terminal is the daemon's to handle, not the child's
        )
        self._process, self._broken_reported = process, False
        assert process.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([process.stdout], [], [], remaining)[0]:
                log.warning("MIDI: the JACK watch did not start within %.0f s", _START_TIMEOUT_S)
                self.close()
                return False
            chunk = os.read(process.stdout.fileno(), 64)
            if not chunk:  # it exited: no server, or no libjack
                code = process.wait()
                if code == EXIT_NO_LIBJACK:
                    log.warning("MIDI: libjack not found; a JACK server that goes away will not be noticed")
                self._process = None
                return False
            line += chunk
        first, _, rest = line.partition(b"\n")
        words = first.split()
        if len(words) != 4 or words[0] != _READY_WORD:
            log.warning("MIDI: the JACK watch said %r; a server that goes away will not be noticed", first)
            self.close()
            return False
        period_s = int(words[1]) / max(int(words[2]), 1)
        self._quiet_s = min(max(_MIN_QUIET_S, _QUIET_PERIODS * period_s), _MAX_QUIET_S)
        self._rounds, self._last_round = rest.count(_ROUND_MARK), time.monotonic()
        self._server_sends_rounds = words[3] == b"1"
        self._reports_rounds, self._misses_in_a_row = self._server_sends_rounds, 0
        if not self._reports_rounds:
            log.info("MIDI: the JACK server sends no graph-order notifications; each change of "
                     "the graph waits %.0f ms instead", FALLBACK_SETTLE_S * 1e3)
        return True

    @contextlib.contextmanager
    def change(self) -> Iterator[None]:
        """Around one change of the graph: on the way out, `settle` after it."""
        mark = self.graph_mark()
        try:
            yield
        finally:
            self.settle(mark)

    def resume_settling(self) -> None:
        """Wait for rounds of notifications again after changes that missed them for a reason
        other than the server (a graph stuck on a client of ours: daemon.midi_ports), when the
        server sent one at the child's arrival."""
        self._reports_rounds, self._misses_in_a_row = self._server_sends_rounds, 0

    def graph_mark(self) -> int:
        """The number of rounds of graph notifications seen so far: take it before a change.

        Reads all the marks waiting in the pipe (up to 64 KB after a long time of others'
        changes), so that none of them passes for a round after the change."""
        self._read_rounds(0.0)
        return self._rounds

    def settle(self, mark: int, timeout_s: float = SETTLE_TIMEOUT_S) -> bool:
        """Wait until a round of notifications came after `mark` and no other followed for a few
        periods; False (and counted in `settle_timeouts`) when none came within `timeout_s`.

        Returns at once when the watch is not running, and after FALLBACK_SETTLE_S when the
        server does not send the notifications."""
        if self._process is None:
            return False
        if not self._reports_rounds:
            time.sleep(FALLBACK_SETTLE_S)
            return False
        deadline = time.monotonic() + timeout_s
        while self._rounds <= mark:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read_rounds(remaining):
                if self._rounds <= mark:
                    self.settle_timeouts += 1
                    self._misses_in_a_row += 1
                    if self._misses_in_a_row >= _MISSES_BEFORE_FALLBACK and not self.gone:
                        self._reports_rounds = False
                        log.warning("MIDI: no JACK graph-order notification after %d changes in a "
                                    "row; each change now waits %.0f ms instead",
                                    self._misses_in_a_row, FALLBACK_SETTLE_S * 1e3)
                    return False
        self._misses_in_a_row = 0
        while True:
            quiet_until = self._last_round + self._quiet_s
            remaining = min(quiet_until, deadline) - time.monotonic()
            if remaining <= 0 or not self._read_rounds(remaining):
                return True

    def _read_rounds(self, timeout_s: float) -> bool:
        """Read every round mark waiting in the pipe, waiting up to `timeout_s` for the first;
        True when at least one was read."""
        process = self._process
        if process is None or process.stdout is None:
            return False
        fd = process.stdout.fileno()
        read = 0
        wait_s = max(timeout_s, 0.0)
        while select.select([fd], [], [], wait_s)[0]:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:  # the child exited: nothing more will come
                break
            read += data.count(_ROUND_MARK)
            wait_s = 0.0  # the rest: only what is there already
        if not read:
            return False
        self._rounds += read
        self._last_round = time.monotonic()
        return True

    def close(self) -> None:
        """Stop the child: end of its stdin, then SIGKILL if it has not exited within a bound."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("MIDI: the JACK watch did not stop within %.0f s; killed it", _STOP_TIMEOUT_S)
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _watch(name: str) -> int:
    """The child: watch until stdin closes (EXIT_STOPPED) or the server goes (EXIT_SERVER_GONE)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    path = ctypes.util.find_library("jack")
    if path is None:
        return EXIT_NO_LIBJACK
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return EXIT_NO_LIBJACK
    lib.jack_client_open.restype = ctypes.c_void_p
    lib.jack_client_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    shutdown_callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    lib.jack_on_shutdown.argtypes = [ctypes.c_void_p, shutdown_callback, ctypes.c_void_p]
    graph_order_callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    lib.jack_set_graph_order_callback.argtypes = [ctypes.c_void_p, graph_order_callback, ctypes.c_void_p]
    lib.jack_activate.argtypes = [ctypes.c_void_p]
    lib.jack_get_buffer_size.argtypes = [ctypes.c_void_p]
    lib.jack_get_buffer_size.restype = ctypes.c_uint32
    lib.jack_get_sample_rate.argtypes = [ctypes.c_void_p]
    lib.jack_get_sample_rate.restype = ctypes.c_uint32

    status = ctypes.c_int(0)
    client = lib.jack_client_open(name.encode("utf-8", "replace")[:60], _NO_START_SERVER, ctypes.byref(status))
    if not client:
        return EXIT_NO_SERVER
    # Called on a libjack thread; nothing is left to clean up once the server is gone.
    on_shutdown = shutdown_callback(lambda _arg: os._exit(EXIT_SERVER_GONE))
    lib.jack_on_shutdown(client, on_shutdown, None)
    # A full pipe (a daemon that has not asked for a while) must never block libjack's thread:
    # the marks are only counted, so a lost one costs nothing.
    os.set_blocking(sys.stdout.fileno(), False)
    activated = threading.Event()
    reporting = threading.Event()  # set once the ready line is out: marks come after it

    def on_graph_order(_arg: object) -> int:
        if reporting.is_set():
            with contextlib.suppress(OSError):
                os.write(sys.stdout.fileno(), _ROUND_MARK)
        activated.set()
        return 0

    on_graph_order_c = graph_order_callback(on_graph_order)
    lib.jack_set_graph_order_callback(client, on_graph_order_c, None)
    # Notifications reach active clients only. The client has no process callback, so the
    # server never waits for it in a cycle.
    if lib.jack_activate(client) == 0:
        activated.wait(_ACTIVATION_ROUND_TIMEOUT_S)  # our own arrival's round: the graph is settled
    period, rate = lib.jack_get_buffer_size(client), lib.jack_get_sample_rate(client)
    ready = b"%s %d %d %d\n" % (_READY_WORD, period, rate, activated.is_set())
    os.write(sys.stdout.fileno(), ready)  # the pipe is empty
    reporting.set()
    sys.stdin.buffer.read()  # returns at end of file: the daemon closed our stdin, or died
    # No jack_client_close: closing the client hung now and then inside libjack (when it was
    # a never-activated one). The server drops a client whose connection closes, as it does
    # for a crashed one.
    os._exit(EXIT_STOPPED)


if __name__ == "__main__":
    sys.exit(_watch(sys.argv[1] if len(sys.argv) > 1 else "RWKV-Music watch"))
