"""Musical time: beats <-> `time.perf_counter()` seconds, tempo, meter and bar boundaries.

One interface, `Clock`, three sources:

- InternalClock: tempo and meter from config; a tempo change keeps the beat continuous.
- MidiClock: follows 24-ppqn MIDI clock (0xF8) and Start/Continue/Stop/Song Position Pointer
  from the input; the tempo is a repeated-median line through the last `window_ticks` pulse
  arrival times (TempoEstimator), which averages out arrival jitter, ignores bunched pulses,
  and follows a tempo change within one window (24 pulses = one beat by default).
- LinkClock: an Ableton Link session through the optional `aalink` package.

A beat is a quarter note everywhere (MIDI clock, Link and tempo in BPM count quarter notes);
a bar is `Meter.beats_per_bar` of them (6/8 -> 3.0). Bar 0 starts at beat 0. All times are
seconds in the `time.perf_counter()` domain, the domain of the MIDI arrival stamps and of the
OutputScheduler. Listeners registered with `add_listener` receive `TempoChanged` and
`TransportChanged` events on the thread that caused them (the event loop thread, for all three
sources as the daemon drives them).

The arithmetic (Timeline, BarGrid, TempoEstimator) is pure and testable without any I/O.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import statistics
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from daemon.errors import ClockError, ClockNotRunningError, LinkUnavailableError
from daemon.midi_events import (
    CLOCKS_PER_BEAT,
    ClockTick,
    Continue,
    MidiEvent,
    SongPosition,
    Start,
    Stop,
)
from model.settings import ConfigError, check_range

log = logging.getLogger(__name__)

MIN_BPM = 20.0
MAX_BPM = 400.0
# Beats within this of a bar boundary count as on it (float error of time -> beat round trips).
_BEAT_EPSILON = 1e-6
_VALID_DENOMINATORS = (1, 2, 4, 8, 16, 32)


def check_tempo(bpm: float) -> float:
    """Return `bpm` as float, or raise ClockError when it is outside MIN_BPM..MAX_BPM."""
    if not (isinstance(bpm, (int, float)) and MIN_BPM <= bpm <= MAX_BPM):
        raise ClockError(f"tempo {bpm!r} BPM is outside {MIN_BPM:g}-{MAX_BPM:g}")
    return float(bpm)


@dataclass(frozen=True)
class Meter:
    """A time signature; `beats_per_bar` counts quarter notes."""

    numerator: int = 4
    denominator: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.numerator <= 32 or self.denominator not in _VALID_DENOMINATORS:
            raise ValueError(
                f"meter {self.numerator}/{self.denominator}: numerator 1-32, "
                f"denominator one of {', '.join(map(str, _VALID_DENOMINATORS))}"
            )

    @classmethod
    def parse(cls, text: str) -> Meter:
        """'3/4' -> Meter(3, 4). Raises ValueError for anything else."""
        num, sep, den = text.strip().partition("/")
        if not sep or not num.strip().isdigit() or not den.strip().isdigit():
            raise ValueError(f"meter {text!r}: expected N/D such as 4/4 or 6/8")
        return cls(int(num), int(den))

    @property
    def beats_per_bar(self) -> float:
        return self.numerator * 4.0 / self.denominator

    def __str__(self) -> str:
        return f"{self.numerator}/{self.denominator}"


@dataclass(frozen=True)
class TempoChanged:
    """The tempo became `bpm` at perf_counter `time`, which is beat `beat`."""

    time: float
    beat: float
    bpm: float
    previous_bpm: float


@dataclass(frozen=True)
class TransportChanged:
    """An external transport started (`running`) or stopped, or moved; `beat` is the position."""

    time: float
    running: bool
    beat: float


ClockEvent = TempoChanged | TransportChanged
ClockListener = Callable[[ClockEvent], None]


# -- pure arithmetic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    time: float
    beat: float
    bpm: float


class Timeline:
    """Piecewise-linear map between perf_counter seconds and beats.

    Each tempo change starts a segment at the beat reached at that moment, so the beat is
    continuous; the last `history` segments are kept so that times shortly before a change
    still map with the tempo they had.
    """

    def __init__(self, bpm: float, origin_time: float, origin_beat: float = 0.0, history: int = 64):
        self._segments: list[_Segment] = [_Segment(origin_time, origin_beat, check_tempo(bpm))]
        self._history = history

    @property
    def bpm(self) -> float:
        return self._segments[-1].bpm

    def _segment_for_time(self, t: float) -> _Segment:
        i = bisect.bisect_right(self._segments, t, key=lambda s: s.time) - 1
        return self._segments[max(i, 0)]

    def _segment_for_beat(self, beat: float) -> _Segment:
        i = bisect.bisect_right(self._segments, beat, key=lambda s: s.beat) - 1
        return self._segments[max(i, 0)]

    def beat_at(self, t: float) -> float:
        """Beat at perf_counter time `t` (extrapolated outside the kept segments)."""
        s = self._segment_for_time(t)
        return s.beat + (t - s.time) * s.bpm / 60.0

    def time_at(self, beat: float) -> float:
        """perf_counter time of `beat`."""
        s = self._segment_for_beat(beat)
        return s.time + (beat - s.beat) * 60.0 / s.bpm

    def set_tempo(self, bpm: float, at: float) -> float:
        """Change the tempo from time `at` on (not before the last change); returns the beat there."""
        bpm = check_tempo(bpm)
        last = self._segments[-1]
        if at < last.time:
            raise ClockError(f"tempo change at {at:.6f} is before the previous one at {last.time:.6f}")
        beat = self.beat_at(at)
        if at == last.time:
            self._segments[-1] = _Segment(at, beat, bpm)
        else:
            self._segments.append(_Segment(at, beat, bpm))
        del self._segments[: -self._history]
        return beat


@dataclass(frozen=True)
class _MeterSpan:
    beat: float  # where this meter starts (a bar boundary)
    bar: int  # the index of the bar starting there
    meter: Meter


class BarGrid:
    """Bar arithmetic over beats, with meter changes at bar boundaries. Bar 0 starts at `origin`."""

    def __init__(self, meter: Meter, origin: float = 0.0):
        self._spans = [_MeterSpan(origin, 0, meter)]

    @property
    def meter(self) -> Meter:
        return self._spans[-1].meter

    def _span_for_beat(self, beat: float) -> _MeterSpan:
        i = bisect.bisect_right(self._spans, beat + _BEAT_EPSILON, key=lambda s: s.beat) - 1
        return self._spans[max(i, 0)]

    def _span_for_bar(self, bar: int) -> _MeterSpan:
        i = bisect.bisect_right(self._spans, bar, key=lambda s: s.bar) - 1
        return self._spans[max(i, 0)]

    def bar_index(self, beat: float) -> int:
        """Index of the bar containing `beat` (a beat on a boundary belongs to the bar it starts)."""
        s = self._span_for_beat(beat)
        return s.bar + math.floor((beat - s.beat) / s.meter.beats_per_bar + _BEAT_EPSILON)

    def bar_start(self, bar: int) -> float:
        """Beat at which bar `bar` starts."""
        s = self._span_for_bar(bar)
        return s.beat + (bar - s.bar) * s.meter.beats_per_bar

    def next_bar_beat(self, after: float) -> float:
        """First bar boundary strictly after beat `after`."""
        return self.bar_start(self.bar_index(after) + 1)

    def beat_in_bar(self, beat: float) -> float:
        """Position of `beat` inside its bar, 0 <= x < beats_per_bar."""
        return max(0.0, beat - self.bar_start(self.bar_index(beat)))

    def set_meter(self, meter: Meter, at: float) -> float:
        """Use `meter` from the first bar boundary at or after beat `at`; returns that beat."""
        bar = self.bar_index(at)
        start = self.bar_start(bar)
        if at - start > _BEAT_EPSILON:
            bar, start = bar + 1, self.bar_start(bar + 1)
        self._spans = [s for s in self._spans if s.bar < bar]
        self._spans.append(_MeterSpan(start, bar, meter))
        return start


class TempoEstimator:
    """Tempo from MIDI clock pulse arrival times, robust to late and bunched pulses.

    Over the last `window` pulses (k, t) the pulse period is Siegel's repeated median of the
    pairwise slopes: for each pulse the median of its slopes to all the others, then the median
    of those. The newest pulse's smoothed time is the median of t - period * k, carried to the
    newest k. A least-squares line would be a little more precise with clean input, but a burst
    of pulses delivered together (a stalled machine, a late audio cycle) pulls it far off; the
    repeated median ignores up to half the points and still averages ordinary jitter away. A
    tempo change is followed once half the window holds pulses at the new tempo, fully once all
    of it does (24 pulses = one beat by default).

    A silence longer than `gap_periods` pulse periods and `min_pause_s` (the sender paused)
    restarts the window; shorter gaps are stalls on our side, followed by a burst.
    """

    def __init__(self, window: int = CLOCKS_PER_BEAT, gap_periods: float = 8.0, min_pause_s: float = 0.5):
        if window < 4:
            raise ValueError("the tempo window needs at least 4 pulses")
        self._points: deque[tuple[int, float]] = deque(maxlen=window)
        self._count = 0
        self._gap_periods = gap_periods
        self._min_pause_s = min_pause_s
        self._period: float | None = None
        self._anchor: float | None = None

    def reset(self) -> None:
        """Forget the window (a pause or a transport start); the next pulses start a new one."""
        self._points.clear()
        self._period = None
        self._anchor = None

    def add(self, arrival: float) -> None:
        """Record one pulse that arrived at perf_counter time `arrival`."""
        if self._points:
            expected = self._period if self._period is not None else 60.0 / MIN_BPM / CLOCKS_PER_BEAT
            if arrival - self._points[-1][1] > max(self._gap_periods * expected, self._min_pause_s):
                self.reset()
        self._count += 1
        self._points.append((self._count, arrival))
        self._fit()

    def _fit(self) -> None:
        points = self._points
        n = len(points)
        last_k, last_t = points[-1]
        if n < 4:
            self._anchor = last_t
            return
        period = statistics.median(
            statistics.median((tj - ti) / (kj - ki) for kj, tj in points if kj != ki) for ki, ti in points
        )
        if period <= 0.0:
            return
        self._period = period
        self._anchor = statistics.median(t - period * (k - last_k) for k, t in points)

    @property
    def period(self) -> float | None:
        """Seconds per pulse, None until four pulses have arrived in a row."""
        return self._period

    @property
    def bpm(self) -> float | None:
        return None if self._period is None else 60.0 / (self._period * CLOCKS_PER_BEAT)

    @property
    def last_pulse_time(self) -> float | None:
        """Smoothed arrival time of the newest pulse."""
        return self._anchor


# -- the clocks --------------------------------------------------------------------------------


class Clock(ABC):
    """Beat <-> time, tempo, meter, bars, and change events.

    Clocks are async context managers (`async with make_clock(cfg) as clock:`); only LinkClock
    holds a resource, the others return themselves. `handle(event)` takes MIDI clock and
    transport events; only MidiClock uses them.
    """

    def __init__(self, meter: Meter):
        self._grid = BarGrid(meter)
        self._listeners: list[ClockListener] = []

    async def __aenter__(self) -> Clock:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    # -- what each source defines
    @property
    @abstractmethod
    def tempo(self) -> float:
        """Current tempo in quarter-note beats per minute."""

    @abstractmethod
    def beat_at(self, t: float) -> float:
        """Beat at perf_counter time `t`."""

    @abstractmethod
    def time_at(self, beat: float) -> float:
        """perf_counter time of `beat`. Raises ClockNotRunningError if an external clock is stopped."""

    @abstractmethod
    def set_tempo(self, bpm: float) -> None:
        """Change the tempo now, keeping the beat continuous. Raises ClockError where the tempo is
        not ours to set (MIDI clock) or out of range."""

    @property
    def running(self) -> bool:
        """False while an external transport is stopped; beats then have no times."""
        return True

    def handle(self, event: MidiEvent) -> bool:
        """Take a MIDI clock/transport event; True if it was used (only MidiClock uses them)."""
        return False

    # -- shared arithmetic
    @property
    def meter(self) -> Meter:
        return self._grid.meter

    @property
    def beats_per_bar(self) -> float:
        return self._grid.meter.beats_per_bar

    def set_meter(self, meter: Meter) -> float:
        """Use `meter` from the next bar boundary (or the current one if exactly on it); returns
        the beat where it starts."""
        return self._grid.set_meter(meter, self.now_beat())

    def now_beat(self) -> float:
        return self.beat_at(time.perf_counter())

    def bar_index(self, beat: float) -> int:
        return self._grid.bar_index(beat)

    def bar_start_beat(self, bar: int) -> float:
        return self._grid.bar_start(bar)

    def beat_in_bar(self, beat: float) -> float:
        return self._grid.beat_in_bar(beat)

    def next_bar_beat(self, after_beat: float) -> float:
        """First bar boundary strictly after `after_beat`."""
        return self._grid.next_bar_beat(after_beat)

    def next_bar_time(self, after: float) -> float:
        """perf_counter time of the first bar boundary strictly after time `after`."""
        return self.time_at(self._grid.next_bar_beat(self.beat_at(after)))

    # -- events
    def add_listener(self, listener: ClockListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ClockListener) -> None:
        self._listeners.remove(listener)

    def _emit(self, event: ClockEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("clock listener %r failed on %s", listener, event)


class InternalClock(Clock):
    """A free-running clock: beat 0 at `start_time` (default: now), tempo and meter from config."""

    def __init__(self, tempo: float = 120.0, meter: Meter | None = None, start_time: float | None = None):
        super().__init__(meter or Meter())
        self._timeline = Timeline(tempo, time.perf_counter() if start_time is None else start_time)

    @property
    def tempo(self) -> float:
        return self._timeline.bpm

    def beat_at(self, t: float) -> float:
        return self._timeline.beat_at(t)

    def time_at(self, beat: float) -> float:
        return self._timeline.time_at(beat)

    def set_tempo(self, bpm: float, at: float | None = None) -> None:
        """Change the tempo at time `at` (default now); the beat stays continuous."""
        at = time.perf_counter() if at is None else at
        previous = self._timeline.bpm
        beat = self._timeline.set_tempo(bpm, at)
        if bpm != previous:
            self._emit(TempoChanged(at, beat, float(bpm), previous))


class MidiClock(Clock):
    """Follows MIDI clock from the input: feed it every event with `handle(event)`.

    The first pulse after Start is beat 0; after Continue, the first pulse is at the current
    song position (set by Song Position Pointer while stopped, or where Stop left it). Pulses
    that arrive while stopped still refine the tempo (many DAWs send clock all the time).
    Until the transport runs, `time_at` raises ClockNotRunningError and `beat_at` returns the
    position where playing will resume.
    """

    def __init__(
        self,
        meter: Meter | None = None,
        *,
        initial_tempo: float = 120.0,
        window_ticks: int = CLOCKS_PER_BEAT,
        announce_bpm: float = 0.5,
    ):
        super().__init__(meter or Meter())
        self._estimator = TempoEstimator(window_ticks)
        self._tempo = check_tempo(initial_tempo)
        self._announced = self._tempo
        self._announce_bpm = announce_bpm
        self._running = False
        self._armed = False  # Start/Continue seen, waiting for the first pulse
        self._next_tick = 0  # song position, in pulses, of the next pulse while running
        self._last_tick = 0  # song position of the newest pulse while running
        self.ticks = 0  # pulses received in total

    @property
    def tempo(self) -> float:
        return self._tempo

    @property
    def running(self) -> bool:
        return self._running

    @property
    def position_beat(self) -> float:
        """Song position of the next pulse, in beats."""
        return self._next_tick / CLOCKS_PER_BEAT

    def _period(self) -> float:
        # From the clamped tempo, so a transient wild estimate cannot fling the beat far off.
        return 60.0 / (self._tempo * CLOCKS_PER_BEAT)

    def beat_at(self, t: float) -> float:
        anchor = self._estimator.last_pulse_time
        if not self._running or anchor is None:
            return self.position_beat
        return (self._last_tick + (t - anchor) / self._period()) / CLOCKS_PER_BEAT

    def time_at(self, beat: float) -> float:
        anchor = self._estimator.last_pulse_time
        if not self._running or anchor is None:
            raise ClockNotRunningError("the MIDI clock transport is stopped")
        return anchor + (beat * CLOCKS_PER_BEAT - self._last_tick) * self._period()

    def set_tempo(self, bpm: float) -> None:
        raise ClockError("the tempo follows the incoming MIDI clock; change it at the sender")

    def handle(self, event: MidiEvent) -> bool:
        if isinstance(event, ClockTick):
            self._on_tick(event.time)
        elif isinstance(event, Start):
            self._next_tick, self._armed, self._running = 0, True, False
            self._estimator.reset()  # the phase restarts; keep only the tempo value
        elif isinstance(event, Continue):
            self._armed, self._running = True, False
            self._estimator.reset()
        elif isinstance(event, Stop):
            was_running = self._running
            self._running, self._armed = False, False
            if was_running:
                self._emit(TransportChanged(event.time, False, self.position_beat))
        elif isinstance(event, SongPosition):
            self._next_tick = event.sixteenths * (CLOCKS_PER_BEAT // 4)
            if self._running:
                # A jump while playing: the next pulse is the new position.
                self._last_tick = self._next_tick - 1
            self._emit(TransportChanged(event.time, self._running, self.position_beat))
        else:
            return False
        return True

    def _on_tick(self, arrival: float) -> None:
        self.ticks += 1
        self._estimator.add(arrival)
        bpm = self._estimator.bpm
        if bpm is not None:
            self._tempo = min(max(bpm, MIN_BPM), MAX_BPM)
        if self._armed:
            self._armed, self._running = False, True
            self._last_tick = self._next_tick
            self._next_tick += 1
            self._emit(TransportChanged(arrival, True, self._last_tick / CLOCKS_PER_BEAT))
        elif self._running:
            self._last_tick = self._next_tick
            self._next_tick += 1
        if abs(self._tempo - self._announced) >= self._announce_bpm:
            previous, self._announced = self._announced, self._tempo
            self._emit(TempoChanged(arrival, self.beat_at(arrival), self._tempo, previous))


class LinkClock(Clock):
    """An Ableton Link session (optional `aalink` package), joined in `__aenter__`.

    Beats are Link's beats with quantum = beats per bar, so bar boundaries agree with every
    peer using the same quantum. `set_tempo` changes the tempo of the whole session.
    """

    def __init__(self, tempo: float = 120.0, meter: Meter | None = None):
        super().__init__(meter or Meter())
        self._initial_tempo = check_tempo(tempo)
        self._link: Any = None
        self._last_tempo = self._initial_tempo

    async def __aenter__(self) -> LinkClock:
        try:
            import aalink
        except ImportError as err:
            raise LinkUnavailableError(str(err)) from err
        loop = asyncio.get_running_loop()
        try:
            link = aalink.Link(self._initial_tempo)
        except TypeError:
            link = aalink.Link(self._initial_tempo, loop)  # versions that require the loop
        link.quantum = self.beats_per_bar
        link.set_tempo_callback(self._on_tempo)
        link.enabled = True
        self._link = link
        log.info("joined Ableton Link at %.2f BPM, quantum %g", link.tempo, link.quantum)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.enabled = False
            # Link's threads call into Python (tempo callback); let one in flight finish before
            # the Link object, whose destructor joins those threads, can be freed.
            await asyncio.sleep(0.05)

    def _require(self) -> Any:
        if self._link is None:
            raise ClockError("the Link clock is not open; use `async with LinkClock(...)`")
        return self._link

    @property
    def num_peers(self) -> int:
        return int(self._require().num_peers)

    @property
    def tempo(self) -> float:
        return float(self._require().tempo)

    def beat_at(self, t: float) -> float:
        link = self._require()
        # Link keeps its own clock; anchor on "now" in both domains, sub-microsecond apart.
        now_beat, now = link.beat, time.perf_counter()
        return now_beat + (t - now) * link.tempo / 60.0

    def time_at(self, beat: float) -> float:
        link = self._require()
        now_beat, now = link.beat, time.perf_counter()
        return now + (beat - now_beat) * 60.0 / link.tempo

    def set_tempo(self, bpm: float) -> None:
        self._require().tempo = check_tempo(bpm)

    def set_meter(self, meter: Meter) -> float:
        """Change the quantum; Link aligns bars to multiples of it, so the grid restarts at 0."""
        self._grid = BarGrid(meter)
        if self._link is not None:
            self._link.quantum = meter.beats_per_bar
        return self.next_bar_beat(self.now_beat()) if self._link is not None else 0.0

    def _on_tempo(self, bpm: float) -> None:
        previous, self._last_tempo = self._last_tempo, float(bpm)
        now = time.perf_counter()
        beat = self.beat_at(now) if self._link is not None else 0.0
        self._emit(TempoChanged(now, beat, float(bpm), previous))


@dataclass
class ClockConfig:
    """The `[clock]` section of config.toml.

    source: internal | midi | link (Ableton Link, needs the aalink package).
    tempo: BPM (quarter notes) of the internal clock, the first guess of the MIDI clock, and the
        tempo a Link session starts with when this is its first peer.
    meter: time signature "N/D", e.g. "4/4", "3/4", "6/8".
    """

    source: Literal["internal", "midi", "link"] = "internal"
    tempo: float = 120.0
    meter: str = "4/4"

    def __post_init__(self) -> None:
        check_range("clock.tempo", self.tempo, MIN_BPM, MAX_BPM)
        try:
            Meter.parse(self.meter)
        except ValueError as err:
            raise ConfigError(f"clock.meter = {self.meter!r}: {err}") from err

    @property
    def parsed_meter(self) -> Meter:
        return Meter.parse(self.meter)


def make_clock(config: ClockConfig) -> Clock:
    """The clock `config.source` names; enter it with `async with` before use."""
    meter = config.parsed_meter
    if config.source == "internal":
        return InternalClock(config.tempo, meter)
    if config.source == "midi":
        return MidiClock(meter, initial_tempo=config.tempo)
    if config.source == "link":
        return LinkClock(config.tempo, meter)
    raise ConfigError(f"clock.source = {config.source!r}: must be internal, midi or link")
