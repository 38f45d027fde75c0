"""What the model hears: both parts of the conversation, encoded and fed to the engine in order.

The player's notes and pedal (stamped when they arrived), the answers' notes as the output
actually sent them, and tempo changes all reach `ConversationFeed` as events at clock beats. It
keeps one `OnlineEncoder` whose time 0 is a bar line (`origin`), advances it as time passes so
that tokens become final, and hands the final ids to the engine thread in the order they were
made. So the model's state holds the conversation as it sounded, not as it was planned.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from daemon import encoder as enc
from daemon.clock import Clock
from daemon.status import DaemonStats

log = logging.getLogger(__name__)

# The encoder runs this far behind now: an event is stamped at arrival but reaches the loop
# a little later (reader thread poll, hand-over), and must not land behind the watermark.
ENCODER_LAG_S = 0.015


class ConversationFeed:
    """One encoder for the conversation, from the event loop's side.

    `feed_engine(ids)` hands final token ids to the engine (the daemon queues them on its
    engine thread, after everything queued before). `clock` gives the tempo and meter a new
    encoder starts with; `stats` counts the ids fed and the events the encoder refused.
    """

    def __init__(self, tokenizer: Any, clock: Clock, stats: DaemonStats,
                 feed_engine: Callable[[list[int]], None]):
        self._tokenizer = tokenizer
        self._clock = clock
        self._stats = stats
        self._feed_engine = feed_engine
        self._stopped = False
        self.origin = 0.0  # clock beat of the encoder's time 0 (a bar line)
        self.encoder = self._new_encoder()

    def restart(self, origin: float, *, flush: bool) -> None:
        """A new encoder whose time 0 is the bar line at clock beat `origin`. With `flush` the
        old one's unfinished tokens go to the engine first (the transport moved, the notes
        before it were real); without, they are forgotten (a reset)."""
        if flush:
            with contextlib.suppress(enc.EncoderError):
                self._feed(self.encoder.flush())
        self.encoder = self._new_encoder()
        self.origin = origin

    def advance(self, beat: float) -> None:
        """Make final everything up to ENCODER_LAG_S before clock beat `beat`, and feed it."""
        target = beat - ENCODER_LAG_S * self._clock.tempo / 60.0 - self.origin
        if target > self.encoder.watermark_beats:
            self._feed(self.encoder.advance(target))

    def hear(self, kind: type, beat: float, **fields: Any) -> None:
        """One performance event (`kind` an encoder event class: NoteOn, NoteOff, SustainPedal,
        TempoChange) at clock beat `beat`; an event the encoder refuses is counted, not fatal."""
        local = beat - self.origin
        if local < 0:
            return  # before the encoder's first bar line (stamped before a reset)
        try:
            ids = self.encoder.feed(kind(beats=local, **fields))
        except enc.EncoderError as err:
            self._stats.encoder_rejected += 1
            log.debug("encoder refused an event: %s", err)
            return
        self._feed(ids)

    def stop(self) -> None:
        """Shutting down: nothing more goes to the engine."""
        self._stopped = True

    def _new_encoder(self) -> enc.OnlineEncoder:
        meter = self._clock.meter
        return enc.OnlineEncoder(self._tokenizer, tempo=self._clock.tempo,
                                 meter=(meter.numerator, meter.denominator))

    def _feed(self, ids: list[int]) -> None:
        if ids and not self._stopped:
            self._stats.tokens_fed += len(ids)
            self._feed_engine(list(ids))
