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

Overflow policy of the incoming queue (bounded, `queue_size`): when it is full the OLDEST
event is dropped, counted in `stats.overflowed`, and a warning is logged (at most once a
second). A consumer that fell that far behind is late anyway; keeping the newest events keeps
the clock and the current bar right.

Invalid bytes (truncated, stray data bytes, undefined status) are counted in `stats.invalid`
and dropped; nothing raised while handling a message escapes the reader thread.

The input channel filter applies to channel messages only; clock and transport always pass.
MIDI thru (optional) copies the raw bytes of every well-formed channel message that passes the
filter to the output port, from the reader thread (not system messages, so an external clock
is never echoed back to its source).
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
from collections.abc import Iterator, Sequence
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
from daemon.midi_events import ArrivalStamper, MidiEvent, channel_of, decode
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
# rtmidi's own queue between its driver thread and our reader thread.
_RTMIDI_QUEUE_SIZE = 4096
_WARN_INTERVAL_S = 1.0


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
    thru: copy accepted channel messages from the input to the output.
    queue_size: bound of the incoming event queue (oldest dropped on overflow).
    """

    api: ApiName = "auto"
    in_port: str = "RWKV-Music in"
    out_port: str = "RWKV-Music out"
    connect_in: str = ""
    connect_out: str = ""
    in_channels: list[int] = field(default_factory=list)
    thru: bool = False
    queue_size: int = 1024

    def __post_init__(self) -> None:
        if self.api not in ("auto", *API_BY_NAME):
            raise ConfigError(f"midi.api = {self.api!r}: must be one of auto, {', '.join(API_BY_NAME)}")
        for ch in self.in_channels:
            if isinstance(ch, bool) or not isinstance(ch, int) or not 1 <= ch <= 16:
                raise ConfigError(f"midi.in_channels: {ch!r} is not a MIDI channel 1-16")
        if not 16 <= self.queue_size <= 1_000_000:
            raise ConfigError(f"midi.queue_size = {self.queue_size!r}: must be between 16 and 1000000")

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

    def __init__(self, config: MidiConfig):
        self.config = config
        self._channels = config.channel_filter
        self._stats = MidiInputStats()
        self._stamper = ArrivalStamper()
        self._send_lock = threading.Lock()
        self._midi_in: Any = None
        self._midi_out: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Any] | None = None
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
        self._queue = asyncio.Queue(maxsize=self.config.queue_size)
        self._api = resolve_api(self.config.api)
        try:
            self._open_input()
            self._open_output()
        except BaseException:
            self._release()
            raise
        self._open = True
        if self._midi_in is not None:
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
        if self._queue is not None:
            self._put_dropping_oldest(_END_OF_STREAM)

    def _release(self) -> None:
        midi_in, self._midi_in = self._midi_in, None
        if midi_in is not None:
            with contextlib.suppress(rtmidi.RtMidiError):
                midi_in.close_port()
            midi_in.delete()
        with self._send_lock:
            midi_out, self._midi_out = self._midi_out, None
        if midi_out is not None:
            with contextlib.suppress(rtmidi.RtMidiError):
                midi_out.close_port()
            midi_out.delete()

    def _open_input(self) -> None:
        cfg = self.config
        if not (cfg.connect_in or cfg.in_port):
            return
        client = cfg.in_port or "RWKV-Music in"
        label = cfg.connect_in or cfg.in_port
        try:
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
                midi_in.open_port(find_port(midi_in.get_ports(), cfg.connect_in, "input"), client)
            else:
                self._check_virtual_ports(cfg.in_port)
                midi_in.open_virtual_port(cfg.in_port)
        except rtmidi.RtMidiError as err:
            raise MidiPortError(label, str(err)) from err
        # From here on, driver errors go into the event stream instead of being raised here.
        midi_in.set_error_callback(self._on_error)

    def _open_output(self) -> None:
        cfg = self.config
        if not (cfg.connect_out or cfg.out_port):
            return
        client = cfg.out_port or "RWKV-Music out"
        label = cfg.connect_out or cfg.out_port
        try:
            midi_out = rtmidi.MidiOut(self._api, name=client)
        except rtmidi.RtMidiError as err:
            raise MidiPortError(label, f"cannot open the {self.api_name} MIDI client: {err}") from err
        self._midi_out = midi_out
        try:
            if cfg.connect_out:
                midi_out.open_port(find_port(midi_out.get_ports(), cfg.connect_out, "output"), client)
            else:
                self._check_virtual_ports(cfg.out_port)
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
        cfg = self.config
        if self._midi_in is None:
            return "none"
        return f"connected to {cfg.connect_in!r}" if cfg.connect_in else f"virtual {cfg.in_port!r}"

    @property
    def output_description(self) -> str:
        cfg = self.config
        if self._midi_out is None:
            return "none"
        return f"connected to {cfg.connect_out!r}" if cfg.connect_out else f"virtual {cfg.out_port!r}"

    @property
    def has_output(self) -> bool:
        return self._midi_out is not None

    @property
    def stats(self) -> MidiInputStats:
        """A snapshot of the input counters."""
        return dataclasses.replace(self._stats)

    # -- output ------------------------------------------------------------------------------

    def send(self, message: Sequence[int]) -> None:
        """Send one MIDI message now; thread-safe. Raises MidiPortError (closed port, driver error)."""
        with self._send_lock:
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
        if self._queue is None:
            raise MidiPortClosedError("MIDI ports are not open")
        item = await self._queue.get()
        if item is _END_OF_STREAM:
            self._queue.put_nowait(_END_OF_STREAM)  # wake any other waiter too
            raise MidiPortClosedError("MIDI ports are closed")
        if isinstance(item, MidiError):
            raise item
        return item

    def __aiter__(self) -> MidiPorts:
        return self

    async def __anext__(self) -> MidiEvent:
        if self._queue is None:
            raise MidiPortClosedError("MIDI ports are not open; use `async with MidiPorts(...)`")
        try:
            return await self.receive()
        except MidiPortClosedError:
            raise StopAsyncIteration from None

    def _read_input(self) -> None:
        """Reader thread: poll rtmidi's queue, handle every message, sleep briefly when empty."""
        midi_in = self._midi_in
        last_message = time.perf_counter()
        while not self._stop_reading.is_set():
            try:
                message = midi_in.get_message()
            except Exception:
                self._stats.errors += 1
                log.exception("reading MIDI input failed")
                message = None
            now = time.perf_counter()
            if message is None:
                # Poll fast while music is coming in, slower after a quiet second (CPU).
                busy = now - last_message < _BUSY_AFTER_MESSAGE_S
                self._stop_reading.wait(_POLL_INTERVAL_S if busy else _IDLE_POLL_INTERVAL_S)
                continue
            last_message = now
            self._on_message(message, now)

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
                if self.config.thru and self._midi_out is not None:
                    self.send(data)
                    stats.thru += 1
            if event is None:
                stats.ignored += 1
                return
            self._loop.call_soon_threadsafe(self._enqueue, event)  # type: ignore[union-attr]
        except Exception:
            # Closing loop (RuntimeError), output failure in thru: count, log, keep going.
            stats.errors += 1
            log.exception("handling MIDI input failed (%d errors so far)", stats.errors)

    def _on_error(self, error_type: int, message: str, _data: object = None) -> None:
        """rtmidi's error callback, on any thread: warnings are logged, errors end the stream."""
        if error_type in (rtmidi.ERRORTYPE_WARNING, rtmidi.ERRORTYPE_DEBUG_WARNING):
            log.warning("MIDI driver: %s", message)
            return
        error = MidiPortError(self.config.connect_in or self.config.in_port, message)
        log.error("MIDI driver error: %s", message)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._put_dropping_oldest, error)

    def _enqueue(self, event: MidiEvent) -> None:
        """Event loop thread: put with the drop-oldest overflow policy."""
        if self._closed:
            return
        if self._put_dropping_oldest(event):
            self._stats.overflowed += 1
            now = time.perf_counter()
            if now - self._last_overflow_warning > _WARN_INTERVAL_S:
                self._last_overflow_warning = now
                log.warning(
                    "MIDI input queue full (%d): dropped the oldest event (%d dropped so far)",
                    self.config.queue_size,
                    self._stats.overflowed,
                )
        self._stats.delivered += 1

    def _put_dropping_oldest(self, item: object) -> bool:
        """Put `item`, first dropping the oldest entry if full; True if one was dropped."""
        assert self._queue is not None
        dropped = False
        if self._queue.full():
            self._queue.get_nowait()
            dropped = True
        self._queue.put_nowait(item)
        return dropped


_END_OF_STREAM = object()

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
