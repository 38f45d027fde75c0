"""OnlineEncoder: a performance played event by event gives exactly miditok's offline ids.

The offline reference is the performance recorded as a symusic Score (`record`, written here
independently of the encoder) and encoded by `tokenizer.encode`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import symusic
from symusic import Note, Pedal, Score, Tempo, TimeSignature, Track

from daemon.encoder import (
    EncoderFinishedError,
    InvalidEventError,
    MeterChange,
    NoteOff,
    NoteOn,
    OnlineEncoder,
    PerformanceEvent,
    SustainPedal,
    TempoChange,
    UndeclaredMeterError,
    qpm_to_mspq,
)
from model.remi_grammar import RemiGrammar
from model.vocab import build_tokenizer
from train.prepare import encode_score, merge_to_piano


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------
# The offline reference


def record(
    events: Sequence[PerformanceEvent], *, tpq: int, tempo: float, meter: tuple[int, int]
) -> Score:
    """The performance as a MIDI file of `tpq` ticks per quarter stores it: one piano track,
    one sounding note per key (a strike of a held key ends the earlier note), the pedal from each
    down to the next up, the starting tempo and meter at tick 0. Held things end at the last event.
    """
    score = Score(tpq)
    score.tempos.append(Tempo(0, tempo))
    score.time_signatures.append(TimeSignature(0, *meter))
    track = Track("piano", 0, False)
    held: dict[int, tuple[int, int]] = {}
    pedal_since: int | None = None
    last = 0
    for ev in events:
        t = round(ev.beats * tpq)
        last = max(last, t)
        if isinstance(ev, NoteOn) and ev.velocity > 0:
            if ev.pitch in held:
                start, vel = held.pop(ev.pitch)
                track.notes.append(Note(start, t - start, ev.pitch, vel))
            held[ev.pitch] = (t, ev.velocity)
        elif isinstance(ev, NoteOn | NoteOff):
            if ev.pitch in held:
                start, vel = held.pop(ev.pitch)
                track.notes.append(Note(start, t - start, ev.pitch, vel))
        elif isinstance(ev, SustainPedal):
            if ev.down and pedal_since is None:
                pedal_since = t
            elif not ev.down and pedal_since is not None:
                track.pedals.append(Pedal(pedal_since, t - pedal_since))
                pedal_since = None
        elif isinstance(ev, TempoChange):
            score.tempos.append(Tempo(t, ev.qpm))
        elif isinstance(ev, MeterChange):
            score.time_signatures.append(TimeSignature(t, ev.numerator, ev.denominator))
    for pitch, (start, vel) in held.items():
        track.notes.append(Note(start, last - start, pitch, vel))
    if pedal_since is not None:
        track.pedals.append(Pedal(pedal_since, last - pedal_since))
    track.notes.sort(key=lambda n: (n.time, n.duration, n.pitch))  # as symusic orders a read file
    score.tracks.append(track)
    return score


def offline_ids(tokenizer, score: Score) -> list[int]:
    encoded = tokenizer.encode(score)
    assert len(encoded) == 1
    return list(encoded[0].ids)


def certain_onset(ev: PerformanceEvent, tokenizer) -> bool:
    """A note that will be in the stream: a later `advance` up to its time is then safe."""
    lo, hi = tokenizer.config.pitch_range
    return isinstance(ev, NoteOn) and ev.velocity > 0 and lo <= ev.pitch <= hi


def play(
    encoder: OnlineEncoder,
    events: Sequence[PerformanceEvent],
    tokenizer,
    rng: random.Random | None = None,
) -> list[int]:
    """Feed the events in order; before each certain note, advance the clock to it (and, with
    `rng`, to random earlier times first), as the daemon's clock does while the music goes on."""
    ids: list[int] = []
    for ev in events:
        if certain_onset(ev, tokenizer):
            if rng is not None and rng.random() < 0.5:
                ids += encoder.advance(rng.uniform(encoder.watermark_beats, ev.beats))
            ids += encoder.advance(ev.beats)
        ids += encoder.feed(ev)
    return ids + encoder.flush()


def assert_same_as_offline(tokenizer, events, *, tpq=960, tempo=120.0, meter=(4, 4), denominators=(),
                           rng=None) -> list[int]:
    encoder = OnlineEncoder(tokenizer, ticks_per_quarter=tpq, tempo=tempo, meter=meter,
                            denominators=denominators)
    live = play(encoder, events, tokenizer, rng)
    expected = offline_ids(tokenizer, record(events, tpq=tpq, tempo=tempo, meter=meter))
    if live != expected:
        diffs = (i for i, (a, b) in enumerate(zip(live, expected, strict=False)) if a != b)
        at = next(diffs, min(len(live), len(expected)))
        window = slice(max(0, at - 6), at + 6)
        pytest.fail(
            f"live and offline differ at token {at} (len {len(live)} vs {len(expected)}):\n"
            f"  live:    {[tokenizer[i] for i in live[window]]}\n"
            f"  offline: {[tokenizer[i] for i in expected[window]]}"
        )
    return live


def tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer[i] for i in ids]


# ---------------------------------------------------------------------------------------------
# Real pieces


def performance_of(score: Score) -> tuple[list[PerformanceEvent], float, tuple[int, int], bool]:
    """Events of a (merged) score as a keyboard plays them; also its starting tempo and meter,
    and whether keyboard pairing changed any note (same key struck while held, zero length)."""
    tpq = score.ticks_per_quarter
    by_pitch: dict[int, list[list[int]]] = {}
    for n in sorted(score.tracks[0].notes, key=lambda n: (n.time, n.end)):
        by_pitch.setdefault(n.pitch, []).append([n.time, n.end, n.velocity])
    changed = False
    timed: list[tuple[int, int, PerformanceEvent]] = []
    for pitch, notes in by_pitch.items():
        for cur, nxt in zip(notes, notes[1:] + [None], strict=True):
            if nxt is not None and nxt[0] < cur[1]:
                cur[1] = nxt[0]  # the key is struck again: the held note ends there
                changed = True
            if cur[1] <= cur[0]:
                changed = True  # no key goes down and up in no time
                continue
            timed.append((cur[0], 1, NoteOn(cur[0] / tpq, pitch, cur[2])))
            timed.append((cur[1], 0, NoteOff(cur[1] / tpq, pitch)))
    pedals = sorted((p.time, p.end) for p in score.tracks[0].pedals)
    for start, end in _union(pedals):
        timed.append((start, 1, SustainPedal(start / tpq, True)))
        timed.append((end, 0, SustainPedal(end / tpq, False)))
    tempos = list(score.tempos)
    tempo = 120.0
    if tempos and tempos[0].time == 0:
        tempo = tempos.pop(0).qpm
    for t in tempos:
        timed.append((t.time, 1, TempoChange(t.time / tpq, t.qpm)))
    sigs = list(score.time_signatures)
    meter = (4, 4)
    if sigs and sigs[0].time == 0:
        first = sigs.pop(0)
        meter = (first.numerator, first.denominator)
    for ts in sigs:
        timed.append((ts.time, 1, MeterChange(ts.time / tpq, ts.numerator, ts.denominator)))
    timed.sort(key=lambda x: (x[0], x[1]))  # at one time, releases before strikes
    return [ev for _, _, ev in timed], tempo, meter, changed


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def test_online_encoder_real_corpus_equals_miditok(tokenizer, corpus_midi_files) -> None:
    grammar = RemiGrammar(tokenizer)
    assert len(corpus_midi_files) >= 100
    same_as_pipeline = 0
    for path in corpus_midi_files:
        merged = merge_to_piano(symusic.Score(str(path)))
        events, tempo, meter, changed = performance_of(merged)
        dens = {e.denominator for e in events if isinstance(e, MeterChange)}
        live = assert_same_as_offline(
            tokenizer, events, tpq=merged.ticks_per_quarter, tempo=tempo, meter=meter, denominators=dens
        )
        assert grammar.accepts(live), path
        if not changed:
            # Nothing was altered by playing it on a keyboard: these are the training data's ids.
            assert live == encode_score(tokenizer, merged).tolist(), path
            same_as_pipeline += 1
    assert same_as_pipeline >= 50  # every monophonic tune, and the chorales without unisons


# ---------------------------------------------------------------------------------------------
# Random performances with everything the corpus lacks: pedal, tempo and meter changes,
# re-strikes, long notes, notes off the grid, mixed meter families.


def random_performance(rng: random.Random, tokenizer, *, dens: Sequence[int], churn: bool):
    """Events, tpq, tempo, meter of a random performance. With `churn`, meter changes come at
    any time (several per bar, repeats, unsupported ones); else they are a few bars apart so
    each one stays (then every meter family in `dens` appears, as miditok's grid needs)."""
    supported = [m for m in tokenizer.time_signatures if m[1] in dens]
    tpq = rng.choice([960, 480, 10080, 384, 100, 25])
    meter = rng.choice(supported)
    beats = rng.uniform(20, 60)
    fine = 1 / tpq

    def when(lo: float = 0.0, hi: float = beats) -> float:
        t = rng.uniform(lo, hi)
        if rng.random() < 0.5:  # on a musical grid, where rounding ties live
            grid = rng.choice([2, 4, 8, 16, 32, 64, 3, 6, 12])
            t = round(t * grid) / grid
        return max(0.0, round(t / fine) * fine)

    timed: list[tuple[float, float, PerformanceEvent]] = []

    def add(ev: PerformanceEvent) -> None:
        timed.append((ev.beats, rng.random(), ev))

    for _ in range(rng.randint(5, 60)):
        start = when()
        chord = [rng.randint(15, 115) for _ in range(rng.choice([1, 1, 1, 2, 3, 4]))]
        for pitch in chord:
            kind = rng.random()
            if kind < 0.2:
                length = rng.uniform(0, 0.1)  # shorter than a grid step
            elif kind < 0.3:
                length = rng.uniform(8, 20)  # past the longest Duration token
            else:
                length = rng.uniform(0.1, 3)
            add(NoteOn(start, pitch, rng.randint(1, 127)))
            add(NoteOff(when(start, start + length) if rng.random() < 0.5 else start + length, pitch))
            if rng.random() < 0.15:  # struck again while held, or a short double strike
                add(NoteOn(when(start, start + length), pitch, rng.randint(1, 127)))
    t = 0.0
    down = False
    while True:
        t += rng.choice([rng.uniform(0, 0.1), rng.uniform(0.1, 4)])
        if t > beats:
            break
        down = not down
        add(SustainPedal(round(t / fine) * fine, down))
        if rng.random() < 0.1:
            add(SustainPedal(round(t / fine) * fine, not down))  # a flick at the same time
            add(SustainPedal(round(t / fine) * fine, down))
    for _ in range(rng.randint(0, 6)):
        at = when()
        add(TempoChange(at, rng.uniform(25, 320)))
        if rng.random() < 0.3:
            add(TempoChange(at, rng.uniform(25, 320)))  # two at one time: the later wins
        if rng.random() < 0.3:
            add(TempoChange(when(at, at + 2), 120.0))
    if churn:
        for _ in range(rng.randint(0, 8)):
            num, den = rng.choice(supported + [(11, 4), (5, 2), (13, 8)])
            add(MeterChange(when(), num, den if den in dens or (num, den) == (5, 2) else dens[0]))
    else:
        t, current = 0.0, meter
        while True:
            # past the bar line where the previous change lands (bars are at most 7 beats)
            t += rng.uniform(1.5, 3) * current[0] * 4 / current[1] + 7
            if t > beats:
                break
            current = rng.choice([m for m in supported if m != current])
            add(MeterChange(round(t / fine) * fine, *current))
    timed.sort(key=lambda x: (x[0], x[1]))
    return [ev for _, _, ev in timed], tpq, rng.uniform(25, 320), meter


@pytest.mark.parametrize(
    ("dens", "churn", "seed"),
    [((4,), True, 1), ((8,), True, 2), ((2,), True, 3), ((4, 8), False, 4), ((2, 4), False, 5),
     ((2, 4, 8), False, 6)],
)
def test_online_encoder_random_performances_equal_miditok(tokenizer, dens, churn, seed) -> None:
    rng = random.Random(seed)
    grammar = RemiGrammar(tokenizer)
    for _ in range(40):
        events, tpq, tempo, meter = random_performance(rng, tokenizer, dens=dens, churn=churn)
        used = {e.denominator for e in events if isinstance(e, MeterChange)} | {meter[1]}
        live = assert_same_as_offline(tokenizer, events, tpq=tpq, tempo=tempo, meter=meter,
                                      denominators=sorted(used & set(dens)), rng=rng)
        assert grammar.accepts(live)


# ---------------------------------------------------------------------------------------------
# Small hand-made cases


def test_online_encoder_chord_waits_for_every_key(tokenizer) -> None:
    events = [NoteOn(0.0, 67, 90), NoteOn(0.01, 60, 80), NoteOn(0.02, 64, 100),
              NoteOff(0.9, 60), NoteOff(1.0, 64), NoteOn(2.0, 72, 64), NoteOff(2.05, 67)]
    enc = OnlineEncoder(tokenizer)
    held = [i for ev in events[:6] for i in enc.feed(ev)]
    # G is still down: only the first bar line is certain, nothing at position 0 is final.
    assert tokens(tokenizer, held) == ["Bar_None", "TimeSig_4/4"]
    released = enc.feed(events[6])
    assert tokens(tokenizer, released) == [
        "Position_0", "Tempo_121.29",
        "Pitch_60", "Velocity_79", "Duration_0.7.8",
        "Pitch_64", "Velocity_103", "Duration_1.0.8",
        "Pitch_67", "Velocity_87", "Duration_2.0.8",
    ]
    rest = enc.flush()  # the last key is released where the performance ends (beat 2.05)
    assert tokens(tokenizer, rest) == ["Position_16", "Pitch_72", "Velocity_63", "Duration_0.1.8"]
    expected = offline_ids(tokenizer, record(events, tpq=960, tempo=120.0, meter=(4, 4)))
    assert held + released + rest == expected


def test_online_encoder_note_across_bar_line(tokenizer) -> None:
    events = [NoteOn(3.0, 60, 64), NoteOn(4.0, 64, 64), NoteOff(4.5, 64), NoteOff(6.0, 60)]
    enc = OnlineEncoder(tokenizer)
    before = [i for ev in events[:3] for i in enc.feed(ev)]
    # The held C (bar 1, beat 4) holds back its own tokens and everything after it.
    assert tokens(tokenizer, before) == ["Bar_None", "TimeSig_4/4", "Position_0", "Tempo_121.29"]
    assert tokens(tokenizer, enc.feed(events[3])) == [
        "Position_24", "Pitch_60", "Velocity_63", "Duration_3.0.8",
        "Bar_None", "TimeSig_4/4", "Position_0", "Pitch_64", "Velocity_63", "Duration_0.4.8",
    ]
    assert_same_as_offline(tokenizer, events)


def test_online_encoder_long_note_final_before_release(tokenizer) -> None:
    enc = OnlineEncoder(tokenizer)
    enc.feed(NoteOn(0.0, 48, 70))
    assert tokens(tokenizer, enc.advance(11.5)) == ["Bar_None", "TimeSig_4/4"]
    # Past 11 7/8 beats every release gives the longest Duration: the note is final while held.
    out = tokens(tokenizer, enc.advance(12.0))
    assert out == ["Position_0", "Tempo_121.29", "Pitch_48", "Velocity_71", "Duration_12.0.4",
                   "Bar_None", "TimeSig_4/4", "Bar_None", "TimeSig_4/4"]
    events = [NoteOn(0.0, 48, 70), NoteOn(13.0, 50, 70), NoteOff(14.0, 50), NoteOff(20.0, 48)]
    assert_same_as_offline(tokenizer, events)


def test_online_encoder_pedal(tokenizer) -> None:
    events = [SustainPedal(0.0, True), NoteOn(0.0, 60, 80), NoteOff(0.5, 60),
              SustainPedal(1.99, False), SustainPedal(2.0, True),  # re-pedal within a grid step
              NoteOn(2.5, 62, 80), NoteOff(3.0, 62), SustainPedal(3.5, False), SustainPedal(4.0, True),
              NoteOn(5.0, 64, 80), NoteOff(6.0, 64), SustainPedal(6.5, False)]
    live = assert_same_as_offline(tokenizer, events)
    names = tokens(tokenizer, live)
    assert names.count("Pedal_0") == 2 and names.count("PedalOff_0") == 2  # the re-pedal merged


def test_online_encoder_tempo_change(tokenizer) -> None:
    events = [NoteOn(0.0, 60, 80), NoteOff(1.0, 60), TempoChange(2.0, 90.0), NoteOn(2.0, 62, 80),
              NoteOff(3.0, 62), TempoChange(4.0, 89.0), TempoChange(5.0, 140.0), TempoChange(5.0, 60.0),
              NoteOn(6.0, 64, 80), NoteOff(7.0, 64)]
    names = tokens(tokenizer, assert_same_as_offline(tokenizer, events))
    # 89 qpm falls in 90's bin (dropped); of two changes at one time the later stays.
    assert [n for n in names if n.startswith("Tempo")] == ["Tempo_121.29", "Tempo_87.42", "Tempo_60.32"]


def test_online_encoder_empty_bar_on_advance(tokenizer) -> None:
    enc = OnlineEncoder(tokenizer)
    first = enc.feed(NoteOn(0.0, 60, 80)) + enc.feed(NoteOff(1.0, 60)) + enc.advance(3.9)
    assert tokens(tokenizer, first) == ["Bar_None", "TimeSig_4/4", "Position_0", "Tempo_121.29",
                                        "Pitch_60", "Velocity_79", "Duration_1.0.8"]
    bar2 = enc.advance(4.2)  # bar 2 began and the music goes on
    bar3 = enc.advance(8.2)
    assert tokens(tokenizer, bar2) == tokens(tokenizer, bar3) == ["Bar_None", "TimeSig_4/4"]
    rest = enc.feed(NoteOn(9.0, 62, 80)) + enc.feed(NoteOff(9.5, 62)) + enc.flush()
    assert tokens(tokenizer, rest) == ["Position_8", "Pitch_62", "Velocity_79", "Duration_0.4.8"]
    events = [NoteOn(0.0, 60, 80), NoteOff(1.0, 60), NoteOn(9.0, 62, 80), NoteOff(9.5, 62)]
    expected = offline_ids(tokenizer, record(events, tpq=960, tempo=120.0, meter=(4, 4)))
    assert first + bar2 + bar3 + rest == expected


def test_online_encoder_three_four_and_meter_change(tokenizer) -> None:
    events = [NoteOn(0.0, 60, 80), NoteOff(1.0, 60), NoteOn(2.875, 62, 80), NoteOff(3.0, 62),
              MeterChange(4.0, 4, 4),  # mid-bar: takes effect at the next bar line (beat 6)
              NoteOn(5.0, 64, 80), NoteOff(6.0, 64), NoteOn(9.5, 65, 80), NoteOff(10.0, 65)]
    names = tokens(tokenizer, assert_same_as_offline(tokenizer, events, meter=(3, 4)))
    assert names[:2] == ["Bar_None", "TimeSig_3/4"]
    assert "Position_23" in names  # 2.875 beats: the last eighth-of-a-beat of a 3/4 bar
    assert names[names.index("Pitch_64") - 1] == "Position_16"  # beat 5 is still in bar 2 (3/4)
    assert names[-6:] == ["Bar_None", "TimeSig_4/4", "Position_28", "Pitch_65", "Velocity_79",
                          "Duration_0.4.8"]


def test_online_encoder_meter_change_just_after_bar_line(tokenizer) -> None:
    # A meter event a little after a bar line still changes that bar (miditok truncates its
    # time to the grid), so the bar's tokens must wait for it even after the note there ended.
    enc = OnlineEncoder(tokenizer)
    events = [NoteOn(0.0, 60, 80), NoteOff(1.0, 60), NoteOn(4.0, 62, 80), NoteOff(4.05, 62)]
    out = [i for ev in events for i in enc.feed(ev)] + enc.advance(4.08)
    assert "Pitch_62" not in tokens(tokenizer, out)
    later = [MeterChange(4.1, 3, 4), NoteOn(7.5, 64, 80), NoteOff(8.0, 64)]
    out += [i for ev in later for i in enc.feed(ev)] + enc.flush()
    assert out == offline_ids(tokenizer, record(events + later, tpq=960, tempo=120.0, meter=(4, 4)))
    assert tokens(tokenizer, out)[7:10] == ["Bar_None", "TimeSig_3/4", "Position_0"]


def test_online_encoder_meter_change_and_back_in_one_bar(tokenizer) -> None:
    # 4/4 -> 3/4 -> 4/4 within one bar: both changes vanish, so no bar follows the last note.
    events = [NoteOn(0.0, 60, 80), MeterChange(1.0, 3, 4), MeterChange(2.0, 2, 4), MeterChange(2.5, 4, 4),
              NoteOff(3.0, 60), MeterChange(5.0, 3, 4), MeterChange(5.5, 4, 4)]
    names = tokens(tokenizer, assert_same_as_offline(tokenizer, events))
    assert names.count("Bar_None") == 1 and names[-1] == "Duration_3.0.8"


def test_online_encoder_held_note_flush_and_errors(tokenizer) -> None:
    enc = OnlineEncoder(tokenizer, meter=(6, 8), denominators=[8])
    out = enc.feed(NoteOn(0.0, 60, 80)) + enc.feed(NoteOn(0.5, 61, 0))  # velocity 0: a release
    with pytest.raises(InvalidEventError):
        enc.feed(NoteOn(1.0, 128, 80))
    with pytest.raises(UndeclaredMeterError):
        enc.feed(MeterChange(1.0, 3, 4))
    assert enc.watermark_beats == 0.5  # rejected events change nothing
    assert enc.held_pitches == [60]
    out += enc.advance(0.5)
    out += enc.feed(NoteOff(0.2, 60))  # late: moved to the watermark
    assert enc.late_events == 1
    out += enc.flush(2.0)
    # In 6/8 a beat is an eighth note: the half-quarter note lasts one beat.
    assert tokens(tokenizer, out) == ["Bar_None", "TimeSig_6/8", "Position_0", "Tempo_121.29",
                                      "Pitch_60", "Velocity_79", "Duration_1.0.8"]
    with pytest.raises(EncoderFinishedError):
        enc.feed(NoteOn(3.0, 60, 80))


def test_qpm_to_mspq_matches_symusic() -> None:
    rng = random.Random(0)
    for qpm in [rng.uniform(10, 400) for _ in range(2000)] + [120.0, 60.0, 97.3]:
        assert qpm_to_mspq(qpm) == Tempo(0, qpm).mspq


def test_online_encoder_every_tempo_and_velocity_bin(tokenizer) -> None:
    rng = random.Random(7)
    events: list[PerformanceEvent] = []
    for i, qpm in enumerate([*tokenizer.tempos, *(rng.uniform(30, 260) for _ in range(40))]):
        events.append(TempoChange(2.0 * i, float(qpm)))
        events.append(NoteOn(2.0 * i, 60, 1 + (3 * i) % 127))
        events.append(NoteOff(2.0 * i + 1, 60))
    assert_same_as_offline(tokenizer, events)
