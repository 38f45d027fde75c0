"""MIDI bytes <-> our event types, at the edge of the daemon.

Incoming rtmidi messages (lists of ints) become frozen dataclasses that carry the channel
(0-15, as on the wire; users count 1-16) and the arrival time in the `time.perf_counter()`
domain, the same domain as the clocks and the output scheduler. Only the messages the daemon
uses have types (notes, control changes including the sustain pedal, MIDI clock and transport,
Song Position Pointer); other well-formed messages decode to None, malformed bytes raise
InvalidMidiMessage so the port adapter can count and drop them.

Outgoing messages are plain tuples of ints (what rtmidi's `send_message` takes); the `to_bytes`
methods and the small builders below make them. `ArrivalStamper` turns rtmidi's delta times
into arrival times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from daemon.errors import InvalidMidiMessage

MidiBytes = tuple[int, ...]

# Status bytes (high nibble for channel messages), MIDI 1.0 specification table I/II.
NOTE_OFF = 0x80
NOTE_ON = 0x90
POLY_AFTERTOUCH = 0xA0
CONTROL_CHANGE = 0xB0
PROGRAM_CHANGE = 0xC0
CHANNEL_AFTERTOUCH = 0xD0
PITCH_BEND = 0xE0
SYSEX_START = 0xF0
SYSEX_END = 0xF7
SONG_POSITION = 0xF2
TIMING_CLOCK = 0xF8
START = 0xFA
CONTINUE = 0xFB
STOP = 0xFC
SYSTEM_RESET = 0xFF

SUSTAIN_PEDAL = 64  # CC 64, damper pedal: value >= 64 is down
ALL_SOUND_OFF = 120
ALL_NOTES_OFF = 123
CLOCKS_PER_BEAT = 24  # MIDI clock runs at 24 pulses per quarter note
SIXTEENTHS_PER_BEAT = 4  # Song Position Pointer counts "MIDI beats" = sixteenth notes

# A Note On with velocity 0 is a Note Off; the specification equates it to release velocity 64.
_NOTE_ON_ZERO_RELEASE_VELOCITY = 64

# Total length (status included) of each channel message kind, by high nibble.
_CHANNEL_LENGTH = {0x80: 3, 0x90: 3, 0xA0: 3, 0xB0: 3, 0xC0: 2, 0xD0: 2, 0xE0: 3}
# System common / real-time lengths; statuses missing here (F4, F5, F9, FD) are undefined.
_SYSTEM_LENGTH = {
    0xF1: 2,  # MTC quarter frame
    0xF2: 3,  # song position pointer
    0xF3: 2,  # song select
    0xF6: 1,  # tune request
    0xF8: 1,  # timing clock
    0xFA: 1,  # start
    0xFB: 1,  # continue
    0xFC: 1,  # stop
    0xFE: 1,  # active sensing
    0xFF: 1,  # system reset
}


@dataclass(frozen=True, slots=True)
class NoteOn:
    """A key pressed: velocity 1-127 (velocity 0 arrives as NoteOff)."""

    channel: int
    note: int
    velocity: int
    time: float

    def to_bytes(self) -> MidiBytes:
        return note_on(self.channel, self.note, self.velocity)


@dataclass(frozen=True, slots=True)
class NoteOff:
    """A key released; `velocity` is the release velocity."""

    channel: int
    note: int
    velocity: int
    time: float

    def to_bytes(self) -> MidiBytes:
        return note_off(self.channel, self.note, self.velocity)


@dataclass(frozen=True, slots=True)
class ControlChange:
    """A controller moved; `control` 64 is the sustain pedal."""

    channel: int
    control: int
    value: int
    time: float

    @property
    def is_sustain(self) -> bool:
        return self.control == SUSTAIN_PEDAL

    @property
    def pedal_down(self) -> bool:
        """For the sustain pedal: True when pressed (value >= 64, as the MIDI spec says)."""
        return self.value >= 64

    def to_bytes(self) -> MidiBytes:
        return control_change(self.channel, self.control, self.value)


@dataclass(frozen=True, slots=True)
class ClockTick:
    """One MIDI timing clock pulse (0xF8), 24 per quarter note."""

    time: float

    def to_bytes(self) -> MidiBytes:
        return (TIMING_CLOCK,)


@dataclass(frozen=True, slots=True)
class Start:
    """Transport start (0xFA): play from the beginning; the next clock pulse is beat 0."""

    time: float

    def to_bytes(self) -> MidiBytes:
        return (START,)


@dataclass(frozen=True, slots=True)
class Continue:
    """Transport continue (0xFB): play from the current song position at the next pulse."""

    time: float

    def to_bytes(self) -> MidiBytes:
        return (CONTINUE,)


@dataclass(frozen=True, slots=True)
class Stop:
    """Transport stop (0xFC)."""

    time: float

    def to_bytes(self) -> MidiBytes:
        return (STOP,)


@dataclass(frozen=True, slots=True)
class SongPosition:
    """Song Position Pointer (0xF2): position in sixteenth notes since the start of the song."""

    sixteenths: int
    time: float

    @property
    def beat(self) -> float:
        """The position in quarter-note beats."""
        return self.sixteenths / SIXTEENTHS_PER_BEAT

    def to_bytes(self) -> MidiBytes:
        return (SONG_POSITION, self.sixteenths & 0x7F, (self.sixteenths >> 7) & 0x7F)


MidiEvent = NoteOn | NoteOff | ControlChange | ClockTick | Start | Continue | Stop | SongPosition
ChannelEvent = NoteOn | NoteOff | ControlChange
TransportEvent = Start | Continue | Stop | SongPosition


class ArrivalStamper:
    """Arrival times in the perf_counter domain from rtmidi's delta times.

    A reader sees a message when it next polls rtmidi's queue and holds the interpreter lock,
    which can be milliseconds after the message arrived while another thread computes. rtmidi
    measures the time between messages on its own thread (from the driver's clock), so the sum
    of the deltas is the arrival time on the driver's clock, up to one constant offset. That
    offset is the smallest (read time - delta sum) seen so far: the least delayed read. It may
    creep up by `drift` seconds per second so a driver clock slower than perf_counter cannot
    pull the stamps early for ever; a stamp is never later than its read time.
    """

    def __init__(self, drift: float = 1e-4, resync_s: float = 1.0):
        self._drift = drift
        self._resync_s = resync_s
        self._driver_time: float | None = None
        self._offset = 0.0

    def stamp(self, delta: float, now: float) -> float:
        """The arrival time of a message with rtmidi delta `delta`, read at perf_counter `now`."""
        if self._driver_time is None or not 0.0 <= delta < 3600.0:
            self._driver_time, self._offset = 0.0, now
            return now
        self._driver_time += delta
        candidate = now - self._driver_time
        relaxed = self._offset + self._drift * delta
        if candidate - relaxed > self._resync_s:
            # Far behind the read times: the delta chain lost time (driver restart). Resync.
            self._driver_time, self._offset = 0.0, now
            return now
        self._offset = min(candidate, relaxed)
        return self._offset + self._driver_time


def validate(data: Sequence[int]) -> MidiBytes:
    """Check that `data` is exactly one complete, well-formed MIDI message; return it as a tuple.

    Raises InvalidMidiMessage for an empty message, a missing status byte, an undefined status,
    a wrong length for the status, a data byte >= 0x80, or an unterminated system exclusive.
    """
    msg = tuple(data)
    if not msg:
        raise InvalidMidiMessage(msg, "empty")
    if not all(isinstance(b, int) and 0 <= b <= 0xFF for b in msg):
        raise InvalidMidiMessage(msg, "bytes must be integers 0-255")
    status = msg[0]
    if status < 0x80:
        raise InvalidMidiMessage(msg, "starts with a data byte (no status)")
    if status == SYSEX_START:
        if len(msg) < 2 or msg[-1] != SYSEX_END:
            raise InvalidMidiMessage(msg, "system exclusive without its F7 end byte")
        body = msg[1:-1]
    else:
        expected = _CHANNEL_LENGTH.get(status & 0xF0) if status < 0xF0 else _SYSTEM_LENGTH.get(status)
        if expected is None:
            raise InvalidMidiMessage(msg, f"undefined status byte {status:02X}")
        if len(msg) != expected:
            raise InvalidMidiMessage(msg, f"status {status:02X} takes {expected} bytes, got {len(msg)}")
        body = msg[1:]
    if any(b >= 0x80 for b in body):
        raise InvalidMidiMessage(msg, "data byte >= 0x80")
    return msg


def decode(data: Sequence[int], time: float) -> MidiEvent | None:
    """Turn one rtmidi message into an event stamped with its arrival `time` (perf_counter s).

    Returns None for well-formed messages the daemon does not use (program change, pitch bend,
    aftertouch, system exclusive, active sensing, ...). Raises InvalidMidiMessage for bytes that
    are not one complete MIDI message.
    """
    msg = validate(data)
    status = msg[0]
    if status < 0xF0:
        kind, channel = status & 0xF0, status & 0x0F
        if kind == NOTE_ON:
            if msg[2] == 0:
                return NoteOff(channel, msg[1], _NOTE_ON_ZERO_RELEASE_VELOCITY, time)
            return NoteOn(channel, msg[1], msg[2], time)
        if kind == NOTE_OFF:
            return NoteOff(channel, msg[1], msg[2], time)
        if kind == CONTROL_CHANGE:
            return ControlChange(channel, msg[1], msg[2], time)
        return None
    if status == TIMING_CLOCK:
        return ClockTick(time)
    if status == START:
        return Start(time)
    if status == CONTINUE:
        return Continue(time)
    if status == STOP:
        return Stop(time)
    if status == SONG_POSITION:
        return SongPosition(msg[1] | (msg[2] << 7), time)
    return None


def channel_of(msg: Sequence[int]) -> int | None:
    """The channel (0-15) of a channel voice message, None for system messages."""
    status = msg[0]
    return status & 0x0F if 0x80 <= status < 0xF0 else None


def _check_channel(channel: int) -> None:
    if not 0 <= channel <= 15:
        raise ValueError(f"MIDI channel {channel} out of range 0-15")


def _check_data(name: str, value: int) -> None:
    if not 0 <= value <= 127:
        raise ValueError(f"MIDI {name} {value} out of range 0-127")


def note_on(channel: int, note: int, velocity: int) -> MidiBytes:
    """Bytes of a Note On; channel 0-15, note and velocity 0-127."""
    _check_channel(channel)
    _check_data("note", note)
    _check_data("velocity", velocity)
    return (NOTE_ON | channel, note, velocity)


def note_off(channel: int, note: int, velocity: int = 0) -> MidiBytes:
    """Bytes of a Note Off (status 0x80, never the Note-On-velocity-0 shorthand)."""
    _check_channel(channel)
    _check_data("note", note)
    _check_data("velocity", velocity)
    return (NOTE_OFF | channel, note, velocity)


def control_change(channel: int, control: int, value: int) -> MidiBytes:
    """Bytes of a Control Change; channel 0-15, control and value 0-127."""
    _check_channel(channel)
    _check_data("control", control)
    _check_data("value", value)
    return (CONTROL_CHANGE | channel, control, value)


def all_notes_off(channel: int) -> MidiBytes:
    """Bytes of All Notes Off (CC 123) on `channel`."""
    return control_change(channel, ALL_NOTES_OFF, 0)
