"""The daemon's MIDI ports: python-rtmidi in and out, as one async context manager.

`MidiPorts` opens a virtual input and a virtual output port named in `[midi]` (or connects to
existing ports named by `connect_in` / `connect_out`, the only way on Windows, e.g. loopMIDI).

Input path: rtmidi's driver thread queues each message with its delta time; a reader thread of
ours takes them from that queue (polling every millisecond when it is empty), stamps the
arrival time in the `time.perf_counter()` domain, decodes the bytes to `daemon.midi_events`
types, and hands each event to asyncio with `loop.call_soon_threadsafe`.

Why a reader thread and not rtmidi's callback: python-rtmidi (1.5) keeps the interpreter lock
while it closes a client, and closing a JACK client waits for the client's process thread.
With a Python callback, that thread may be waiting for the same lock, and the close hangs;
cancelling the callback first frees the callback's data while a call may still be in flight
(a crash). Both happened here under a flood of input. With polling, rtmidi's threads never
call into Python. The stamps do not suffer from the polling: they come from rtmidi's delta
times, measured on its own thread at arrival (see daemon.midi_events.ArrivalStamper).

Overflow policy of the incoming buffer (`daemon.input_queue.InputQueue`, bounded by
`queue_size`): when it is full the OLDEST event is dropped, counted in `stats.overflowed`, and
a warning is logged (at most once a second). A consumer that fell that far behind is late
anyway; keeping the newest events keeps the clock and the current bar right. The reader thread
fills that buffer itself and wakes the event loop once per batch, not once per message: under
a flood (20,000 messages a second measured) a wake-up per message queued callbacks on the loop
faster than it ran them, without bound, and an OSC request waited behind them for most of a
second. The consumer also yields to the loop every `_YIELD_EVERY` events it takes from a full
buffer, so a backlog never keeps the other tasks (OSC, the ticker) waiting for longer than that
many events take.

A release is never lost to an overflow: the buffer keeps a dropped Note Off or sustain-pedal-up
aside and delivers it before the next Note On of its key, or once it has drained, so a flood
cannot leave a key held down in the daemon's view (it would wait for ever for the player to
stop). All Notes Off and All Sound Off (CC 123, CC 120) from the player release the keys it
holds on that channel, and System Reset (FF) on every channel: the port delivers a Note Off
for each before the controller itself, as a DAW's stop button means.

The JACK server going away (stopped, crashed, or dropping our clients) is noticed through
libjack's shutdown callback on a small watch client of our own, in a child process
(`daemon.jack_watch`: a second libjack in this process deadlocked on close; JACK only).
The reader thread then logs it, releases the keys the player held, closes the dead clients,
asks every `_RECONNECT_INTERVAL_S` whether a server runs again, and reopens the same ports
(and connections) when one does; the event stream goes on meanwhile, `send` drops and counts
(`stats.lost_output`), and `connected` / `stats.server_lost` / `stats.reconnected` tell it. The
order matters: opening a client while dead clients of this process are still allocated made
libjack free their memory, and deleting them afterwards crashed the process.

A System Exclusive cut short (F0 without its F7: a device unplugged mid-message) makes
rtmidi's JACK input take every later event for part of it until some event ends with F7: the
input would be deaf. So on JACK a small client of ours is wired to our own input and sends a lone
F7 after each second without input; a lone F7 ends such a run (rtmidi then hands over the
swallowed run, which is counted invalid) and is otherwise ignored. Deafness lasts a second.
JACK cannot hide a port, so the guard's is named "<in_port> (internal):sysex-guard, do not
connect" (README, "Routing").

Order on JACK: open the output, the input, then the SysEx guard with its connection; close the
input, the output, then the guard. libjack crashes the process now and then when a client's
port list changes (a port registered or unregistered) while the client's notification thread
walks that list for the latency notification that any change of the graph sets off (jack2 issue
216). So every change we make waits, before the next one, until the server has sent all its
notifications about it (`_graph_change`, told by the watch's child: `daemon.jack_watch`); a
port is then never registered or unregistered while a notification about our own previous
change is being handled. Without the waits the input's close crashed 1 run in 8 of 60
open/close cycles with both cores loaded (the latency notification of the guard's connection
still under way); a change made by another program at that very moment can still set it off.

After opening on JACK the input must hear a lone F7 from its own guard within 2 s; when it does
not, a client of ours is stuck on a stale libjack futex (a race with another program's client:
`_open_ports`), and the ports are closed and opened again (`stats.deaf_reopens`).

Invalid bytes (truncated, stray data bytes, undefined status) are counted in `stats.invalid`
and dropped; nothing raised while handling a message escapes the reader thread.

The input channel filter applies to channel messages only; clock and transport always pass.
MIDI thru (optional) copies the raw bytes of every well-formed channel message that passes the
filter to the output port, from the reader thread (not system messages, so an external clock
is never echoed back to its source, and not the control changes the daemon consumes itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import rtmidi

from daemon.errors import (
    InvalidMidiMessage,
    MidiApiError,
    MidiError,
    MidiPortClosedError,
    MidiPortError,
    PortNotFoundError,
)
from daemon.input_queue import InputQueue
from daemon.jack_watch import FALLBACK_SETTLE_S, JackServerWatch
from daemon.midi_events import (
    ALL_NOTES_OFF,
    ALL_SOUND_OFF,
    SYSTEM_RESET,
    ArrivalStamper,
    ControlChange,
    MidiEvent,
    NoteOff,
    NoteOn,
    channel_of,
    decode,
)
from daemon.output_latency import OutputLatency
from model.settings import ConfigError

log = logging.getLogger(__name__)

ApiName = Literal["auto", "alsa", "jack", "coremidi", "windows"]

# Our config names of rtmidi's APIs (the dummy and web APIs are left out: no ports).
API_BY_NAME: dict[str, int] = {
    "alsa": rtmidi.API_LINUX_ALSA,
    "jack": rtmidi.API_UNIX_JACK,
    "coremidi": rtmidi.API_MACOSX_CORE,
    "windows": rtmidi.API_WINDOWS_MM,
}
NAME_BY_API: dict[int, str] = {api: name for name, api in API_BY_NAME.items()}

_ALSA_SEQUENCER = "/dev/snd/seq"
# The reader thread polls rtmidi's input queue this often when it is empty: every millisecond
# within a second of the last message, else every 5 ms (the stamps stay exact either way; only
# the hand-over of the first message after a pause waits longer).
_POLL_INTERVAL_S = 0.001
_IDLE_POLL_INTERVAL_S = 0.005
_BUSY_AFTER_MESSAGE_S = 1.0
# rtmidi's own queue between its driver thread and our reader thread. When it is full rtmidi
# drops the NEWEST message and only prints a line: a lost Note Off would leave a key held in
# the daemon's view for ever (call_response then never answers). The overflow policy belongs to
# InputQueue (oldest dropped, releases owed), so this ring is made large enough that a reader
# thread slowed by the event loop under a flood overflows InputQueue, not rtmidi: with 4,096
# entries, 20,000 events a second for 10 s (tests/test_reliability_midi.py) lost a release in
# rtmidi in two runs of four on a 2-core machine, with the reader taking 10-13k events a
# second. 2^17 entries are 6.5 s of that flood, 4 MB of ring (32 bytes an entry).
_RTMIDI_QUEUE_SIZE = 1 << 17
_WARN_INTERVAL_S = 1.0
# The consumer lets other tasks run after this many events taken without waiting.
_YIELD_EVERY = 8
# After the JACK server went away: how often to look for it again.
_RECONNECT_INTERVAL_S = 0.5
# How long a closed JACK output waits before rtmidi frees what its process callback reads (a
# cycle stalled on a loaded machine; see `_release`).
_OUTPUT_CYCLE_DRAIN_S = 0.02
# A lone SysEx end byte goes to our own input after this long without input (see above).
_SYSEX_END_AFTER_S = 1.0
# JACK has no hidden ports, so the guard's port is named to say it is internal: its full name is
# "<in_port> (internal):sysex-guard, do not connect". It is already wired to our input.
SYSEX_GUARD_SUFFIX = "(internal)"
SYSEX_GUARD_PORT = "sysex-guard, do not connect"
_SYSEX_END = [0xF7]
# After opening on JACK: how long the input may take to hear its own guard, and how many times
# the ports are opened before the daemon goes on with what it has (see `_input_hears_guard`).
_GUARD_ECHO_TIMEOUT_S = 2.0
_OPEN_ATTEMPTS = 3


@dataclass
class MidiConfig:
    """The `[midi]` section of config.toml.

    api: auto | alsa | jack | coremidi | windows. auto picks CoreMIDI on macOS, Windows MM on
        Windows, else ALSA when /dev/snd/seq exists, else JACK when a server is running.
    in_port / out_port: names of the virtual ports the daemon creates ("" = no such port); each
        is also the name of its MIDI client, so JACK shows "RWKV-Music in:RWKV-Music in".
    connect_in / connect_out: connect to an existing port instead, by name (exact, else the
        first port whose name contains it, case-insensitive); needed on Windows (loopMIDI).
    in_channels: channels 1-16 accepted on input; empty = all.
    thru: copy accepted channel messages from the input to the output (not the control changes
        the daemon takes for itself, daemon.cc_map).
    queue_size: bound of the incoming event queue (oldest dropped on overflow).
    output_latency_ms / output_latency_soft_ms: send notes this much earlier (daemon.output_latency).
    """

    api: ApiName = "auto"
    in_port: str = "RWKV-Music in"
    out_port: str = "RWKV-Music out"
    connect_in: str = ""
    connect_out: str = ""
    in_channels: list[int] = field(default_factory=list)
    thru: bool = False
    queue_size: int = 1024
    output_latency_ms: float = 0.0
    output_latency_soft_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.api not in ("auto", *API_BY_NAME):
            raise ConfigError(f"midi.api = {self.api!r}: must be one of auto, {', '.join(API_BY_NAME)}")
        for ch in self.in_channels:
            if isinstance(ch, bool) or not isinstance(ch, int) or not 1 <= ch <= 16:
                raise ConfigError(f"midi.in_channels: {ch!r} is not a MIDI channel 1-16")
        if not 16 <= self.queue_size <= 1_000_000:
            raise ConfigError(f"midi.queue_size = {self.queue_size!r}: must be between 16 and 1000000")
        self.output_latency  # noqa: B018 - checks both latency keys

    @property
    def output_latency(self) -> OutputLatency:
        return OutputLatency(self.output_latency_ms, self.output_latency_soft_ms)

    @property
    def channel_filter(self) -> frozenset[int] | None:
        """Accepted channels, 0-based as on the wire; None accepts all."""
        return frozenset(ch - 1 for ch in self.in_channels) or None


@dataclass
class MidiInputStats:
    """Counters of the input side. `received` counts every message rtmidi delivered."""

    received: int = 0
    delivered: int = 0  # put on the queue as events
    invalid: int = 0  # malformed bytes, dropped
    ignored: int = 0  # well-formed but of a kind the daemon does not use (pitch bend, sysex, ...)
    filtered: int = 0  # channel messages outside `in_channels`
    overflowed: int = 0  # oldest events dropped because the queue was full
    thru: int = 0  # messages copied to the output
    errors: int = 0  # unexpected failures while handling a message (logged)
    server_lost: int = 0  # times the MIDI server (JACK) went away under the open ports
    reconnected: int = 0  # times the ports were reopened after that
    lost_output: int = 0  # messages sent while the server was away, dropped
    deaf_reopens: int = 0  # JACK: times the opened input did not hear its own guard (opened again)


@dataclass(frozen=True)
class ApiPorts:
    """What one compiled-in MIDI API offers: ports to receive from and ports to send to.

    `error` says why the API could not be queried (no JACK server, no /dev/snd/seq); the port
    lists are then empty.
    """

    api: str
    display_name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (libjack prints several lines when no server runs) for a probe."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def compiled_apis() -> list[str]:
    """Our names of the APIs compiled into python-rtmidi, in rtmidi's order."""
    return [NAME_BY_API[api] for api in rtmidi.get_compiled_api() if api in NAME_BY_API]


def jack_server_running() -> bool:
    """True when a JACK client can be opened (the server named by JACK_DEFAULT_SERVER or default)."""
    if rtmidi.API_UNIX_JACK not in rtmidi.get_compiled_api():
        return False
    try:
        with _quiet_stderr():
            probe = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name="rwkv-music-probe")
            probe.delete()
    except rtmidi.RtMidiError:
        return False
    return True


def resolve_api(name: str) -> int:
    """The rtmidi API constant for a configured API name; `auto` picks as MidiConfig says.

    Raises MidiApiError when the API is not compiled in, or when auto finds none usable.
    """
    compiled = set(rtmidi.get_compiled_api())
    if name != "auto":
        if name not in API_BY_NAME:
            raise MidiApiError(name, f"unknown; choose one of auto, {', '.join(API_BY_NAME)}")
        api = API_BY_NAME[name]
        if api not in compiled:
            raise MidiApiError(name, f"not compiled into python-rtmidi here (compiled: {', '.join(compiled_apis())})")
        return api
    if sys.platform == "darwin" and rtmidi.API_MACOSX_CORE in compiled:
        return rtmidi.API_MACOSX_CORE
    if sys.platform == "win32" and rtmidi.API_WINDOWS_MM in compiled:
        return rtmidi.API_WINDOWS_MM
    if rtmidi.API_LINUX_ALSA in compiled and os.path.exists(_ALSA_SEQUENCER):
        return rtmidi.API_LINUX_ALSA
    if jack_server_running():
        return rtmidi.API_UNIX_JACK
    raise MidiApiError(
        "auto",
        f"no usable MIDI API: {_ALSA_SEQUENCER} does not exist (load the snd-seq kernel module) "
        "and no JACK server is running (start one, e.g. `jackd -d dummy`), "
        f"compiled APIs: {', '.join(compiled_apis()) or 'none'}",
    )


def list_ports() -> list[ApiPorts]:
    """Ports per compiled-in API, for `rwkv-music ports`; an unusable API carries its error."""
    listings = []
    for api in rtmidi.get_compiled_api():
        if api not in NAME_BY_API:
            continue
        name = NAME_BY_API[api]
        display = rtmidi.get_api_display_name(api)
        if api == rtmidi.API_UNIX_JACK and not jack_server_running():
            listings.append(ApiPorts(name, display, (), (), "no JACK server running"))
            continue
        if api == rtmidi.API_LINUX_ALSA and not os.path.exists(_ALSA_SEQUENCER):
            listings.append(ApiPorts(name, display, (), (), f"{_ALSA_SEQUENCER} does not exist"))
            continue
        try:
            with _quiet_stderr():
                midi_in = rtmidi.MidiIn(api, name="rwkv-music-ports")
                midi_out = rtmidi.MidiOut(api, name="rwkv-music-ports")
            try:
                inputs, outputs = tuple(midi_in.get_ports()), tuple(midi_out.get_ports())
            finally:
                midi_in.delete()
                midi_out.delete()
        except rtmidi.RtMidiError as err:
            listings.append(ApiPorts(name, display, (), (), str(err)))
            continue
        listings.append(ApiPorts(name, display, inputs, outputs))
    return listings


def find_port(available: Sequence[str], wanted: str, direction: str) -> int:
    """Index of the port named `wanted`: an exact match, else the first whose name contains it
    (case-insensitive). Raises PortNotFoundError listing `available`."""
    if wanted in available:
        return list(available).index(wanted)
    for index, name in enumerate(available):
        if wanted.lower() in name.lower():
            return index
    raise PortNotFoundError(wanted, direction, list(available))



def _describe_port(port: object | None, connect: str, virtual: str) -> str:
    """How one side is opened, for logs and status: "none", "connected to ..." or "virtual ..."."""
    if port is None:
        return "none"
    return f"connected to {connect!r}" if connect else f"virtual {virtual!r}"

class MidiPorts:
    """The daemon's MIDI input and output, opened in `__aenter__` and closed in `__aexit__`.

    Use::

        async with MidiPorts(config) as ports:
            with OutputScheduler(ports.send) as scheduler:
                async for event in ports:  # MidiEvent; .time = arrival, perf_counter seconds
                    ...

    Iteration ends when the ports are closed; a driver error reported by rtmidi ends it with
    MidiPortError. `send` is thread-safe (the scheduler thread and thru share the output).
    """

    def __init__(self, config: MidiConfig, *, consumes: Callable[[int, int], bool] | None = None):
        """`consumes(channel, control)`: control changes the daemon takes for itself, which thru
        does not copy (called on the reader thread; must not block)."""
        self.config = config
        self._consumes = consumes
        self._channels = config.channel_filter
        self._stats = MidiInputStats()
        self._stamper = ArrivalStamper()
        self._send_lock = threading.Lock()
        self._midi_in: Any = None
        self._midi_out: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Reader thread -> event loop: a bounded queue (a driver error ends it after the events
        # before), and one wake-up per batch.
        self._queue = InputQueue(config.queue_size)
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._available: asyncio.Event | None = None
        self._held: dict[int, set[int]] = {}  # reader thread: channel -> keys down as sent to us
        self._watch: JackServerWatch | None = None
        self._connected = False
        self._sysex_end: Any = None  # our client that ends a cut-short SysEx on our input
        self._burst = 0  # events taken since the consumer last waited or yielded
        self._open = False
        self._closed = False
        self._api: int | None = None
        self._last_overflow_warning = 0.0
        self._last_invalid_log = 0.0
        self._reader: threading.Thread | None = None
        self._stop_reading = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> MidiPorts:
        if self._open or self._closed:
            raise MidiPortClosedError("MidiPorts can be opened once")
        self._loop = asyncio.get_running_loop()
        self._available = asyncio.Event()
        self._api = resolve_api(self.config.api)
        if self._api == rtmidi.API_UNIX_JACK:
            # Before the ports: its client's arrival is then no news to them (see _release).
            watch = JackServerWatch(f"{self.config.in_port or self.config.out_port or 'RWKV-Music'} watch")
            if watch.open():
                self._watch = watch
            else:
                log.warning("MIDI: the JACK watch did not start; a server that goes away will not be noticed")
        try:
            self._open_ports()
        except BaseException:
            self._release()
            if self._watch is not None:
                self._watch.close()
            raise
        self._open = True
        self._connected = True
        if self._midi_in is not None or self._watch is not None:
            self._reader = threading.Thread(target=self._read_input, name="midi-input", daemon=True)
            self._reader.start()
        log.info(
            "MIDI open on %s: in %s, out %s",
            self.api_name,
            self.input_description,
            self.output_description,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading, close both ports and end the event stream; idempotent.

        Call on the event loop thread; it blocks for at most one poll interval.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_reading.set()
        if self._reader is not None:
            self._reader.join()
        self._release()
        if self._watch is not None:
            self._watch.close()
        if self._available is not None:
            self._available.set()  # a waiting consumer sees the end

    def _release(self) -> None:
        """Close the rtmidi clients: input, output, SysEx guard last (see the module docstring)."""
        midi_in, self._midi_in = self._midi_in, None
        with self._send_lock:
            midi_out, self._midi_out = self._midi_out, None
        sysex_end, self._sysex_end = self._sysex_end, None
        for client in (midi_in, midi_out, sysex_end):
            if client is None:
                continue
            with self._graph_change():
                with contextlib.suppress(rtmidi.RtMidiError):
                    client.close_port()
            if isinstance(client, rtmidi.MidiOut) and self._api == rtmidi.API_UNIX_JACK:
                # rtmidi's MidiOut frees its ring buffer before it closes the JACK client, and
                # a process cycle that began before the port was gone may still read it (a
                # crash: docs/reliability.md). The settle above saw the cycle after the
                # unregistration begin; this lets it end.
                time.sleep(_OUTPUT_CYCLE_DRAIN_S)
            with self._graph_change():
                client.delete()

    @contextlib.contextmanager
    def _graph_change(self) -> Iterator[None]:
        """Around one change of the JACK graph (a client opened or closed, a port registered
        or unregistered, a connection made): on the way out, wait until the server has sent
        every client its notifications about the change, so that the next port registered or
        unregistered does not meet libjack's latency notification (module docstring). Waits
        for a round of notifications at most `jack_watch.SETTLE_TIMEOUT_S`; nothing on ALSA."""
        if self._api != rtmidi.API_UNIX_JACK:
            yield
            return
        if self._watch is None:
            try:
                yield
            finally:
                time.sleep(FALLBACK_SETTLE_S)  # no watch: a fixed wait instead
            return
        with self._watch.change():
            yield

    def _open_ports(self) -> None:
        """Open the output, then the input (which wires the SysEx guard to it: see _release).

        On JACK the input must then hear its own guard; when it does not, every client is
        closed and the ports are opened again, up to `_OPEN_ATTEMPTS` times, after which the
        ports stay as they are and the error is logged. Why: libjack keeps one table of
        other clients' wake-up futexes per process. A client of another program that closes
        while one of ours opens can leave its entry behind, mapped to a file the server has
        since removed, and a client of ours opened later with the same number takes that
        entry as its own: its process thread waits for ever on a futex nobody wakes. The
        server then waits 5 s for it in each of the next cycles (the daemon, blocked in
        libjack, with them), and the input, or the guard ahead of it, never runs again: a
        deaf input. Seen after a server restart, while a program polled the new server
        (`jack_wait`). Closing all of our clients empties that table.
        """
        for attempt in range(1, _OPEN_ATTEMPTS + 1):
            self._stamper = ArrivalStamper()  # a new input client's delta times start afresh
            self._open_output()
            self._open_input()
            if self._input_hears_guard():
                return
            self._stats.deaf_reopens += 1
            if attempt == _OPEN_ATTEMPTS:
                log.error("MIDI: the input did not hear its own SysEx guard after %d openings; going on, "
                          "but it may be deaf (restart the daemon if the player is not heard)", attempt)
                return
            log.warning("MIDI: the input did not hear its own SysEx guard within %.0f s of opening "
                        "(a stale JACK client); closing the ports and opening them again",
                        _GUARD_ECHO_TIMEOUT_S)
            self._release()
            if self._watch is not None:
                self._watch.resume_settling()  # the stuck graph sent no rounds meanwhile

    def _input_hears_guard(self) -> bool:
        """JACK: send a lone F7 from the SysEx guard and wait up to `_GUARD_ECHO_TIMEOUT_S` for
        anything to arrive at the input; True when something did (a message of the player's
        is handled as usual) or when there is nothing to check with (no guard, not JACK)."""
        midi_in, guard = self._midi_in, self._sysex_end
        if midi_in is None or guard is None:
            return True
        try:
            guard.send_message(_SYSEX_END)
        except rtmidi.RtMidiError:
            return True
        deadline = time.perf_counter() + _GUARD_ECHO_TIMEOUT_S
        while True:
            message = midi_in.get_message()
            now = time.perf_counter()
            if message is not None:
                self._handle_received(message, now)
                return True
            if now > deadline:
                return False
            time.sleep(_POLL_INTERVAL_S)

    def _open_input(self) -> None:
        cfg = self.config
        if not (cfg.connect_in or cfg.in_port):
            return
        client = cfg.in_port or "RWKV-Music in"
        label = cfg.connect_in or cfg.in_port
        try:
            with self._graph_change():
                midi_in = rtmidi.MidiIn(self._api, name=client, queue_size_limit=_RTMIDI_QUEUE_SIZE)
        except rtmidi.RtMidiError as err:
            raise MidiPortError(label, f"cannot open the {self.api_name} MIDI client: {err}") from err
        self._midi_in = midi_in
        # Let every message through rtmidi (clock and transport are "timing" to it): some APIs
        # advance the delta time on messages they filter out, which would break the chain of
        # deltas that the arrival stamps are built from. We drop what we do not use ourselves.
        midi_in.ignore_types(sysex=False, timing=False, active_sense=False)
        try:
            if cfg.connect_in:
                port = find_port(midi_in.get_ports(), cfg.connect_in, "input")
                with self._graph_change():
                    midi_in.open_port(port, client)
            else:
                self._check_virtual_ports(cfg.in_port)
                with self._graph_change():
                    midi_in.open_virtual_port(cfg.in_port)
        except rtmidi.RtMidiError as err:
            raise MidiPortError(label, str(err)) from err
        # From here on, driver errors go into the event stream instead of being raised here.
        midi_in.set_error_callback(self._on_error)
        if self._api == rtmidi.API_UNIX_JACK and not cfg.connect_in:
            self._sysex_end = self._open_sysex_end(cfg.in_port)

    def _open_sysex_end(self, port: str) -> Any:
        """A client of ours with an output wired to our own input port "<port>:<port>"."""
        sender = None
        try:
            with self._graph_change():
                sender = rtmidi.MidiOut(self._api, name=f"{port} {SYSEX_GUARD_SUFFIX}")
            ours = find_port(sender.get_ports(), f"{port}:{port}", "output")
            with self._graph_change():  # our last change at open: the ports open on a quiet graph
                sender.open_port(ours, SYSEX_GUARD_PORT)
        except (rtmidi.RtMidiError, PortNotFoundError) as err:
            log.warning("MIDI: no SysEx guard on %s (%s): a SysEx cut short would deafen the input", port, err)
            if sender is not None:
                with self._graph_change():
                    sender.delete()
            return None
        return sender

    def _open_output(self) -> None:
        cfg = self.config
        if not (cfg.connect_out or cfg.out_port):
            return
        client = cfg.out_port or "RWKV-Music out"
        label = cfg.connect_out or cfg.out_port
        try:
            with self._graph_change():
                midi_out = rtmidi.MidiOut(self._api, name=client)
        except rtmidi.RtMidiError as err:
            raise MidiPortError(label, f"cannot open the {self.api_name} MIDI client: {err}") from err
        self._midi_out = midi_out
        try:
            if cfg.connect_out:
                port = find_port(midi_out.get_ports(), cfg.connect_out, "output")
                with self._graph_change():
                    midi_out.open_port(port, client)
            else:
                self._check_virtual_ports(cfg.out_port)
                with self._graph_change():
                    midi_out.open_virtual_port(cfg.out_port)
        except rtmidi.RtMidiError as err:
            raise MidiPortError(label, str(err)) from err

    def _check_virtual_ports(self, port: str) -> None:
        if self._api == rtmidi.API_WINDOWS_MM:
            raise MidiPortError(
                port,
                "Windows MIDI has no virtual ports: create one with loopMIDI and name it in "
                "[midi] connect_in / connect_out",
            )

    # -- properties --------------------------------------------------------------------------

    @property
    def api_name(self) -> str:
        """Our name of the API in use (alsa, jack, coremidi, windows)."""
        return NAME_BY_API.get(self._api, "none") if self._api is not None else "none"

    @property
    def input_description(self) -> str:
        return _describe_port(self._midi_in, self.config.connect_in, self.config.in_port)

    @property
    def output_description(self) -> str:
        return _describe_port(self._midi_out, self.config.connect_out, self.config.out_port)

    @property
    def has_output(self) -> bool:
        """An output port is configured (it may be reopening after a JACK server restart)."""
        configured = bool(self.config.connect_out or self.config.out_port)
        return self._midi_out is not None or (configured and not self._connected)

    @property
    def connected(self) -> bool:
        """False while the MIDI server is away (JACK stopped) and the ports wait to reopen."""
        return self._connected

    @property
    def stats(self) -> MidiInputStats:
        """A snapshot of the input counters."""
        return dataclasses.replace(self._stats)

    # -- output ------------------------------------------------------------------------------

    def send(self, message: Sequence[int]) -> None:
        """Send one MIDI message now; thread-safe. Raises MidiPortError (closed port, driver error).

        While the JACK server is away the message is dropped and counted (`stats.lost_output`):
        there is no port to send to, and the outage was reported once already."""
        with self._send_lock:
            if not self._connected and self._open and not self._closed:
                self._stats.lost_output += 1
                return
            if self._midi_out is None:
                raise MidiPortError(self.config.connect_out or self.config.out_port, "output is not open")
            try:
                self._midi_out.send_message(message)
            except rtmidi.RtMidiError as err:
                raise MidiPortError(self.config.connect_out or self.config.out_port, str(err)) from err

    # -- input -------------------------------------------------------------------------------

    async def receive(self) -> MidiEvent:
        """The next incoming event. Raises MidiPortClosedError once the ports are closed (after
        the events that arrived before), MidiPortError if the driver reported an error."""
        if self._available is None:
            raise MidiPortClosedError("MIDI ports are not open")
        while True:
            event, failure = self._queue.take()
            if event is not None:
                self._burst += 1
                if self._burst >= _YIELD_EVERY:
                    self._burst = 0
                    await asyncio.sleep(0)  # a backlog must not keep OSC and the ticker waiting
                return event
            if failure is not None:
                raise failure
            if self._closed:
                raise MidiPortClosedError("MIDI ports are closed")
            self._burst = 0
            self._available.clear()
            await self._available.wait()

    def __aiter__(self) -> MidiPorts:
        return self

    async def __anext__(self) -> MidiEvent:
        if self._available is None:
            raise MidiPortClosedError("MIDI ports are not open; use `async with MidiPorts(...)`")
        try:
            return await self.receive()
        except MidiPortClosedError:
            raise StopAsyncIteration from None

    def _read_input(self) -> None:
        """Reader thread: poll rtmidi's queue, handle every message, sleep briefly when empty;
        reopen the ports when the JACK server went away and came back."""
        last_message = last_sysex_end = time.perf_counter()
        while not self._stop_reading.is_set():
            if self._watch is not None and self._watch.gone:
                self._reopen_after_server_loss()
                continue
            midi_in = self._midi_in
            try:
                message = midi_in.get_message() if midi_in is not None else None
            except Exception:
                self._stats.errors += 1
                log.exception("reading MIDI input failed")
                message = None
            now = time.perf_counter()
            if message is None:
                if self._sysex_end is not None and now - max(last_message, last_sysex_end) >= _SYSEX_END_AFTER_S:
                    last_sysex_end = now
                    with contextlib.suppress(rtmidi.RtMidiError):
                        self._sysex_end.send_message(_SYSEX_END)
                # Poll fast while music is coming in, slower after a quiet second (CPU).
                busy = now - last_message < _BUSY_AFTER_MESSAGE_S
                self._stop_reading.wait(_POLL_INTERVAL_S if busy else _IDLE_POLL_INTERVAL_S)
                continue
            if self._handle_received(message, now):
                last_message = now

    def _handle_received(self, message_and_delta: tuple[list[int], float], now: float) -> bool:
        """Reader thread: one message from rtmidi's queue. The guard's lone F7 only extends the
        chain of delta times; anything else is handled (`_on_message`). True for the latter."""
        if message_and_delta[0] == _SYSEX_END:
            self._stamper.stamp(message_and_delta[1], now)  # keeps the chain of delta times whole
            return False
        self._on_message(message_and_delta, now)
        return True

    def _reopen_after_server_loss(self) -> None:
        """Reader thread: the JACK server is gone. Close the dead clients, wait for a server,
        reopen the ports. Returns when they are open again or the ports are being closed."""
        assert self._watch is not None
        self._connected = False
        self._stats.server_lost += 1
        log.error("MIDI: the JACK server went away; the ports are gone, reopening them when it is back")
        now = time.perf_counter()
        for channel in list(self._held):
            self._release_held(channel, now)  # the player's note-offs cannot reach us now
        self._release()
        self._watch.close()
        while not self._stop_reading.wait(_RECONNECT_INTERVAL_S):
            if not self._watch.open():
                continue  # no server yet
            try:
                self._open_ports()
            except MidiError as err:
                log.warning("MIDI: a JACK server is back but the ports did not reopen (%s); trying again", err)
                self._release()
                self._watch.close()
                continue
            self._connected = True
            self._stats.reconnected += 1
            log.warning("MIDI: the JACK server is back; ports reopened: in %s, out %s",
                        self.input_description, self.output_description)
            return

    def _on_message(self, message_and_delta: tuple[list[int], float], now: float) -> None:
        """Reader thread: stamp, decode, filter, thru, hand over to the event loop. Never raises."""
        stats = self._stats
        try:
            if self._closed:
                return
            stats.received += 1
            data, delta = message_and_delta
            arrival = self._stamper.stamp(delta, now)
            try:
                event = decode(data, arrival)
            except InvalidMidiMessage as err:
                stats.invalid += 1
                if arrival - self._last_invalid_log > _WARN_INTERVAL_S:
                    self._last_invalid_log = arrival
                    log.warning("dropped %s (%d invalid so far)", err, stats.invalid)
                return
            channel = channel_of(data)
            if channel is not None:
                if self._channels is not None and channel not in self._channels:
                    stats.filtered += 1
                    return
                if self.config.thru and self._midi_out is not None and not self._consumed(data):
                    self.send(data)
                    stats.thru += 1
            if event is None:
                if data[0] == SYSTEM_RESET:
                    for held_channel in list(self._held):
                        self._release_held(held_channel, arrival)
                stats.ignored += 1
                return
            if isinstance(event, NoteOn):
                self._held.setdefault(event.channel, set()).add(event.note)
            elif isinstance(event, NoteOff):
                self._held.get(event.channel, set()).discard(event.note)
            elif isinstance(event, ControlChange) and event.control in (ALL_NOTES_OFF, ALL_SOUND_OFF):
                self._release_held(event.channel, arrival)
            self._push(event)
        except Exception:
            # Closing loop (RuntimeError), output failure in thru: count, log, keep going.
            stats.errors += 1
            log.exception("handling MIDI input failed (%d errors so far)", stats.errors)

    def _consumed(self, data: Sequence[int]) -> bool:
        consumes = self._consumes
        return consumes is not None and data[0] & 0xF0 == 0xB0 and consumes(data[0] & 0x0F, data[1])

    def _on_error(self, error_type: int, message: str, _data: object = None) -> None:
        """rtmidi's error callback, on any thread: warnings are logged, errors end the stream."""
        if error_type in (rtmidi.ERRORTYPE_WARNING, rtmidi.ERRORTYPE_DEBUG_WARNING):
            log.warning("MIDI driver: %s", message)
            return
        log.error("MIDI driver error: %s", message)
        self._queue.fail(MidiPortError(self.config.connect_in or self.config.in_port, message))
        self._wake()

    def _release_held(self, channel: int, time_: float) -> None:
        """Reader thread: a Note Off for every key held on `channel` (All Notes Off, reset)."""
        for note in sorted(self._held.pop(channel, ())):
            self._push(NoteOff(channel, note, 0, time_))

    def _push(self, event: MidiEvent) -> None:
        """Reader thread: queue `event` (the oldest is dropped when the queue is full), count,
        wake the loop."""
        dropped = self._queue.push(event)
        stats = self._stats
        stats.delivered += 1
        if dropped:
            stats.overflowed += 1
            now = time.perf_counter()
            if now - self._last_overflow_warning > _WARN_INTERVAL_S:
                self._last_overflow_warning = now
                log.warning(
                    "MIDI input queue full (%d): dropped the oldest event (%d dropped so far)",
                    self.config.queue_size,
                    stats.overflowed,
                )
        self._wake()

    def _wake(self) -> None:
        """Any thread: make a waiting consumer look at the buffer; one call per batch."""
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    def _on_wake(self) -> None:
        """Event loop thread."""
        with self._wake_lock:
            self._wake_pending = False
        if self._available is not None:
            self._available.set()



__all__ = [
    "API_BY_NAME",
    "ArrivalStamper",
    "ApiPorts",
    "MidiConfig",
    "MidiInputStats",
    "MidiPorts",
    "compiled_apis",
    "find_port",
    "jack_server_running",
    "list_ports",
    "resolve_api",
]
