"""Live performance events -> REMI ids, the same ids miditok gives offline for the same performance.

"The same performance" is the symusic Score recorded from the events at the encoder's input
resolution (`ticks_per_quarter`): one piano track whose notes start at their note-on and end at
their note-off (a key struck again while held ends its earlier note first), whose sustain pedal
spans each pedal-down..pedal-up, plus the tempo and time-signature changes, with the constructor's
tempo and meter at time 0. `tokenizer.encode(score)` of that Score is what this encoder emits, id
for id, as the performance unfolds.

miditok's preprocessing, which this module repeats causally (see docs/remi.md):
- times are resampled to a grid of `grid_ticks_per_quarter` ticks (8 positions per beat of the
  meter, symusic's round-half-up); note and pedal durations are resampled on their own (at least
  one tick), then a note's duration snaps to the closest Duration token (ties go up);
- velocities snap to the closest bin (ties go up), tempos to the closest bin in microseconds per
  quarter; at one tick the last tempo wins, and a tempo equal to the previous one is dropped;
- a meter change takes effect at the next bar line (its time truncated to the grid); a change to
  the meter already in force is dropped, two changes at one bar line leave the later one;
- pedals that touch or overlap after rounding merge into one;
- notes at one tick are ordered by pitch (then duration, velocity); of two notes with the same
  pitch and tick only the first in that order is kept;
- tokens at one tick come as: Bar(s) and TimeSig, Position, Tempo, Pedal/PedalOff, notes.

When a token becomes final: everything at a grid tick is emitted once no later event can land on
that tick (the watermark has passed it by half a grid step), the bar's meter can no longer change,
and every note starting there has ended or has outgrown the longest Duration token (a held note
therefore holds back the tokens after it). Bar tokens of empty bars come when a later event needs
them, or on `advance` (time passes and the performance goes on). `flush` ends the performance.

Pure: no I/O, no threads, no clock; the daemon calls it from its event loop.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from daemon.errors import DaemonError
from model.remi_grammar import RemiLayout

log = logging.getLogger(__name__)

# Input resolution: a performance is recorded at 960 ticks per quarter note (0.52 ms at 120 qpm),
# finer than any grid miditok resamples to (at most 16 ticks per quarter here).
DEFAULT_TICKS_PER_QUARTER = 960
DEFAULT_METER = (4, 4)  # miditok's meter when a score has none
_INF = 1 << 62


class EncoderError(DaemonError):
    """The online encoder cannot take an event or a setting."""


class InvalidEventError(EncoderError):
    """An event with values no keyboard can send (pitch or velocity outside 0-127, tempo <= 0)."""

    def __init__(self, event: object, reason: str):
        super().__init__(f"{event!r}: {reason}")
        self.event = event
        self.reason = reason


class UndeclaredMeterError(EncoderError):
    """A meter whose denominator was not declared to the encoder.

    miditok picks its time grid from every time signature of a piece at once, so the encoder
    must know the denominators up front (`denominators=`) to quantise as miditok would.
    """

    def __init__(self, meter: tuple[int, int], denominators: frozenset[int]):
        super().__init__(
            f"meter {meter[0]}/{meter[1]}: denominator {meter[1]} not declared "
            f"(encoder built for {sorted(denominators)})"
        )
        self.meter = meter
        self.denominators = denominators


class EncoderFinishedError(EncoderError):
    """The encoder was flushed; build a new one for a new performance."""


# ---------------------------------------------------------------------------------------------
# Performance events. Times are quarter-note beats since the first bar line (MIDI clock and
# Ableton Link count the same beats).


@dataclass(frozen=True, slots=True)
class NoteOn:
    """A key pressed; velocity 1-127 (0 means release, as in MIDI)."""

    beats: float
    pitch: int
    velocity: int


@dataclass(frozen=True, slots=True)
class NoteOff:
    """A key released."""

    beats: float
    pitch: int


@dataclass(frozen=True, slots=True)
class SustainPedal:
    """The sustain pedal goes down (`down`) or up. Repeats of the current state are ignored."""

    beats: float
    down: bool


@dataclass(frozen=True, slots=True)
class TempoChange:
    """The tempo becomes `qpm` quarter notes per minute."""

    beats: float
    qpm: float


@dataclass(frozen=True, slots=True)
class MeterChange:
    """The time signature becomes numerator/denominator (from the next bar line on)."""

    beats: float
    numerator: int
    denominator: int


PerformanceEvent = NoteOn | NoteOff | SustainPedal | TempoChange | MeterChange


def qpm_to_mspq(qpm: float) -> int:
    """Microseconds per quarter note, rounded as symusic rounds a Tempo given in qpm."""
    return int(math.floor(60_000_000.0 / qpm + 0.5))


def closest_index(values: list[float], x: float) -> int:
    """Index of the value closest to `x` in ascending `values`; a tie goes to the larger value.

    The same choice as miditok's `np_get_closest`, which bins velocities, tempos and durations.
    """
    i = bisect.bisect_left(values, x)
    if i == len(values) or (i > 0 and abs(x - values[i - 1]) < abs(x - values[i])):
        i -= 1
    return i


# ---------------------------------------------------------------------------------------------
# Pending material, kept in input ticks until it is emitted.


@dataclass(eq=False)
class _Note:
    on: int  # input ticks
    pitch: int
    velocity: int  # binned value
    off: int | None = None


@dataclass(eq=False)
class _Pedal:
    on: int
    off: int | None = None
    on_emitted: bool = False


@dataclass(frozen=True)
class _Meter:
    tick: int  # grid ticks; always on a bar line of the meter before it
    num: int
    den: int


@dataclass
class _PedalGroup:
    on: int  # grid ticks
    end: int  # grid ticks, _INF if not known yet
    pedals: list[_Pedal]


@dataclass
class _Slot:
    """What the offline stream has at one grid tick."""

    meter_change: bool = False
    tempo: int | None = None  # tempo bin
    tempo_items: list[tuple[int, int]] = field(default_factory=list)
    pedal: list[tuple[bool, _PedalGroup]] = field(default_factory=list)  # (down, group)
    notes: list[tuple[_Note, int]] = field(default_factory=list)  # (note, duration in grid ticks)
    blocked: bool = False  # a note here is still sounding


class OnlineEncoder:
    """Turns performance events into final REMI ids, in miditok's order, as early as possible.

    tokenizer: the checkpoint's miditok REMI tokenizer (piano configuration, see
        `model.remi_grammar.check_piano_remi`).
    ticks_per_quarter: input resolution; event times are rounded to it first (the recording).
    tempo, meter: the performance's tempo and time signature at time 0.
    denominators: every time-signature denominator the performance will use besides `meter`'s.
        miditok chooses its grid from all of them at once; leave empty for one meter family.

    `feed(event)` and `advance(beats)` return the ids that became final; `flush()` ends the
    performance (closing held notes and the pedal) and returns the rest. Events must come in
    time order; an event earlier than the watermark (the latest time seen) is moved to it.
    """

    def __init__(
        self,
        tokenizer,
        *,
        ticks_per_quarter: int = DEFAULT_TICKS_PER_QUARTER,
        tempo: float = 120.0,
        meter: tuple[int, int] = DEFAULT_METER,
        denominators: Iterable[int] = (),
    ):
        if ticks_per_quarter <= 0:
            raise EncoderError(f"ticks_per_quarter must be positive, got {ticks_per_quarter}")
        if not tempo > 0:
            raise EncoderError(f"tempo must be positive, got {tempo}")
        self.layout = RemiLayout(tokenizer)
        lay = self.layout
        cfg = tokenizer.config
        self.ticks_per_quarter = int(ticks_per_quarter)
        self._supported_meters = {tuple(ts) for ts in tokenizer.time_signatures}
        first = tuple(meter) if tuple(meter) in self._supported_meters else DEFAULT_METER
        if first != tuple(meter):
            log.warning("meter %s/%s is not in the vocabulary; using 4/4 as miditok does", *meter)
        self.denominators = frozenset(int(d) for d in denominators) | {first[1]}
        bad = sorted(d for d in self.denominators if not any(d == m[1] for m in self._supported_meters))
        if bad:
            raise EncoderError(f"denominators {bad} have no time signature in the vocabulary")
        self._pos_per_beat = lay.positions_per_beat
        # miditok resamples to this many ticks per quarter: 8 positions per beat of the meter
        # with the largest denominator (preprocess_score).
        self.grid_ticks_per_quarter = self._pos_per_beat * max(self.denominators) // 4
        self._multi_grid = len(self.denominators) > 1
        # Float ratio, as miditok multiplies time-signature ticks by it before truncating.
        self._grid_ratio = self.grid_ticks_per_quarter / self.ticks_per_quarter
        self._pitch_lo, self._pitch_hi = cfg.pitch_range
        self._velocities = [int(v) for v in tokenizer.velocities]
        # Tempo bins in microseconds per quarter, ascending (so fastest first); miditok stores a
        # binned tempo as integer mspq and writes its token as round(qpm, 2).
        self._tempo_mspq = [float(m) for m in tokenizer._tempos_mspq]
        self._tempo_ids = [lay.tempo_ids[str(round(60_000_000 / int(m), 2))] for m in self._tempo_mspq]
        # Duration tables per ticks-per-beat value: ticks in token order, ids, and the length
        # from which every longer note gets the longest token (so a held note is final there).
        self._durations: dict[int, tuple[list[int], dict[int, int], int]] = {}
        for den in self.denominators:
            tpb = self._ticks_per_beat(den)
            ticks = [lay.duration_ticks(v, tpb) for v in tokenizer.durations]
            ids = {t: lay.duration_ids[v] for t, v in zip(ticks, tokenizer.durations, strict=True)}
            longest = ticks[-1]
            saturate = next(
                d for d in range(ticks[-2], longest + 1) if ticks[closest_index(ticks, d)] == longest
            )
            self._durations[tpb] = (ticks, ids, saturate)

        self._meters: list[_Meter] = [_Meter(0, first[0], first[1])]
        self._tempos: list[tuple[int, int]] = [(0, self._tempo_bin(tempo))]  # (input tick, bin)
        self._notes: list[_Note] = []  # not yet emitted
        self._held: dict[int, _Note] = {}  # pitch -> sounding note (emitted or not)
        self._pedals: list[_Pedal] = []  # not yet closed by an emitted PedalOff
        self._pedal_down = False
        self._watermark = 0  # input ticks
        self._bar_start: int | None = None  # grid tick of the last emitted Bar
        self._tempo_emitted: int | None = None  # bin of the last emitted Tempo
        self._final_before = 0  # grid ticks: every token before this time is out
        self._finished = False
        self.late_events = 0  # events that arrived before the watermark and were moved to it

    # -- public API ----------------------------------------------------------------------------

    @property
    def watermark_beats(self) -> float:
        """The latest time seen (fed or advanced to), in beats."""
        return self._watermark / self.ticks_per_quarter

    @property
    def final_before_beats(self) -> float:
        """Every token of the performance before this time (in beats) has been emitted.

        Bar tokens of trailing empty bars are the exception: they come only from `advance`.
        """
        return self._final_before / self.grid_ticks_per_quarter

    @property
    def held_pitches(self) -> list[int]:
        """Pitches whose keys are down, ascending."""
        return sorted(self._held)

    def tick_of(self, beats: float) -> int:
        """The input tick of a time in beats (the recording's rounding)."""
        return round(beats * self.ticks_per_quarter)

    def feed(self, event: PerformanceEvent) -> list[int]:
        """Take one event; return the ids that became final (often none).

        Raises InvalidEventError (or UndeclaredMeterError) without changing anything."""
        self._check_open()
        self._validate(event)
        tick = self._arrival_tick(event)
        if isinstance(event, NoteOn):
            if event.velocity == 0:
                self._note_off(tick, event.pitch)
            else:
                self._note_on(tick, event.pitch, event.velocity)
        elif isinstance(event, NoteOff):
            self._note_off(tick, event.pitch)
        elif isinstance(event, SustainPedal):
            self._pedal(tick, event.down)
        elif isinstance(event, TempoChange):
            self._tempos.append((tick, self._tempo_bin(event.qpm)))
        else:
            self._meter_change(tick, event.numerator, event.denominator)
        return self._drain(advancing=False, final=False)

    def advance(self, beats: float) -> list[int]:
        """Time has reached `beats` and the performance goes on: return newly final ids,
        including Bar/TimeSig of bars that began with no note in them."""
        self._check_open()
        self._watermark = max(self._watermark, self.tick_of(beats))
        return self._drain(advancing=True, final=False)

    def flush(self, beats: float | None = None) -> list[int]:
        """End the performance at `beats` (default: the watermark): release held keys and the
        pedal there, and return every remaining id. The encoder takes nothing afterwards."""
        self._check_open()
        if beats is not None:
            self._watermark = max(self._watermark, self.tick_of(beats))
        for pitch in list(self._held):
            self._note_off(self._watermark, pitch)
        if self._pedal_down:
            self._pedal(self._watermark, False)
        ids = self._drain(advancing=False, final=True)
        self._finished = True
        return ids

    # -- events --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._finished:
            raise EncoderFinishedError("the encoder was flushed; build a new one")

    def _validate(self, event: object) -> None:
        if isinstance(event, NoteOn | NoteOff):
            if not 0 <= event.pitch <= 127:
                raise InvalidEventError(event, "pitch outside 0-127")
            if isinstance(event, NoteOn) and not 0 <= event.velocity <= 127:
                raise InvalidEventError(event, "velocity outside 0-127")
        elif isinstance(event, TempoChange):
            if not event.qpm > 0:
                raise InvalidEventError(event, "tempo must be positive")
        elif isinstance(event, MeterChange):
            meter = (event.numerator, event.denominator)
            if meter in self._supported_meters and event.denominator not in self.denominators:
                raise UndeclaredMeterError(meter, self.denominators)
        elif not isinstance(event, SustainPedal):
            raise InvalidEventError(event, "not a performance event")
        if not event.beats >= 0:  # type: ignore[attr-defined]
            raise InvalidEventError(event, "time before the first bar line")

    def _arrival_tick(self, event: PerformanceEvent) -> int:
        tick = self.tick_of(event.beats)
        if tick < self._watermark:
            # Tokens before the watermark may be out already; an event there cannot change them.
            self.late_events += 1
            log.debug("event %r is %d ticks late; moved to the watermark", event, self._watermark - tick)
            tick = self._watermark
        self._watermark = tick
        return tick

    def _note_on(self, tick: int, pitch: int, velocity: int) -> None:
        if pitch in self._held:  # a key cannot sound twice: the new strike ends the old note
            self._note_off(tick, pitch)
        if not self._pitch_lo <= pitch <= self._pitch_hi:
            return  # miditok drops notes outside the pitch range
        note = _Note(tick, pitch, self._velocities[closest_index(self._velocities, velocity)])
        self._held[pitch] = note
        self._notes.append(note)

    def _note_off(self, tick: int, pitch: int) -> None:
        note = self._held.pop(pitch, None)
        if note is not None:
            note.off = tick

    def _pedal(self, tick: int, down: bool) -> None:
        if down == self._pedal_down:
            return
        self._pedal_down = down
        if down:
            self._pedals.append(_Pedal(tick))
        else:
            self._pedals[-1].off = tick

    def _tempo_bin(self, qpm: float) -> int:
        return closest_index(self._tempo_mspq, qpm_to_mspq(qpm))

    def _meter_change(self, tick: int, num: int, den: int) -> None:
        """Add a time signature as miditok's preprocessing would (next bar line, deduplicated)."""
        if (num, den) not in self._supported_meters:
            log.warning("meter %d/%d is not in the vocabulary; ignored as miditok does", num, den)
            return
        last = self._meters[-1]
        if (num, den) == (last.num, last.den):
            return
        # miditok truncates (not rounds) time-signature times when it resamples.
        at = max(int(tick * self._grid_ratio), last.tick)
        bar = self._bar_ticks(last)
        at = last.tick + -(-(at - last.tick) // bar) * bar
        if at == last.tick:  # a second change at one bar line replaces the first
            self._meters.pop()
            if self._meters and (self._meters[-1].num, self._meters[-1].den) == (num, den):
                return  # ... and one back to the meter before cancels both
        self._meters.append(_Meter(at, num, den))

    # -- grid arithmetic -----------------------------------------------------------------------

    def _ticks_per_beat(self, den: int) -> int:
        return self.grid_ticks_per_quarter * 4 // den

    def _bar_ticks(self, meter: _Meter) -> int:
        return meter.num * self._ticks_per_beat(meter.den)

    def _step(self, den: int) -> int:
        """Grid step of onsets in a section of this denominator (1 unless meters mix)."""
        return self._ticks_per_beat(den) // self._pos_per_beat

    def _to_grid(self, ticks: int) -> int:
        """symusic's resampling of a time or duration: round half up to the grid."""
        grid, tpq = self.grid_ticks_per_quarter, self.ticks_per_quarter
        return (2 * grid * ticks + tpq) // (2 * tpq)

    def _meter_index_at(self, tick: int) -> int:
        meters = self._meters
        i = len(meters) - 1
        while meters[i].tick > tick:
            i -= 1
        return i

    def _snap(self, tick: int) -> int:
        """Onset quantisation when meters with different denominators mix.

        miditok then rounds each time-signature section to its own step (numpy's round half to
        even), measuring from the start of the section; sections of equal step are one section.
        """
        if not self._multi_grid:
            return tick
        i = self._meter_index_at(tick)
        step = self._step(self._meters[i].den)
        while i > 0 and self._step(self._meters[i - 1].den) == step:
            i -= 1
        start = self._meters[i].tick
        q, rem = divmod(tick - start, step)
        if 2 * rem > step or (2 * rem == step and q % 2 == 1):
            q += 1
        return start + q * step

    def _meter_horizon(self, floor_tick: int) -> int:
        """First grid tick at which a future meter event could still change the meter."""
        last = self._meters[-1]
        if last.tick >= floor_tick:
            return last.tick
        bar = self._bar_ticks(last)
        return last.tick + -(-(floor_tick - last.tick) // bar) * bar

    # -- emission ------------------------------------------------------------------------------

    def _drain(self, *, advancing: bool, final: bool) -> list[int]:
        """Emit, in offline order, every token that no future event can change."""
        if final:
            horizon = meter_horizon = _INF
        else:
            w = self._watermark
            # Meter events truncate their time to the grid (see _meter_change).
            meter_horizon = self._meter_horizon(int(w * self._grid_ratio))
            horizon = self._lower_bound(self._to_grid(w), meter_horizon)
            if self._pedal_down:
                pedal = self._pedals[-1]
                on = self._to_grid(pedal.on)
                end = on + max(self._to_grid(w - pedal.on), 1)
                horizon = min(horizon, self._lower_bound(end, meter_horizon))
        slots = self._collect(horizon, meter_horizon)
        out: list[int] = []
        blocked_at: int | None = None
        for tick in sorted(slots):
            slot = slots[tick]
            if slot.blocked:
                blocked_at = tick
                break
            self._emit_slot(tick, slot, out)
        if blocked_at is not None:
            bars_until = blocked_at  # a sounding note there is certain, so its bar lines are too
        elif advancing:
            bars_until = horizon
        else:
            bars_until = -1
        self._emit_bars(min(bars_until, horizon), meter_horizon, out)
        self._final_before = blocked_at if blocked_at is not None else horizon
        return out

    def _lower_bound(self, grid_tick: int, meter_horizon: int) -> int:
        """Earliest onset tick of something resampled to `grid_tick` or later."""
        return self._snap(grid_tick) if grid_tick < meter_horizon else meter_horizon

    def _collect(self, horizon: int, meter_horizon: int) -> dict[int, _Slot]:
        """Group the pending material that lands before `horizon` by grid tick."""
        slots: dict[int, _Slot] = {}

        def slot(tick: int) -> _Slot:
            found = slots.get(tick)
            if found is None:
                found = slots[tick] = _Slot()
            return found

        start = -1 if self._bar_start is None else self._bar_start
        for meter in self._meters[1:]:
            if start < meter.tick < horizon:
                slot(meter.tick).meter_change = True
        for item in self._tempos:
            raw = self._to_grid(item[0])
            if raw < meter_horizon and (tick := self._snap(raw)) < horizon:
                found = slot(tick)
                found.tempo = item[1]  # the last tempo at a tick wins
                found.tempo_items.append(item)
        for group in self._pedal_groups(meter_horizon):
            if not group.pedals[0].on_emitted and group.on < horizon:
                slot(group.on).pedal.append((True, group))
            if group.end < horizon:
                slot(group.end).pedal.append((False, group))
        for note in self._notes:
            raw = self._to_grid(note.on)
            if raw >= meter_horizon or (tick := self._snap(raw)) >= horizon:
                continue
            meter = self._meters[self._meter_index_at(tick)]
            ticks, _, saturate = self._durations[self._ticks_per_beat(meter.den)]
            if note.off is not None:
                length = ticks[closest_index(ticks, max(self._to_grid(note.off - note.on), 1))]
            elif self._to_grid(self._watermark - note.on) >= saturate:
                length = ticks[-1]  # longer than the longest Duration token: its length is known
            else:
                slot(tick).blocked = True
                continue
            slot(tick).notes.append((note, length))
        return slots

    def _pedal_groups(self, meter_horizon: int) -> list[_PedalGroup]:
        """Pending pedals on the grid, merged where one reaches the next (as miditok merges)."""
        groups: list[_PedalGroup] = []
        for pedal in self._pedals:
            on_raw = self._to_grid(pedal.on)
            if on_raw >= meter_horizon:
                break
            on = self._snap(on_raw)
            end = _INF
            if pedal.off is not None:
                end_raw = on_raw + max(self._to_grid(pedal.off - pedal.on), 1)
                if not self._multi_grid:
                    end = end_raw
                elif end_raw < meter_horizon:
                    end = self._snap(end_raw)
                    if end <= on:  # collapsed by rounding: one step long, as miditok makes it
                        end = on + self._step(self._meters[self._meter_index_at(on)].den)
            if groups and groups[-1].end >= on:
                groups[-1].end = max(groups[-1].end, end)
                groups[-1].pedals.append(pedal)
            else:
                groups.append(_PedalGroup(on, end, [pedal]))
        return groups

    def _emit_slot(self, tick: int, slot: _Slot, out: list[int]) -> None:
        lay = self.layout
        for item in slot.tempo_items:
            self._tempos.remove(item)
        tempo = slot.tempo
        if tempo == self._tempo_emitted:
            tempo = None  # equal successive tempos are dropped
        notes: list[tuple[_Note, int]] = []
        for note, length in sorted(slot.notes, key=lambda nl: (nl[0].pitch, nl[1], nl[0].velocity)):
            self._notes.remove(note)
            if not notes or notes[-1][0].pitch != note.pitch:  # duplicates: the first one stays
                notes.append((note, length))
        if not (slot.meter_change or tempo is not None or slot.pedal or notes):
            return
        self._emit_bars(tick, _INF, out)
        if tempo is None and not slot.pedal and not notes:
            return  # only a meter change: Bar and TimeSig, no Position
        bar_meter = self._meters[self._meter_index_at(self._bar_start)]  # type: ignore[arg-type]
        per_position = self._ticks_per_beat(bar_meter.den) // self._pos_per_beat
        out.append(lay.position_ids[(tick - self._bar_start) // per_position])  # type: ignore[operator]
        if tempo is not None:
            out.append(self._tempo_ids[tempo])
            self._tempo_emitted = tempo
        for down, group in slot.pedal:
            if down:
                group.pedals[0].on_emitted = True
                out.append(lay.pedal_id)
            else:
                for pedal in group.pedals:
                    self._pedals.remove(pedal)
                out.append(lay.pedal_off_id)
        tpb = self._ticks_per_beat(bar_meter.den)
        duration_ids = self._durations[tpb][1]
        for note, length in notes:
            out.append(lay.pitch_ids[note.pitch])
            out.append(lay.velocity_ids[note.velocity])
            out.append(duration_ids[length])

    def _emit_bars(self, until: int, meter_horizon: int, out: list[int]) -> None:
        """Bar and TimeSig tokens of every bar starting at or before `until` (and before the
        point where the meter may still change)."""
        lay = self.layout
        while True:
            if self._bar_start is None:
                nxt = 0
            else:
                nxt = self._bar_start + self._bar_ticks(self._meters[self._meter_index_at(self._bar_start)])
            if nxt > until or nxt >= meter_horizon:
                return
            meter = self._meters[self._meter_index_at(nxt)]
            out.append(lay.bar_id)
            out.append(lay.timesig_ids[(meter.num, meter.den)])
            self._bar_start = nxt
