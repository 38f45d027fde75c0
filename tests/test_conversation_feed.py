"""ConversationFeed: events at clock beats reach the engine as the ids an encoder gives for the
same events at beats from the feed's bar line; refusals are counted; reset, transport and
shutdown paths end or carry over what the old encoder held.

The reference is a real OnlineEncoder fed the same events directly; the engine side is a list
that records every batch of ids handed over.
"""

from __future__ import annotations

import pytest

from daemon.clock import InternalClock, Meter
from daemon.conversation_feed import ENCODER_LAG_S, ConversationFeed
from daemon.encoder import NoteOff, NoteOn, OnlineEncoder, SustainPedal
from daemon.status import DaemonStats
from model.vocab import build_tokenizer

TEMPO = 100.0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def parts(tokenizer):
    clock = InternalClock(tempo=TEMPO, meter=Meter(4, 4), start_time=0.0)
    stats = DaemonStats()
    batches: list[list[int]] = []
    feed = ConversationFeed(tokenizer, clock, stats, batches.append)
    return feed, stats, batches


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


# (kind, clock beat, fields): a phrase of the player's, with the pedal, from the bar at beat 8
PHRASE = [
    (NoteOn, 8.0, {"pitch": 60, "velocity": 80}),
    (NoteOn, 8.5, {"pitch": 64, "velocity": 72}),
    (SustainPedal, 8.75, {"down": True}),
    (NoteOff, 9.0, {"pitch": 60}),
    (NoteOn, 10.0, {"pitch": 67, "velocity": 90}),
    (NoteOff, 10.5, {"pitch": 64}),
    (SustainPedal, 11.0, {"down": False}),
    (NoteOff, 11.5, {"pitch": 67}),
]


def test_events_at_clock_beats_give_the_ids_of_an_encoder_fed_beats_from_the_bar_line(parts, tokenizer):
    feed, stats, batches = parts
    feed.restart(8.0, flush=False)
    for kind, beat, fields in PHRASE:
        feed.hear(kind, beat, **fields)
    feed.advance(16.0)

    reference = OnlineEncoder(tokenizer, tempo=TEMPO, meter=(4, 4))
    expected: list[int] = []
    for kind, beat, fields in PHRASE:
        expected += reference.feed(kind(beats=beat - 8.0, **fields))
    expected += reference.advance(16.0 - ENCODER_LAG_S * TEMPO / 60.0 - 8.0)

    assert flat(batches) == expected
    assert len(expected) > len(PHRASE)  # bars, positions, pitches, velocities, durations
    assert stats.tokens_fed == len(expected)
    assert stats.encoder_rejected == 0


def test_advance_moves_the_encoder_to_the_lag_before_now_and_never_back(parts, tokenizer):
    feed, _, batches = parts
    reference = OnlineEncoder(tokenizer, tempo=TEMPO, meter=(4, 4))
    lag_beats = ENCODER_LAG_S * TEMPO / 60.0
    feed.hear(NoteOn, 0.0, pitch=60, velocity=80)
    feed.hear(NoteOff, 0.5, pitch=60)
    expected = reference.feed(NoteOn(beats=0.0, pitch=60, velocity=80))
    expected += reference.feed(NoteOff(beats=0.5, pitch=60))
    for now in (2.0, 4.0 + lag_beats / 2, 4.0 + 2 * lag_beats, 12.5, 11.0):
        feed.advance(now)
        if now - lag_beats > reference.watermark_beats:
            expected += reference.advance(now - lag_beats)
    assert flat(batches) == expected
    assert len(expected) > 7  # the note and bar lines passed after it
    assert feed.encoder.watermark_beats == pytest.approx(12.5 - lag_beats)


def test_an_event_before_the_bar_line_is_ignored_and_a_refused_one_is_counted(parts):
    feed, stats, batches = parts
    feed.restart(4.0, flush=False)
    feed.hear(NoteOn, 3.5, pitch=60, velocity=80)  # stamped before a reset's bar line
    assert batches == [] and stats.encoder_rejected == 0
    feed.hear(NoteOn, 4.5, pitch=200, velocity=80)  # no such pitch
    assert stats.encoder_rejected == 1
    assert batches == []


def test_restart_with_flush_feeds_what_the_old_encoder_held_and_without_forgets_it(tokenizer):
    def held_then_restart(flush: bool) -> list[int]:
        clock = InternalClock(tempo=TEMPO, meter=Meter(4, 4), start_time=0.0)
        batches: list[list[int]] = []
        feed = ConversationFeed(tokenizer, clock, DaemonStats(), batches.append)
        feed.hear(NoteOn, 0.0, pitch=60, velocity=80)  # still held: not final yet
        fed_before = flat(batches)
        feed.restart(8.0, flush=flush)
        return flat(batches)[len(fed_before):]

    assert held_then_restart(flush=True)  # the transport moved: the held note is kept
    assert held_then_restart(flush=False) == []  # a reset: forgotten


def test_after_stop_nothing_reaches_the_engine(parts):
    feed, stats, batches = parts
    feed.stop()
    feed.hear(NoteOn, 0.0, pitch=60, velocity=80)
    feed.hear(NoteOff, 1.0, pitch=60)
    feed.advance(8.0)
    feed.restart(8.0, flush=True)
    assert batches == [] and stats.tokens_fed == 0
