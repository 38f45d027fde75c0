"""The answers' lives: from the mode machine's decision to the last bar.

`AnswerPlayer` takes the mode machine's decisions. For "answer at bar N" it starts the
generation in the engine thread, places each note as it is drawn (through `AnswerOutput`),
and, when the generation ends, records what the answer did and reports it. For "take over" and
"discard" it stops the generation and takes back what it placed: everything silenced when
something of ours sounds, the pending messages cancelled when not.

It runs on the event loop, except `_generate` and `_on_generated`, which run in the engine
thread; `LiveAnswer.stop` and AnswerOutput's lock order the two sides.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from daemon import midi_events
from daemon.answer_output import AnswerOutput, LiveAnswer
from daemon.clock import Clock
from daemon.controls import Controls
from daemon.engine_process import EngineProcess
from daemon.engine_thread import EngineThread
from daemon.errors import ClockError
from daemon.modes import Answer, AnswerAt, Decision, ModeMachine, TakeOver
from daemon.status import DaemonStats
from model.remi_grammar import DecodedNote, DecodedPedal
from model.sampling import SamplingSettings

log = logging.getLogger(__name__)

RECENT_ANSWERS = 256


@dataclass(frozen=True)
class AnswerRecord:
    """What one finished answer did (the last RECENT_ANSWERS are kept, for benchmarks)."""

    id: int
    bar: int
    bars: int
    notes: int
    dropped: int
    stopped: bool
    ready_before_bar_ms: float | None  # bar line minus the time its first note was scheduled
    generation_ms: float
    scheduled: tuple[tuple[float, midi_events.MidiBytes], ...] = ()  # (perf_counter due time, message)
    start_time: float = 0.0  # perf_counter time of its first bar line, as the clock said when decided


class AnswerPlayer:
    """Plays the answers `machine` decides, with `engine`, on `output`.

    Without `has_output` (no output port is configured) an answer is not started and
    `no_output()` is called. `controls()` gives the sampling controls at the moment an answer
    starts; `publish(event, **fields)` reports events (MQTT); `model_id()` names the model that
    plays.
    """

    def __init__(self, machine: ModeMachine, clock: Clock, engine: EngineProcess, output: AnswerOutput,
                 stats: DaemonStats, engine_thread: EngineThread, *, has_output: bool,
                 controls: Callable[[], Controls], publish: Callable[..., None], model_id: Callable[[], str],
                 no_output: Callable[[], None]):
        self.machine = machine
        self.clock = clock
        self.engine = engine
        self.output = output
        self.has_output = has_output
        self.stats = stats
        self._engine_thread = engine_thread
        self._controls = controls
        self._publish = publish
        self._model_id = model_id
        self._no_output = no_output
        self.live: dict[int, LiveAnswer] = {}
        self.recent: collections.deque[AnswerRecord] = collections.deque(maxlen=RECENT_ANSWERS)

    # ------------------------------------------------------------------------------ the loop

    def apply(self, decisions: Iterable[Decision]) -> None:
        """Start the answers the decisions start, stop the ones they stop."""
        stops: list[Decision] = []
        for decision in decisions:
            if isinstance(decision, AnswerAt):
                self._start(decision.answer)
            else:
                stops.append(decision)
        if stops:
            self.end(stops)

    def end(self, decisions: Iterable[Decision], *, output: bool = True, reason: str = "") -> None:
        """Stop the answers the decisions name. With `output`: a TakeOver (something of ours
        sounds) silences the output now; Discards alone drop what those answers scheduled.
        `reason` (panic, reset, shutdown...) is logged instead of counting takeovers/discards."""
        taken_over = False
        for decision in decisions:
            if isinstance(decision, AnswerAt):
                continue
            live = self.live.pop(decision.answer.id, None)
            if live is not None:
                live.stop.set()
            taken_over |= isinstance(decision, TakeOver)
            if reason:
                log.info("answer %d stopped: %s", decision.answer.id, reason)
            elif isinstance(decision, TakeOver):
                self.stats.takeovers += 1
                log.info("answer %d taken over at beat %.2f", decision.answer.id, decision.beat)
            else:
                self.stats.discarded += 1
                log.info("answer %d discarded before its bar line", decision.answer.id)
        if not output:
            return
        if taken_over:
            self.output.silence()
        else:
            self.output.cancel_pending()

    def stop_generating(self) -> None:
        """Shutdown: every generation still running stops at its next token."""
        for live in self.live.values():
            live.stop.set()

    def forget_finished(self) -> None:
        """Drop the answers whose last bar is over and whose generation has ended."""
        now = time.perf_counter()
        for key, live in list(self.live.items()):
            if live.end_time < now and (live.future is None or live.future.done()):
                del self.live[key]

    def _start(self, answer: Answer) -> None:
        if not self.has_output:
            self.machine.finished(answer.id)
            self._no_output()
            return
        try:
            start, end = self.clock.time_at(answer.start_beat), self.clock.time_at(answer.end_beat)
        except ClockError as err:
            log.warning("answer %d not played: %s", answer.id, err)
            self.machine.finished(answer.id)
            return
        live = LiveAnswer(answer, start, end, threading.Event())
        self.live[answer.id] = live
        self.stats.answers += 1
        c = self._controls()
        settings = SamplingSettings(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        live.future = self._engine_thread.submit(self._generate, "generate", live, settings, c.seed)
        live.future.add_done_callback(self._engine_thread.on_loop(functools.partial(self._done, live)))
        log.info("answer %d: %d bar(s) from bar %d (%s), %.0f ms ahead",
                 answer.id, answer.bars, answer.bar, answer.reason, (start - time.perf_counter()) * 1000)

    def _done(self, live: LiveAnswer, future: Future) -> None:
        """The generation of `live` ended (complete, stopped or failed)."""
        try:
            completion = future.result()
        except Exception as err:  # noqa: BLE001 - a failed answer must not stop the daemon
            self.stats.failed += 1
            log.error("answer %d failed: %s", live.answer.id, err, exc_info=err)
            self.machine.finished(live.answer.id)
            self.end([TakeOver(live.answer, self.clock.now_beat())], reason="generation failed")
            self._publish("error", reason=f"generation failed: {err}")
            return
        if completion is None:
            return
        self.stats.generation_ms = round(completion.seconds * 1000.0, 3)
        ready = None if live.first_note_at is None else round((live.start_time - live.first_note_at) * 1000.0, 3)
        self.recent.append(AnswerRecord(
            live.answer.id, live.answer.bar, live.answer.bars, live.notes, live.dropped, completion.stopped,
            ready, self.stats.generation_ms, tuple(live.scheduled), live.start_time,
        ))
        if live.pedal_down:
            self.output.release_pedal(live)
        log.info("answer %d: %d notes (%d too late), %.0f ms to generate%s", live.answer.id, live.notes,
                 live.dropped, completion.seconds * 1000, ", stopped" if completion.stopped else "")
        self._publish(
            "completion_played", answer=live.answer.id, bar=live.answer.bar, bars=live.answer.bars,
            notes=live.notes, dropped=live.dropped, stopped=completion.stopped, model_id=self._model_id(),
            seconds=round(completion.seconds, 4),
        )

    # ------------------------------------------------------------------------------ the engine thread

    def _generate(self, live: LiveAnswer, settings: SamplingSettings, seed: int) -> Any:
        if live.stop.is_set():
            return None
        return self.engine.generate(
            live.answer.bars,
            settings,
            seed=seed,
            on_event=functools.partial(self._on_generated, live),
            should_stop=live.stop.is_set,
        )

    def _on_generated(self, live: LiveAnswer, variation: int, event: Any) -> None:
        """Schedule a decoded note (or pedal move) as soon as it exists."""
        output = self.output
        if variation != 0 or live.stop.is_set():
            return
        if isinstance(event, DecodedPedal):
            output.place_pedal(live, event)
            return
        if not isinstance(event, DecodedNote):
            return
        placed = output.place_note(live, event)
        if placed == "late":
            live.dropped += 1
            self.stats.late_dropped += 1
        elif placed == "scheduled":
            live.notes += 1
            self.stats.notes_scheduled += 1
            if live.first_note_at is None:
                now = time.perf_counter()
                live.first_note_at = now
                self.stats.ready_before_bar_ms = round((live.start_time - now) * 1000.0, 3)
