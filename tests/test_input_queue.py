"""The reader thread's bounded queue of MIDI input (daemon.input_queue): oldest dropped first,
a dropped release owed to the consumer, a driver error after the events before it. The same
policy through real JACK ports: tests/test_midi_ports.py and tests/test_reliability_midi.py."""

from __future__ import annotations

import threading

import pytest

from daemon.errors import MidiPortError
from daemon.input_queue import PEDAL_KEY, InputQueue, release_key
from daemon.midi_events import ControlChange, NoteOff, NoteOn


def drain(queue: InputQueue) -> list:
    events = []
    while (event := queue.take()[0]) is not None:
        events.append(event)
    return events


def mod_wheel(value: int, t: float) -> ControlChange:
    return ControlChange(0, 1, value, t)


def test_a_full_queue_drops_the_oldest_and_keeps_the_order_of_the_rest():
    queue = InputQueue(4)
    pushed = [mod_wheel(v, float(v)) for v in range(7)]
    assert [queue.push(e) for e in pushed] == [False] * 4 + [True] * 3
    assert len(queue) == 4
    assert drain(queue) == pushed[3:]
    assert queue.take() == (None, None)


def test_a_dropped_note_off_comes_before_the_next_note_on_of_its_key():
    queue = InputQueue(2)
    queue.push(NoteOff(0, 60, 0, 0.0))
    queue.push(mod_wheel(1, 1.0))
    assert queue.push(NoteOn(0, 60, 90, 2.0))  # the note-off of 60 is dropped, and owed
    assert drain(queue) == [mod_wheel(1, 1.0), NoteOff(0, 60, 0, 0.0), NoteOn(0, 60, 90, 2.0)]


def test_owed_releases_come_once_the_queue_is_empty_in_the_order_they_were_dropped():
    queue = InputQueue(2)
    releases = [NoteOff(0, 64, 0, 0.0), ControlChange(0, 64, 0, 1.0), NoteOff(1, 64, 0, 2.0)]
    for event in releases:
        queue.push(event)
    for v in range(4):
        queue.push(mod_wheel(v, 3.0 + v))  # pushes all three releases out
    assert drain(queue) == [mod_wheel(2, 5.0), mod_wheel(3, 6.0), *releases]


def test_one_release_is_owed_per_key_the_latest():
    queue = InputQueue(1)
    queue.push(NoteOff(0, 60, 0, 0.0))
    queue.push(NoteOff(0, 60, 10, 1.0))
    queue.push(mod_wheel(0, 2.0))
    assert drain(queue) == [mod_wheel(0, 2.0), NoteOff(0, 60, 10, 1.0)]


def test_a_note_on_of_another_key_or_channel_takes_no_owed_release():
    queue = InputQueue(1)
    queue.push(NoteOff(0, 60, 0, 0.0))
    queue.push(NoteOn(1, 60, 90, 1.0))  # channel 1: the owed release is channel 0's
    assert queue.take()[0] == NoteOn(1, 60, 90, 1.0)
    assert queue.take()[0] == NoteOff(0, 60, 0, 0.0)


def test_release_keys():
    assert release_key(NoteOff(3, 60, 0, 0.0)) == (3, 60)
    assert release_key(ControlChange(3, 64, 10, 0.0)) == (3, PEDAL_KEY)  # pedal up
    assert release_key(ControlChange(3, 64, 100, 0.0)) is None  # pedal down
    assert release_key(NoteOn(3, 60, 90, 0.0)) is None
    assert release_key(mod_wheel(0, 0.0)) is None


def test_a_failure_comes_after_the_events_before_it_and_the_first_one_stays():
    queue = InputQueue(8)
    queue.push(mod_wheel(1, 0.0))
    first, second = MidiPortError("in", "gone"), MidiPortError("in", "again")
    queue.fail(first)
    queue.fail(second)
    assert queue.take() == (mod_wheel(1, 0.0), first)  # the caller hands out the event first
    assert queue.take() == (None, first)


def test_a_queue_holds_at_least_one_event():
    with pytest.raises(ValueError, match="at least one"):
        InputQueue(0)


def test_a_producer_thread_and_a_consumer_lose_nothing_but_the_counted_drops():
    queue = InputQueue(16)
    n = 20_000
    dropped = 0
    taken = []

    def produce() -> None:
        nonlocal dropped
        for i in range(n):
            dropped += queue.push(mod_wheel(i % 128, float(i)))

    producer = threading.Thread(target=produce)
    producer.start()
    while producer.is_alive() or len(queue):
        event, _ = queue.take()
        if event is not None:
            taken.append(event.time)
    producer.join()
    assert len(taken) + dropped == n
    assert taken == sorted(taken)  # in order, whatever was dropped
    assert taken[-1] == n - 1  # the newest is never the one dropped
