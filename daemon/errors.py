"""Errors of the daemon package: one base, subclasses that carry what went wrong."""

from __future__ import annotations


class DaemonError(Exception):
    """Base of every error the daemon package raises on purpose."""


class MidiError(DaemonError):
    """Something about MIDI input or output failed."""


class MidiApiError(MidiError):
    """A MIDI API cannot be used: not compiled into python-rtmidi, or its driver is not running.

    `api` is the configured name (alsa, jack, ...); `reason` says what failed and how to fix it.
    """

    def __init__(self, api: str, reason: str):
        super().__init__(f"MIDI API {api!r}: {reason}")
        self.api = api
        self.reason = reason


class MidiPortError(MidiError):
    """A MIDI port could not be opened, or the driver reported an error while it was open."""

    def __init__(self, port: str, reason: str):
        super().__init__(f"MIDI port {port!r}: {reason}")
        self.port = port
        self.reason = reason


class PortNotFoundError(MidiPortError):
    """No existing port matches the name given in `connect_in`/`connect_out`; `available` lists them."""

    def __init__(self, port: str, direction: str, available: list[str]):
        shown = ", ".join(repr(p) for p in available) or "none"
        super().__init__(port, f"no {direction} port with this name; available: {shown}")
        self.direction = direction
        self.available = list(available)


class MidiPortClosedError(MidiError):
    """Events were requested from MIDI ports that are not open (never opened, or closed)."""


class InvalidMidiMessage(MidiError):
    """Bytes that are not one complete MIDI message (truncated, stray data byte, bad length)."""

    def __init__(self, data: tuple[int, ...], reason: str):
        shown = " ".join(f"{b:02X}" if isinstance(b, int) and 0 <= b <= 255 else repr(b) for b in data)
        super().__init__(f"invalid MIDI message [{shown}]: {reason}")
        self.data = data
        self.reason = reason


class SchedulerStoppedError(DaemonError):
    """A message was scheduled on an output scheduler that is not running."""


class ClockError(DaemonError):
    """A clock cannot answer or cannot do what was asked (e.g. set the tempo of an external clock)."""


class ClockNotRunningError(ClockError):
    """The external clock is stopped (or has not started), so beats have no future times yet."""


class LinkUnavailableError(ClockError):
    """Ableton Link was asked for but the optional `aalink` package cannot be imported."""

    def __init__(self, reason: str):
        super().__init__(
            f"clock source 'link' needs the aalink package ({reason}); "
            "install it with: pip install 'rwkv-music[link]'"
        )
        self.reason = reason
