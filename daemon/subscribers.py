"""Who watches the daemon: OSC subscribers and the note and status events sent to them.

`/rwkv/subscribe i:<port>` makes the daemon send events to that UDP port of the sender
(`rwkv-music watch` is such a subscriber); `/rwkv/unsubscribe i:<port>` stops them. Everything
here runs on the event loop, never on the output thread: a note reaches this set after the
scheduler sent it (`Daemon._on_played`), and sending is a non-blocking UDP `sendto` from a task
that wakes every FLUSH_INTERVAL_S.

Bounded in every direction:
- at most MAX_SUBSCRIBERS; one more is refused with an error reply;
- a subscription is a lease of LEASE_S seconds: a subscriber renews it by subscribing again
  (the watch view does every 2 s); one that stops answering (crashed, closed, unplugged) is
  forgotten when its lease runs out;
- note events wait in a queue of MAX_PENDING_NOTES between flushes; beyond that the oldest are
  dropped and counted (`dropped`); each flush sends at most NOTES_PER_MESSAGE per datagram.

Messages a subscriber receives (prefix /rwkv):
- `/rwkv/notes` with groups of four arguments: s:who ("player" or "answer"), i:pitch,
  i:velocity (0 = released), f:beat (the daemon's clock beat at which it sounded);
- `/rwkv/status` with the same key/value pairs as the status reply, every STATUS_INTERVAL_S.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.controls import ControlError

log = logging.getLogger(__name__)

MAX_SUBSCRIBERS = 8
LEASE_S = 10.0
MAX_PENDING_NOTES = 1024
NOTES_PER_MESSAGE = 64
FLUSH_INTERVAL_S = 0.05
STATUS_INTERVAL_S = 0.25

Address = tuple[str, int]
Send = Callable[[str, Sequence[Any], Address], None]


@dataclass(frozen=True, slots=True)
class NoteEvent:
    """A note heard (the player's) or played (an answer's), at a clock beat; velocity 0 = off."""

    who: str
    pitch: int
    velocity: int
    beat: float


@dataclass
class SubscriberStats:
    subscribed: int = 0  # subscriptions made (renewals not counted)
    expired: int = 0  # forgotten because their lease ran out
    dropped: int = 0  # note events dropped because too many waited
    sent: int = 0  # datagrams sent


class SubscriberSet:
    """The subscribers and the events waiting for them; `send(address, args, (host, port))`
    puts one OSC message on the wire (the OSC server's socket) and must not block."""

    def __init__(self, send: Send, prefix: str, *, clock: Callable[[], float] = time.monotonic):
        self._send = send
        self._prefix = prefix
        self._clock = clock
        self._leases: dict[Address, float] = {}  # address -> when its lease ends
        self._notes: collections.deque[NoteEvent] = collections.deque()
        self._last_status = -STATUS_INTERVAL_S
        self.stats = SubscriberStats()

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def addresses(self) -> list[Address]:
        return list(self._leases)

    def subscribe(self, host: str, port: int) -> None:
        """Start or renew a lease; ControlError when MAX_SUBSCRIBERS others hold one."""
        address = (host, port)
        self._expire()
        if address not in self._leases:
            if len(self._leases) >= MAX_SUBSCRIBERS:
                raise ControlError(f"too many subscribers (at most {MAX_SUBSCRIBERS})")
            self.stats.subscribed += 1
            log.info("subscriber %s:%d added", host, port)
            self._last_status = -STATUS_INTERVAL_S  # a new subscriber gets the status at once
        self._leases[address] = self._clock() + LEASE_S

    def unsubscribe(self, host: str, port: int) -> bool:
        """End a lease; False when there was none."""
        if self._leases.pop((host, port), None) is None:
            return False
        log.info("subscriber %s:%d removed", host, port)
        return True

    def note(self, who: str, pitch: int, velocity: int, beat: float) -> None:
        """Queue a note event for the next flush (nothing when nobody listens)."""
        if not self._leases:
            return
        if len(self._notes) >= MAX_PENDING_NOTES:
            self._notes.popleft()
            self.stats.dropped += 1
        self._notes.append(NoteEvent(who, pitch, velocity, round(beat, 4)))

    def status_due(self) -> bool:
        """Whether the next flush should carry the status."""
        return bool(self._leases) and self._clock() - self._last_status >= STATUS_INTERVAL_S

    def flush(self, status_args: Sequence[Any] | None = None) -> None:
        """Send the waiting notes (and `status_args`, a status reply's arguments) to everyone."""
        self._expire()
        if not self._leases:
            self._notes.clear()
            return
        messages: list[tuple[str, list[Any]]] = []
        while self._notes:
            args: list[Any] = []
            for _ in range(min(NOTES_PER_MESSAGE, len(self._notes))):
                event = self._notes.popleft()
                args += [event.who, event.pitch, event.velocity, event.beat]
            messages.append((f"{self._prefix}/notes", args))
        if status_args is not None:
            self._last_status = self._clock()
            messages.append((f"{self._prefix}/status", list(status_args)))
        for address in list(self._leases):
            for path, args in messages:
                self._send(path, args, address)
                self.stats.sent += 1

    def _expire(self) -> None:
        now = self._clock()
        for address, until in list(self._leases.items()):
            if until < now:
                del self._leases[address]
                self.stats.expired += 1
                log.info("subscriber %s:%d forgotten (it stopped renewing)", *address)

    def describe(self) -> Mapping[str, int]:
        return {"subscribers": len(self._leases), "subscriber_notes_dropped": self.stats.dropped}
