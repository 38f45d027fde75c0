"""A private JACK server with the dummy driver: real MIDI ports where no MIDI backend is set up.

A machine without ALSA's sequencer (/dev/snd/seq: containers, CI runners, servers) and without a
running JACK server has nowhere to open virtual MIDI ports. `PrivateJackServer` starts

    jackd -R -P 70 -S -n NAME -d dummy -r 48000 -p 32      (--no-realtime where not allowed)

(the dummy driver needs no sound hardware; a 32-frame period at 48 kHz delivers MIDI within
0.67 ms; real-time threads as a desktop JACK has them, when this process may use SCHED_FIFO:
without them the delivery tail grows on a busy machine, docs/timing.md), waits until it
accepts clients, and points JACK_DEFAULT_SERVER at it for this process while it runs, so
python-rtmidi's JACK API, the jack_* tools started from here and the daemon's ports all use it.
Leaving the block stops the server and restores JACK_DEFAULT_SERVER.

`-S` (synchronous mode): the server waits for every client to finish its cycle. Asynchronous
mode drops a client's MIDI events for a cycle it finishes late, which happens on a loaded
machine; a late message is better than a lost one here.

jackd runs in a session of its own, so a Ctrl-C at the terminal reaches the daemon (which then
releases its notes through the still-running server) and not the server; on Linux the server
also gets SIGTERM if the process that started it dies without stopping it.

`usable_midi_api` and `private_jack_wanted` decide when a private server is needed;
`ensure_jack_server` uses the running JACK server, or a private one when none runs (tools that
need JACK itself: the demo, the daemon benchmark).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import DaemonError, MidiApiError
from daemon.midi_ports import NAME_BY_API, jack_server_running, resolve_api
from daemon.realtime import realtime_allowed

log = logging.getLogger(__name__)

PRIVATE_JACK_CHOICES: tuple[str, ...] = ("auto", "always", "never")

SAMPLE_RATE = 48000
PERIOD_FRAMES = 32
START_TIMEOUT_S = 20.0
JACK_PRIORITY = 70  # jackd -P: above the daemon's output thread (daemon.realtime.DEFAULT_PRIORITY)
STOP_TIMEOUT_S = 10.0
_ENV_SERVER = "JACK_DEFAULT_SERVER"
# The same device daemon.midi_ports checks: ALSA's sequencer, present when snd-seq is loaded.
_ALSA_SEQUENCER = "/dev/snd/seq"
_PROBE_INTERVAL_S = 0.1
_names = itertools.count()


class JackServerError(DaemonError):
    """A private JACK server could not be started (or died); `log_path` holds jackd's output."""

    def __init__(self, name: str, reason: str, log_path: Path | None = None):
        where = f" (log: {log_path})" if log_path is not None else ""
        super().__init__(f"JACK server {name!r}: {reason}{where}")
        self.name = name
        self.reason = reason
        self.log_path = log_path


class JackdNotFoundError(JackServerError):
    """The jackd program is not installed (or not on PATH)."""

    def __init__(self, name: str):
        super().__init__(
            name,
            "jackd is not installed: install JACK (Debian/Ubuntu: apt-get install jackd2; "
            "macOS: brew install jack), or start a JACK server yourself",
        )


def usable_midi_api(api: str = "auto") -> str | None:
    """Our name of the MIDI API that `api` (a `[midi] api` value) would use, if it can open
    ports right now (ALSA: /dev/snd/seq exists; JACK: a server accepts clients); else None."""
    try:
        resolved = resolve_api(api)
    except MidiApiError:
        return None
    name = NAME_BY_API[resolved]
    if name == "jack" and not jack_server_running():
        return None
    if name == "alsa" and not os.path.exists(_ALSA_SEQUENCER):
        return None
    return name


def private_jack_wanted(choice: str, api: str) -> bool:
    """Whether to start a private JACK server for a daemon configured with `[midi] api`.

    choice: never | always | auto; auto = when `api` is auto or jack and nothing usable runs.
    Raises DaemonError for `always` with an API other than auto or jack (the server would be
    of no use to it).
    """
    if choice not in PRIVATE_JACK_CHOICES:
        raise DaemonError(f"private JACK server: {choice!r} is not one of {', '.join(PRIVATE_JACK_CHOICES)}")
    if choice == "never":
        return False
    if api not in ("auto", "jack"):
        if choice == "always":
            raise DaemonError(f"a private JACK server needs midi.api = auto or jack, not {api!r}")
        return False
    return choice == "always" or usable_midi_api(api) is None


def _default_name() -> str:
    n = next(_names)
    return f"rwkv-music-{os.getpid()}" + (f"-{n}" if n else "")


# jackd's start-up banner, which follows the line that says what went wrong.
_BANNER = ("jackdmp ", "Copyright ", "jackdmp comes with", "This is free software", "under certain conditions")
# JACK keeps a registry of 8 servers in shared memory. A server that is killed (not stopped)
# keeps its entry, and entries are only reclaimed by a new server of the same name, so killed
# servers with unique names fill it until no server can start.
_SHM_DIR = Path("/dev/shm")
_REGISTRY_FULL = "Too many servers already active"


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "no output"
    if _REGISTRY_FULL in text:
        return (f"{_REGISTRY_FULL}: JACK's registry of 8 servers is full, probably of servers that were "
                f"killed; stop every JACK server, then remove {_SHM_DIR / 'jack-shm-registry'}")
    meaningful = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(_BANNER)]
    return " | ".join(meaningful[-lines:]) or "no output"


def jackd_running() -> bool:
    """Whether any JACK server process (jackd, jackdbus) runs on this machine (Linux: /proc)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("jackd", "jackdbus"):
                return True
        except OSError:  # the process ended while we looked
            continue
    return False


def reclaim_stale_jack_registry() -> int:
    """Remove JACK's shared-memory registry and segments when no JACK server runs (Linux).

    They are left behind by servers that were killed, and a full registry stops every new
    server from starting. With no server running nothing can be using them. Only files this
    user owns are removed. Returns how many were removed."""
    if not sys.platform.startswith("linux") or not _SHM_DIR.is_dir() or jackd_running():
        return 0
    removed = 0
    for path in _SHM_DIR.glob("jack*"):
        try:
            if path.is_file() and path.stat().st_uid == os.getuid():
                path.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("removed %d stale JACK shared-memory files (no JACK server was running)", removed)
    return removed


def _child_setup() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, so no jackd is left over."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class PrivateJackServer:
    """A jackd with the dummy driver for this process, as a context manager.

    Use::

        with PrivateJackServer() as jack:      # JACK_DEFAULT_SERVER = jack.name meanwhile
            ...  # rtmidi.API_UNIX_JACK clients, the daemon's ports, jack_lsp -s jack.name

    name: the server name (default "rwkv-music-<pid>"); log_path: where jackd's output goes
    (default: a file in the temporary folder, removed after a clean stop, kept when the start
    failed). Start it from a thread that outlives it: on Linux the server is told to stop when
    the thread that started it ends. Raises JackdNotFoundError when jackd is not installed and
    JackServerError when it exits or does not accept clients within `start_timeout_s`.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        log_path: Path | None = None,
        sample_rate: int = SAMPLE_RATE,
        period_frames: int = PERIOD_FRAMES,
        start_timeout_s: float = START_TIMEOUT_S,
        realtime: bool | None = None,
    ):
        self.name = name or _default_name()
        # Real-time threads, as a desktop JACK runs, where the system allows them (None: probe).
        self.realtime = realtime_allowed() if realtime is None else realtime
        self._own_log = log_path is None
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"{self.name}.jackd.log"
        self.sample_rate = sample_rate
        self.period_frames = period_frames
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self._previous_env: str | None = None
        self._env_set = False
        self._ready = False

    @property
    def command(self) -> list[str]:
        """The jackd command line (jackd is looked up on PATH when started)."""
        scheduling = ["-R", "-P", str(JACK_PRIORITY)] if self.realtime else ["--no-realtime"]
        return [
            "jackd", *scheduling, "-S", "-n", self.name,
            "-d", "dummy", "-r", str(self.sample_rate), "-p", str(self.period_frames),
        ]  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> PrivateJackServer:
        """Start jackd, wait until it accepts clients, set JACK_DEFAULT_SERVER. Returns self."""
        if self.process is not None:
            raise JackServerError(self.name, "already started")
        jackd = shutil.which("jackd")
        if jackd is None:
            raise JackdNotFoundError(self.name)
        self._previous_env = os.environ.get(_ENV_SERVER)
        os.environ[_ENV_SERVER] = self.name
        self._env_set = True
        try:
            if jack_server_running():
                # Waiting for it would find the other server ready, and this jackd would fail.
                raise JackServerError(self.name, "a JACK server of this name runs already")
            reclaim_stale_jack_registry()
            self._launch(jackd)
            self._wait_until_ready()
            self._ready = True
        except BaseException:
            self._own_log = False  # keep the log of a failed start: the error points at it
            self.stop()
            raise
        log.info(
            "private JACK server %r running (dummy driver, %d Hz, %d frames; log %s)",
            self.name, self.sample_rate, self.period_frames, self.log_path,
        )
        return self

    def _launch(self, jackd: str) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1", _ENV_SERVER: self.name}
        with open(self.log_path, "wb") as out:
            try:
                self.process = subprocess.Popen(
                    [jackd, *self.command[1:]],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True, preexec_fn=_child_setup,
                )  # fmt: skip
            except OSError as err:
                raise JackServerError(self.name, f"cannot run {jackd}: {err}", self.log_path) from err

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while not jack_server_running() or self.process.poll() is not None:
            code = self.process.poll()
            if code is not None:
                raise JackServerError(
                    self.name, f"jackd exited with status {code}: {_log_tail(self.log_path)}", self.log_path
                )
            if time.monotonic() > deadline:
                raise JackServerError(
                    self.name,
                    f"jackd did not accept clients within {self.start_timeout_s:g} s: {_log_tail(self.log_path)}",
                    self.log_path,
                )
            time.sleep(_PROBE_INTERVAL_S)

    def stop(self) -> None:
        """Stop jackd (SIGTERM, then SIGKILL after STOP_TIMEOUT_S), restore JACK_DEFAULT_SERVER;
        idempotent. Stop the JACK clients of this process first."""
        if self._env_set:
            if self._previous_env is None:
                os.environ.pop(_ENV_SERVER, None)
            else:
                os.environ[_ENV_SERVER] = self._previous_env
            self._env_set = False
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("JACK server %r did not stop within %g s: killed", self.name, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
            log.info("private JACK server %r stopped", self.name)
        elif self._ready:
            log.warning("private JACK server %r had exited with status %s", self.name, process.returncode)
            self._own_log = False
        self._ready = False
        if self._own_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> PrivateJackServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class JackServerInUse:
    """The JACK server a block runs against: its name, and whether it was started for the block."""

    name: str
    private: bool


@contextlib.contextmanager
def ensure_jack_server(log_path: Path | None = None) -> Iterator[JackServerInUse]:
    """The JACK server JACK_DEFAULT_SERVER names (or the default one) when it accepts clients,
    else a PrivateJackServer (logging to `log_path`) for the length of the block."""
    if jack_server_running():
        yield JackServerInUse(os.environ.get(_ENV_SERVER) or "default", private=False)
        return
    with PrivateJackServer(log_path=log_path) as server:
        yield JackServerInUse(server.name, private=True)


__all__ = [
    "PRIVATE_JACK_CHOICES",
    "JackServerError",
    "JackServerInUse",
    "JackdNotFoundError",
    "PrivateJackServer",
    "ensure_jack_server",
    "private_jack_wanted",
    "usable_midi_api",
]
