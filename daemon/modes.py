"""When the daemon plays: the mode logic as a pure state machine over beats.

No clock, no I/O, no threads. The daemon tells it what the player does (`note_on`,
`note_off`, with the beat each happened at) and that time passes (`advance(beat)`, every few
milliseconds); it answers with decisions:

- `AnswerAt(answer)`: start generating now; the answer plays from the bar line at
  `answer.start_beat` for `answer.bars` bars. Decided `lead_beats` before that bar line, so
  the first notes are ready when it comes.
- `Discard(answer)`: a decided answer whose bar line has not come yet is dropped (the
  player played again before it).
- `TakeOver(answer)`: the player plays over a sounding answer, or the mode went `off`: stop
  it now (generation, pending output, note-offs).

Modes:

- `call_response`: after the player has played something, answer at the first bar line at
  which the player has been silent (no key down, no note event) for `silence_beats`.
  One answer per phrase: the daemon does not answer its own silence.
- `autopilot`: like call_response, but it needs no phrase and chains answers bar after bar
  (each one starts where the previous one ends) until the player plays.
- `manual`: only `trigger()` starts an answer (at the next reachable bar line, or after the
  answers already decided).
- `off`: never plays; switching to it stops everything.

In every mode a note from the player over an answer takes over. Bar lines come from a
`BarLines` object (the daemon's clock satisfies it; `RegularBars` is a fixed meter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from daemon.controls import MODES

# Beats within this of a bar line count as on it (float error of time <-> beat conversions).
_EPSILON = 1e-6


class BarLines(Protocol):
    """Bar arithmetic over beats (the daemon passes its clock)."""

    def bar_index(self, beat: float) -> int:
        """Index of the bar containing `beat` (a beat on a bar line belongs to the bar it starts)."""

    def bar_start_beat(self, bar: int) -> float:
        """Beat at which bar `bar` starts."""


@dataclass(frozen=True)
class RegularBars:
    """Bar lines every `beats_per_bar` beats, bar 0 at `origin`."""

    beats_per_bar: float = 4.0
    origin: float = 0.0

    def __post_init__(self) -> None:
        if not self.beats_per_bar > 0:
            raise ValueError(f"beats_per_bar must be positive, got {self.beats_per_bar}")

    def bar_index(self, beat: float) -> int:
        return math.floor((beat - self.origin) / self.beats_per_bar + _EPSILON)

    def bar_start_beat(self, bar: int) -> float:
        return self.origin + bar * self.beats_per_bar


@dataclass(frozen=True)
class Answer:
    """One decided answer: bars [bar, bar + bars), i.e. beats [start_beat, end_beat)."""

    id: int
    bar: int
    bars: int
    start_beat: float
    end_beat: float
    reason: str  # "silence", "autopilot" or "trigger"


@dataclass(frozen=True)
class AnswerAt:
    """Start generating `answer` now; it plays from `answer.start_beat`."""

    answer: Answer


@dataclass(frozen=True)
class Discard:
    """Drop `answer` before its bar line came (nothing of it has sounded yet)."""

    answer: Answer
    beat: float


@dataclass(frozen=True)
class TakeOver:
    """Stop the sounding `answer` now, at `beat`."""

    answer: Answer
    beat: float


Decision = AnswerAt | Discard | TakeOver


class ModeMachine:
    """Decides when answers start and stop, from player activity and the passing of beats.

    bars: where the bar lines are.
    mode: one of `daemon.controls.MODES`.
    silence_beats: how long the player must be silent before call_response/autopilot answer.
    length_bars: bars per answer (read when an answer is decided).
    lead_beats: an answer is decided this long before its bar line (time to generate).
    min_lead_beats: a bar line closer than this is not used; the next one is.

    The tunables are plain attributes; the daemon updates `lead_beats` and `min_lead_beats`
    when the tempo changes (they stand for fixed times).
    """

    def __init__(
        self,
        bars: BarLines,
        *,
        mode: str = "call_response",
        silence_beats: float = 2.0,
        length_bars: int = 2,
        lead_beats: float = 0.5,
        min_lead_beats: float = 0.125,
    ):
        self.bars = bars
        self._mode = _check_mode(mode)
        self.silence_beats = silence_beats
        self.length_bars = length_bars
        self.lead_beats = lead_beats
        self.min_lead_beats = min_lead_beats
        self._held: set[int] = set()
        self._last_activity: float | None = None
        self._phrase = False  # the player played since the last answer was decided
        self._answers: list[Answer] = []  # decided and not yet over, in start order
        self._next_id = 1

    # -- state ----------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def answers(self) -> tuple[Answer, ...]:
        """Decided answers that are not over yet (pending or sounding), in start order."""
        return tuple(self._answers)

    @property
    def held(self) -> frozenset[int]:
        """Keys the player holds down."""
        return frozenset(self._held)

    @property
    def last_activity_beat(self) -> float | None:
        """Beat of the player's latest note event (None before the first)."""
        return self._last_activity

    def silence_threshold(self) -> float | None:
        """Beat from which the player counts as silent (None while a key is down or before
        any playing)."""
        if self._held or self._last_activity is None:
            return None
        return self._last_activity + self.silence_beats

    # -- inputs ---------------------------------------------------------------------------------

    def note_on(self, pitch: int, beat: float) -> list[Decision]:
        """The player pressed a key: any answer not over yet is discarded or taken over."""
        self._held.add(pitch)
        self._touch(beat)
        self._phrase = True
        return self._stop_answers(beat)

    def note_off(self, pitch: int, beat: float) -> list[Decision]:
        """The player released a key (the silence starts counting when the last one is up)."""
        self._held.discard(pitch)
        self._touch(beat)
        return []

    def advance(self, beat: float) -> list[Decision]:
        """Time has reached `beat`: forget answers that are over, decide the next one if due."""
        self._answers = [a for a in self._answers if a.end_beat > beat + _EPSILON]
        if self._mode not in ("call_response", "autopilot") or self._held:
            return []
        if self._mode == "call_response":
            if self._answers or not self._phrase:
                return []
            bar, reason = self._first_bar_after_silence(), "silence"
        elif self._answers:
            last = self._answers[-1]
            if last.start_beat > beat + _EPSILON:
                return []  # the next answer is decided already
            bar, reason = last.bar + last.bars, "autopilot"
        else:
            bar, reason = self._first_bar_after_silence(), "autopilot"
        bar = self._reachable(bar, beat)
        if self.bars.bar_start_beat(bar) - beat > self.lead_beats + _EPSILON:
            return []  # not yet: decided lead_beats before the bar line
        return [self._decide(bar, reason)]

    def trigger(self, beat: float) -> list[Decision]:
        """Play an answer now (manual's button; any mode but off): at the next reachable bar
        line, or right after the answers already decided. Off: nothing."""
        self._answers = [a for a in self._answers if a.end_beat > beat + _EPSILON]
        if self._mode == "off":
            return []
        bar = self.bars.bar_index(beat) + 1
        if self._answers:
            bar = max(bar, self._answers[-1].bar + self._answers[-1].bars)
        return [self._decide(self._reachable(bar, beat), "trigger")]

    def set_mode(self, mode: str, beat: float) -> list[Decision]:
        """Change the mode; `off` stops every answer (the decisions say which)."""
        self._mode = _check_mode(mode)
        return self._stop_answers(beat) if self._mode == "off" else []

    def stop_all(self, beat: float) -> list[Decision]:
        """Stop every answer (panic, reset, a failed generation); the player must play again
        before call_response answers."""
        self._phrase = False
        return self._stop_answers(beat)

    def forget_activity(self) -> None:
        """Forget when the player last played (the beats jumped: transport moved, reset);
        keys still held stay held."""
        self._last_activity = None
        self._phrase = False

    def finished(self, answer_id: int) -> None:
        """The daemon ended this answer itself (e.g. its generation failed): forget it."""
        self._answers = [a for a in self._answers if a.id != answer_id]

    # -- internals ------------------------------------------------------------------------------

    def _touch(self, beat: float) -> None:
        if self._last_activity is None or beat > self._last_activity:
            self._last_activity = beat

    def _stop_answers(self, beat: float) -> list[Decision]:
        out: list[Decision] = []
        for answer in self._answers:
            if answer.end_beat <= beat + _EPSILON:
                continue
            if beat < answer.start_beat - _EPSILON:
                out.append(Discard(answer, beat))
            else:
                out.append(TakeOver(answer, beat))
        self._answers.clear()
        return out

    def _first_bar_after_silence(self) -> int:
        """First bar whose line is at or after the silence threshold."""
        threshold = self.silence_threshold()
        if threshold is None:  # nothing played yet (autopilot): any bar line will do
            return -(1 << 40)
        bar = self.bars.bar_index(threshold)
        if self.bars.bar_start_beat(bar) < threshold - _EPSILON:
            bar += 1
        return bar

    def _reachable(self, bar: int, beat: float) -> int:
        """`bar`, or the first later bar whose line is at least min_lead_beats ahead."""
        bar = max(bar, self.bars.bar_index(beat))
        while self.bars.bar_start_beat(bar) - beat < self.min_lead_beats - _EPSILON:
            bar += 1
        return bar

    def _decide(self, bar: int, reason: str) -> AnswerAt:
        start = self.bars.bar_start_beat(bar)
        answer = Answer(
            self._next_id, bar, self.length_bars, start, self.bars.bar_start_beat(bar + self.length_bars), reason
        )
        self._next_id += 1
        self._answers.append(answer)
        self._phrase = False
        return AnswerAt(answer)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: must be one of {', '.join(MODES)}")
    return mode
