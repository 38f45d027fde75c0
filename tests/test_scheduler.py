"""OutputScheduler: order, completeness and silence after stop, in memory and through real JACK.

No timing assertions: when messages leave is measured by `measure_grid_timing` (docs/timing.md),
not asserted here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from daemon.errors import InvalidMidiMessage, SchedulerStoppedError
from daemon.midi_events import (
    ALL_NOTES_OFF,
    SUSTAIN_PEDAL,
    MidiBytes,
    control_change,
    note_off,
    note_on,
)
from daemon.midi_ports import MidiConfig, MidiPorts
from daemon.scheduler import (
    OutputScheduler,
    measure_grid_timing,
    short_switch_interval,
    timing_report,
)
from tests.fixtures.jack import JackMidiRecorder, unique_client_name


class RecordingSender:
    """The injected sender: keeps (send time, message) like a port would see them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: list[tuple[float, MidiBytes]] = []

    def __call__(self, message: MidiBytes) -> None:
        with self.lock:
            self.sent.append((time.perf_counter(), tuple(message)))

    @property
    def messages(self) -> list[MidiBytes]:
        with self.lock:
            return [m for _, m in self.sent]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[MidiBytes]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.messages


def note_pairs_balanced(messages: list[MidiBytes]) -> bool:
    """Every Note On is followed, later in the list, by a Note Off of the same channel and key."""
    sounding: dict[tuple[int, int], int] = {}
    for m in messages:
        kind, key = m[0] & 0xF0, (m[0] & 0x0F, m[1]) if len(m) > 1 else None
        if kind == 0x90 and m[2] > 0:
            sounding[key] = sounding.get(key, 0) + 1
        elif kind == 0x80 or (kind == 0x90 and m[2] == 0):
            sounding.pop(key, None)
    return not sounding


# -- in memory ------------------------------------------------------------------------------------


def test_scheduler_sends_in_time_order_with_note_offs_first_at_equal_times():
    sender = RecordingSender()
    with OutputScheduler(sender) as scheduler:
        t0 = time.perf_counter() + 0.05
        # Scheduled out of order; at t0 + 0.02 a repeated key: its Note Off must go first.
        scheduler.schedule(t0 + 0.02, note_on(0, 60, 90))
        scheduler.schedule(t0, note_on(0, 60, 80))
        scheduler.schedule(t0 + 0.02, note_off(0, 60))
        scheduler.schedule(t0 + 0.01, note_on(1, 64, 70))
        scheduler.schedule(t0 + 0.03, note_off(1, 64))
        scheduler.schedule(t0 + 0.04, note_off(0, 60))
        sent = sender.wait_for(6)
    assert sent[:6] == [
        note_on(0, 60, 80),
        note_on(1, 64, 70),
        note_off(0, 60),
        note_on(0, 60, 90),
        note_off(1, 64),
        note_off(0, 60),
    ]
    times = [t for t, _ in sender.sent[:6]]
    assert times == sorted(times)
    assert scheduler.stats.sent >= 6 and scheduler.stats.send_errors == 0


def test_scheduler_sends_past_times_at_once():
    sender = RecordingSender()
    with OutputScheduler(sender) as scheduler:
        scheduler.schedule(time.perf_counter() - 1.0, note_on(2, 50, 10))
        assert sender.wait_for(1)[0] == note_on(2, 50, 10)
        assert scheduler.sounding_notes == {(2, 50)}


def test_scheduler_stop_all_cancels_pending_and_silences_every_channel_used():
    sender = RecordingSender()
    scheduler = OutputScheduler(sender).start()
    now = time.perf_counter()
    scheduler.schedule_many(
        [
            (now, note_on(0, 60, 90)),
            (now, note_on(3, 67, 90)),
            (now, control_change(3, SUSTAIN_PEDAL, 127)),
            (now + 10.0, note_off(0, 60)),  # would end far later
            (now + 10.0, note_off(3, 67)),
            (now + 5.0, note_on(0, 72, 90)),  # never starts
        ]
    )
    sender.wait_for(3)
    assert scheduler.sounding_notes == {(0, 60), (3, 67)}
    cancelled = scheduler.stop_all()
    assert cancelled == 3
    assert scheduler.pending == 0 and scheduler.sounding_notes == frozenset()
    tail = sender.messages[3:]
    assert tail == [
        note_off(0, 60),
        note_off(3, 67),
        control_change(3, SUSTAIN_PEDAL, 0),
        control_change(0, ALL_NOTES_OFF, 0),
        control_change(3, ALL_NOTES_OFF, 0),
    ]
    # A panic also covers channels never used.
    scheduler.stop_all(extra_channels=range(16))
    assert sum(1 for m in sender.messages if m[1:] == (ALL_NOTES_OFF, 0)) == 2 + 16
    scheduler.close()
    assert note_pairs_balanced(sender.messages)


def test_scheduler_cancel_after_keeps_the_note_offs_of_started_notes():
    sender = RecordingSender()
    with OutputScheduler(sender) as scheduler:
        now = time.perf_counter()
        scheduler.schedule_many(
            [
                (now + 0.30, note_on(0, 60, 90)),  # starts before the cut
                (now + 0.90, note_off(0, 60)),  # ends after it: kept
                (now + 0.60, note_on(0, 62, 90)),  # after the cut: dropped
                (now + 0.70, note_off(0, 62)),  # dropped with it
            ]
        )
        dropped = scheduler.cancel_after(now + 0.5)
        assert dropped == 2
        assert scheduler.pending == 2
        sent = sender.wait_for(2, timeout=3.0)
    assert sent[:2] == [note_on(0, 60, 90), note_off(0, 60)]


def test_scheduler_rejects_bad_messages_and_use_when_stopped():
    scheduler = OutputScheduler(RecordingSender())
    with pytest.raises(SchedulerStoppedError):
        scheduler.schedule(0.0, note_on(0, 60, 1))
    with scheduler:
        with pytest.raises(InvalidMidiMessage):
            scheduler.schedule(0.0, [0x90, 60])
        with pytest.raises(InvalidMidiMessage):
            scheduler.schedule_many([(0.0, note_on(0, 60, 1)), (0.0, [0x90, 200, 1])])
        assert scheduler.pending == 0  # all or nothing
    with pytest.raises(SchedulerStoppedError):
        scheduler.schedule(0.0, note_on(0, 60, 1))


def test_scheduler_counts_failed_sends_and_keeps_going():
    """A closed MIDI output raises on send; the scheduler logs, counts and continues."""
    closed_ports = MidiPorts(MidiConfig(api="jack"))
    calls: list[MidiBytes] = []

    def send(message: MidiBytes) -> None:
        calls.append(message)
        if message[1] == 61:
            closed_ports.send(message)

    with OutputScheduler(send) as scheduler:
        now = time.perf_counter()
        scheduler.schedule_many([(now, note_on(0, 61, 1)), (now + 0.01, note_on(0, 62, 1))])
        deadline = time.monotonic() + 5
        while scheduler.stats.sent < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.stats.send_errors == 1
        assert scheduler.sounding_notes == {(0, 62)}  # the failed Note On is not sounding


def test_timing_report_percentiles():
    scheduled = [float(i) for i in range(100)]
    received = [t + (i % 10) / 1000.0 for i, t in enumerate(scheduled)]  # 0..9 ms late
    report = timing_report(scheduled, received[:99])
    assert report.count == 99 and report.missing == 1
    assert report.max_ms == pytest.approx(9.0)
    assert report.p50_ms == pytest.approx(4.0)
    assert report.p99_ms == pytest.approx(9.0)


def test_short_switch_interval_restores_the_previous_value():
    import sys

    before = sys.getswitchinterval()
    with short_switch_interval(0.0005) as previous:
        assert previous == before
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == before


# -- through real JACK ----------------------------------------------------------------------------


def run_with_output(jack_server: Any, body: Any) -> Any:
    """Open the daemon's output port, connect a recorder client to it, run `body(ports, recorder)`."""
    config = MidiConfig(api="jack", in_port="", out_port=unique_client_name("rwkv-out"))
    recorder = JackMidiRecorder(jack_server)

    async def main() -> Any:
        async with MidiPorts(config) as ports:
            jack_server.connect(jack_server.wait_for_port(f"{config.out_port}:"), recorder.port)
            return await asyncio.to_thread(body, ports, recorder)

    try:
        return asyncio.run(main())
    finally:
        recorder.close()


def test_scheduler_through_jack_delivers_every_note_in_order(jack_server):
    def body(ports: MidiPorts, recorder: JackMidiRecorder) -> None:
        step = 0.04
        with OutputScheduler(ports.send) as scheduler:
            start = time.perf_counter() + 0.1
            expected = []
            for i in range(24):
                expected.append((start + i * step, note_on(i % 2, 48 + i, 64 + i)))
                expected.append((start + i * step + step / 2, note_off(i % 2, 48 + i)))
            scheduler.schedule_many(reversed(expected))  # order of scheduling must not matter
            received = recorder.wait_for(len(expected))
            assert received == [m for _, m in expected]
            arrivals = [t for t, _ in recorder.timed_messages]
            assert arrivals == sorted(arrivals)
        # Leaving the block sent All Notes Off on both channels used.
        tail = recorder.wait_for(len(expected) + 2)[len(expected) :]
        assert tail == [control_change(0, ALL_NOTES_OFF, 0), control_change(1, ALL_NOTES_OFF, 0)]

    run_with_output(jack_server, body)


def test_scheduler_stop_all_through_jack_leaves_no_note_hanging(jack_server):
    def body(ports: MidiPorts, recorder: JackMidiRecorder) -> None:
        with OutputScheduler(ports.send) as scheduler:
            start = time.perf_counter() + 0.05
            # Long overlapping notes: several sound at once when the stop comes.
            for i in range(16):
                scheduler.schedule(start + i * 0.02, note_on(0, 60 + i, 90))
                scheduler.schedule(start + i * 0.02 + 1.0, note_off(0, 60 + i))
            deadline = time.monotonic() + 5
            while len(scheduler.sounding_notes) < 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            sounding = scheduler.sounding_notes
            assert len(sounding) >= 4
            scheduler.stop_all()
            received = recorder.wait_for(2 * len(sounding) + 1)
        time.sleep(0.1)
        received = recorder.messages
        assert note_pairs_balanced(received)
        ons = [m for m in received if m[0] == 0x90]
        assert len(ons) == len(sounding) < 16  # the rest were cancelled, never started
        last_all_off = max(i for i, m in enumerate(received) if m == control_change(0, ALL_NOTES_OFF, 0))
        assert all(m[0] != 0x90 for m in received[last_all_off:])

    run_with_output(jack_server, body)


def test_measure_grid_timing_through_jack_reports_every_message(jack_server):
    timing = measure_grid_timing(notes=16, bpm=240.0)
    for report in (timing.received, timing.sent):
        assert report.count == 32 and report.missing == 0
        assert 0.0 <= report.p50_ms <= report.p99_ms <= report.max_ms
