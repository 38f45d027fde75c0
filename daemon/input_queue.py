"""The bounded queue that carries MIDI input from the reader thread to the event loop.

`MidiPorts`' reader thread pushes every decoded event; the consumer on the event loop takes
them in order. The queue holds at most `size` events. When it is full the OLDEST event is
dropped to make room: a consumer that fell that far behind is late anyway, and keeping the
newest events keeps the clock and the current bar right.

A release is never lost that way. A dropped Note Off or sustain-pedal-up is kept aside, one per
key and channel (so at most 16 x 129), and owed to the consumer:
- before the next Note On of its key, so that a key never goes down twice in a row;
- once the queue is empty, the owed ones in the order they were dropped.
Without this a flood could leave a key held down in the daemon's view for ever.

A driver error (`fail`) ends the stream after the events that came before it.

    queue = InputQueue(1024)
    dropped = queue.push(event)      # reader thread; True when the oldest event made room
    event, failure = queue.take()    # consumer: (next event or None, the error or None)
"""

from __future__ import annotations

import collections
import threading

from daemon.errors import MidiError
from daemon.midi_events import ControlChange, MidiEvent, NoteOff, NoteOn

PEDAL_KEY = -1  # the sustain pedal's place among a channel's keys in the owed releases


def release_key(event: MidiEvent) -> tuple[int, int] | None:
    """(channel, note) of a Note Off, (channel, PEDAL_KEY) of a sustain pedal release, else None."""
    if isinstance(event, NoteOff):
        return (event.channel, event.note)
    if isinstance(event, ControlChange) and event.is_sustain and not event.pedal_down:
        return (event.channel, PEDAL_KEY)
    return None


class InputQueue:
    """At most `size` MIDI events, oldest dropped first, releases owed (module docstring).

    Thread-safe: one lock guards the events, the owed releases and the failure, so `take`
    sees them as one state (an error never overtakes the events pushed before it)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"an input queue holds at least one event, not {size}")
        self.size = size
        self._events: collections.deque[MidiEvent] = collections.deque()
        self._owed: dict[tuple[int, int], MidiEvent] = {}  # in the order they were dropped
        self._failure: MidiError | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._events) + len(self._owed)

    def push(self, event: MidiEvent) -> bool:
        """Queue `event`; True when the oldest event was dropped to make room for it."""
        with self._lock:
            dropped = len(self._events) >= self.size
            if dropped:
                oldest = self._events.popleft()
                key = release_key(oldest)
                if key is not None:
                    self._owed.pop(key, None)  # re-inserted last: the owed ones stay in time order
                    self._owed[key] = oldest
            self._events.append(event)
        return dropped

    def fail(self, error: MidiError) -> None:
        """End the stream with `error` after the events already queued; the first error stays."""
        with self._lock:
            if self._failure is None:
                self._failure = error

    def take(self) -> tuple[MidiEvent | None, MidiError | None]:
        """(the next event or None when there is none, the failure or None). An owed release
        goes before a Note On of its key, and the remaining ones once no event is left."""
        with self._lock:
            return self._next(), self._failure

    def _next(self) -> MidiEvent | None:
        if self._events:
            event = self._events[0]
            if isinstance(event, NoteOn) and self._owed:
                owed = self._owed.pop((event.channel, event.note), None)
                if owed is not None:
                    return owed
            return self._events.popleft()
        if self._owed:
            return self._owed.pop(next(iter(self._owed)))
        return None


__all__ = ["PEDAL_KEY", "InputQueue", "release_key"]
