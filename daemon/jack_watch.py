"""Notice a JACK server that goes away, from a small child process of its own.

`JackServerWatch` starts this file as a script. The child opens a port-less JACK client with
the system's libjack (through ctypes), asks for libjack's shutdown callback, prints one line
("watching") and then waits for its standard input to close. When the server goes away the
callback ends the child with `EXIT_SERVER_GONE`; when the daemon closes the watch (or dies) the
child's stdin reaches end of file and it exits; the server drops its client.

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
import time

log = logging.getLogger(__name__)

# The child's exit codes.
EXIT_STOPPED = 0  # its stdin closed: asked to stop
EXIT_SERVER_GONE = 3  # libjack's shutdown callback: the server went away or dropped the client
EXIT_NO_SERVER = 4  # no server to watch
EXIT_NO_LIBJACK = 5  # libjack cannot be loaded

_READY_LINE = b"watching\n"
_NO_START_SERVER = 0x01  # JackNoStartServer: never start a server as a side effect
_START_TIMEOUT_S = 10.0  # for the child to open its client (a loaded machine is slow)
_STOP_TIMEOUT_S = 2.0  # for the child to exit when asked, before it is killed


class JackServerWatch:
    """A child process watching the JACK server named by JACK_DEFAULT_SERVER (or the default).

    `open()` starts it and returns once it watches (False: no server, or no libjack); `gone`
    becomes true when the server went away; `close()` ends the child within a bounded time.
    """

    def __init__(self, name: str):
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._broken_reported = False

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
        return line == _READY_LINE

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

    status = ctypes.c_int(0)
    client = lib.jack_client_open(name.encode("utf-8", "replace")[:60], _NO_START_SERVER, ctypes.byref(status))
    if not client:
        return EXIT_NO_SERVER
    # Called on a libjack thread; nothing is left to clean up once the server is gone.
    on_shutdown = shutdown_callback(lambda _arg: os._exit(EXIT_SERVER_GONE))
    lib.jack_on_shutdown(client, on_shutdown, None)
    os.write(sys.stdout.fileno(), _READY_LINE)
    sys.stdin.buffer.read()  # returns at end of file: the daemon closed our stdin, or died
    # No jack_client_close: closing this never-activated client hung now and then inside
    # libjack. The server drops a client whose connection closes, as it does for a crashed one.
    os._exit(EXIT_STOPPED)


if __name__ == "__main__":
    sys.exit(_watch(sys.argv[1] if len(sys.argv) > 1 else "RWKV-Music watch"))
