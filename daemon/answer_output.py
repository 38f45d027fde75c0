"""An answer's notes on their way out: decoded notes and pedal moves placed on the output
scheduler at their times, and the two ways to take them back.

The engine thread places each note as soon as it is drawn (`place_note`, `place_pedal`); the
event loop stops answers (`cancel_pending`, `silence`) and closes a pedal an answer left down
(`release_pedal`). One lock orders the two: an answer whose `stop` is set places nothing more,
and a cancel never runs between a note's note-on and its note-off being scheduled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from daemon import midi_events
from daemon.clock import Clock
from daemon.errors import ClockError, SchedulerStoppedError
from daemon.modes import Answer
from daemon.output_latency import OutputLatency
from daemon.scheduler import OutputScheduler
from model.remi_grammar import DecodedNote, DecodedPedal


@dataclass(eq=False)
class LiveAnswer:
    """An answer from its decision until its last bar is over."""

    answer: Answer
    start_time: float  # perf_counter of its first bar line
    end_time: float
    stop: threading.Event
    future: Future | None = None
    notes: int = 0
    dropped: int = 0
    pedal_down: bool = False
    first_note_at: float | None = None
    scheduled: list[tuple[float, midi_events.MidiBytes]] = dataclasses.field(default_factory=list)


# What place_note did: scheduled the note, dropped it as too late, or nothing (past the
# answer's end, the clock cannot place it, the answer or the scheduler stopped).
Placement = Literal["scheduled", "late", "skipped"]


class AnswerOutput:
    """Places answers' notes on `scheduler` on MIDI channel `channel` (0-15), `latency` early
    so that they sound on time; a note already `late_s` late is dropped, never played late."""

    def __init__(self, scheduler: OutputScheduler, clock: Clock, channel: int, latency: OutputLatency,
                 late_s: float):
        self.scheduler = scheduler
        self.clock = clock
        self.channel = channel
        self.latency = latency
        self.late_s = late_s
        self._lock = threading.Lock()
        self._note_ends: dict[int, float] = {}  # pitch -> when our latest note of it ends

    def place_note(self, live: LiveAnswer, note: DecodedNote) -> Placement:
        """Engine thread: schedule `note` of `live` (its beats count from the answer's start)."""
        answer = live.answer
        start_beat = answer.start_beat + note.start_beats
        if start_beat >= answer.end_beat:
            return "skipped"
        # An answer lasts its bars: a note still sounding at the end is released there.
        end_beat = min(start_beat + note.duration_beats, answer.end_beat)
        try:
            on = self.clock.time_at(start_beat) - self.latency.seconds(note.velocity)
            off = self.clock.time_at(end_beat) - self.latency.seconds()
        except ClockError:
            return "skipped"
        if on < time.perf_counter() - self.late_s:
            return "late"
        ch, pitch = self.channel, note.pitch
        with self._lock:
            if live.stop.is_set():
                return "skipped"
            messages: list[tuple[float, midi_events.MidiBytes]] = []
            previous_end = self._note_ends.get(pitch)
            if previous_end is not None and previous_end > on:
                # The pitch still sounds: end it before striking it again, and end the new
                # note no later than the old one's pending note-off (which would cut it).
                messages.append((on, midi_events.note_off(ch, pitch)))
                off = min(off, previous_end)
                self._note_ends[pitch] = previous_end
            else:
                self._note_ends[pitch] = off
            messages.append((on, midi_events.note_on(ch, pitch, max(1, min(127, note.velocity)))))
            messages.append((off, midi_events.note_off(ch, pitch)))
            try:
                self.scheduler.schedule_many(messages)
            except SchedulerStoppedError:
                return "skipped"
            live.scheduled += messages
        return "scheduled"

    def place_pedal(self, live: LiveAnswer, pedal: DecodedPedal) -> None:
        """Engine thread: schedule a sustain pedal move of `live`."""
        beat = live.answer.start_beat + pedal.beats
        if beat >= live.answer.end_beat:
            return
        try:
            at = self.clock.time_at(beat) - self.latency.seconds()
        except ClockError:
            return
        message = midi_events.control_change(self.channel, midi_events.SUSTAIN_PEDAL, 127 if pedal.down else 0)
        with self._lock:
            if live.stop.is_set():
                return
            try:
                self.scheduler.schedule(at, message)
            except SchedulerStoppedError:
                return
            live.scheduled.append((at, message))
            live.pedal_down = pedal.down

    def release_pedal(self, live: LiveAnswer) -> None:
        """Loop: `live` ended with the pedal down; lift it at the answer's end."""
        pedal_up = midi_events.control_change(self.channel, midi_events.SUSTAIN_PEDAL, 0)
        # A scheduler that stopped (shutting down) has silenced everything already.
        with self._lock, contextlib.suppress(SchedulerStoppedError):
            if not live.stop.is_set():
                self.scheduler.schedule(live.end_time - self.latency.seconds(), pedal_up)

    def cancel_pending(self) -> None:
        """Drop every pending message except the note-offs of notes that sound."""
        if not self.scheduler.running:
            return
        with self._lock:
            self.scheduler.cancel_after(time.perf_counter())
            sounding = {note for channel, note in self.scheduler.sounding_notes if channel == self.channel}
            self._note_ends = {p: end for p, end in self._note_ends.items() if p in sounding}

    def silence(self, extra_channels: Iterable[int] = ()) -> None:
        """Cancel all pending output and send note-offs (+ All Notes Off) now."""
        if not self.scheduler.running:
            return
        with self._lock:
            self.scheduler.stop_all(extra_channels)
            self._note_ends.clear()
