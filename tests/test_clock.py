"""Clocks: pure beat/bar/tempo arithmetic, MIDI clock followed through real JACK, Ableton Link peers."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import pytest

from daemon.clock import (
    BarGrid,
    ClockConfig,
    InternalClock,
    LinkClock,
    Meter,
    MidiClock,
    TempoChanged,
    TempoEstimator,
    Timeline,
    TransportChanged,
    make_clock,
)
from daemon.errors import ClockError, ClockNotRunningError
from daemon.midi_events import ClockTick, Continue, NoteOn, SongPosition, Start, Stop
from daemon.midi_ports import MidiConfig, MidiPorts
from daemon.scheduler import OutputScheduler
from model.settings import ConfigError, load_section
from tests.fixtures.jack import JackMidiSender, unique_client_name

# -- meter, timeline, bars ------------------------------------------------------------------------


def test_meter_parse_and_beats_per_bar():
    assert Meter.parse("4/4").beats_per_bar == 4.0
    assert Meter.parse(" 3/4 ").beats_per_bar == 3.0
    assert Meter.parse("6/8").beats_per_bar == 3.0
    assert Meter.parse("7/8").beats_per_bar == 3.5
    assert str(Meter.parse("5/4")) == "5/4"
    for bad in ("4", "4/3", "0/4", "a/4", "4/4/4"):
        with pytest.raises(ValueError):
            Meter.parse(bad)


def test_timeline_tempo_change_keeps_the_beat_continuous():
    line = Timeline(120.0, origin_time=10.0)
    assert line.beat_at(11.0) == pytest.approx(2.0)
    beat = line.set_tempo(60.0, at=11.0)
    assert beat == pytest.approx(2.0)
    assert line.beat_at(11.0) == pytest.approx(2.0)
    assert line.beat_at(12.0) == pytest.approx(3.0)  # one beat per second now
    assert line.beat_at(10.5) == pytest.approx(1.0)  # before the change: the old tempo
    for b in (0.5, 2.0, 2.5, 7.25):
        assert line.beat_at(line.time_at(b)) == pytest.approx(b)
    with pytest.raises(ClockError):
        line.set_tempo(90.0, at=10.9)  # before the previous change
    with pytest.raises(ClockError):
        line.set_tempo(1000.0, at=12.0)


def test_bar_grid_boundaries_and_meter_change():
    grid = BarGrid(Meter(4, 4))
    assert grid.bar_index(0.0) == 0
    assert grid.bar_index(3.999) == 0
    assert grid.bar_index(4.0) == 1
    assert grid.bar_index(4.0 - 1e-9) == 1  # float error of a round trip counts as on the boundary
    assert grid.next_bar_beat(4.0) == 8.0  # strictly after
    assert grid.next_bar_beat(5.5) == 8.0
    assert grid.beat_in_bar(9.5) == pytest.approx(1.5)
    assert grid.bar_index(-0.5) == -1
    start = grid.set_meter(Meter(3, 4), at=9.0)  # inside bar 2 -> from bar 3 (beat 12)
    assert start == 12.0
    assert grid.bar_index(11.9) == 2
    assert grid.bar_index(12.0) == 3
    assert grid.bar_start(4) == 15.0
    assert grid.next_bar_beat(13.0) == 15.0
    assert grid.meter == Meter(3, 4)


def test_internal_clock_bars_and_tempo_events():
    clock = InternalClock(120.0, Meter(4, 4), start_time=100.0)
    assert clock.beat_at(101.0) == pytest.approx(2.0)
    assert clock.time_at(4.0) == pytest.approx(102.0)
    assert clock.next_bar_time(100.0) == pytest.approx(102.0)
    assert clock.next_bar_time(102.0) == pytest.approx(104.0)
    assert clock.bar_index(clock.beat_at(103.9)) == 1
    events: list[Any] = []
    clock.add_listener(events.append)
    clock.set_tempo(60.0, at=101.0)
    assert events == [TempoChanged(101.0, pytest.approx(2.0), 60.0, 120.0)]
    assert clock.next_bar_time(101.0) == pytest.approx(103.0)  # 2 beats left at 1 beat/s
    clock.remove_listener(events.append)
    clock.set_tempo(90.0, at=102.0)
    assert len(events) == 1
    with pytest.raises(ClockError, match="outside"):
        clock.set_tempo(5.0)


def test_clock_config_from_table_and_factory():
    cfg = load_section(ClockConfig, {"clock": {"source": "midi", "tempo": 96, "meter": "6/8"}}, "clock")
    clock = make_clock(cfg)
    assert isinstance(clock, MidiClock) and clock.tempo == 96.0 and clock.beats_per_bar == 3.0
    assert isinstance(make_clock(ClockConfig()), InternalClock)
    assert isinstance(make_clock(ClockConfig(source="link")), LinkClock)
    with pytest.raises(ConfigError, match="clock.tempo"):
        ClockConfig(tempo=1000.0)
    with pytest.raises(ConfigError, match="clock.meter"):
        ClockConfig(meter="4/5")
    with pytest.raises(ConfigError, match="clock.source"):
        load_section(ClockConfig, {"clock": {"source": "ptp"}}, "clock")


# -- tempo from MIDI clock pulses (pure) ----------------------------------------------------------


def pulse_times(segments: list[tuple[float, int]], start: float, jitter_s: float, seed: int) -> list[float]:
    """Arrival times of pulses: (bpm, count) segments played back to back, with uniform jitter."""
    rng = random.Random(seed)
    times, t = [], start
    for bpm, count in segments:
        for _ in range(count):
            times.append(t + rng.uniform(0.0, jitter_s))
            t += 60.0 / bpm / 24
    return times


def test_tempo_estimator_averages_jitter_and_follows_a_change():
    estimator = TempoEstimator(window=24)
    times = pulse_times([(120.0, 96), (90.0, 96)], start=50.0, jitter_s=0.001, seed=1)
    history = []
    for t in times:
        estimator.add(t)
        history.append(estimator.bpm)
    assert history[95] == pytest.approx(120.0, abs=0.5)
    # After the change, within two beats (48 pulses) the estimate is at the new tempo.
    assert all(abs(b - 90.0) < 0.5 for b in history[96 + 48 :])
    assert history[-1] == pytest.approx(90.0, abs=0.5)


def test_tempo_estimator_ignores_bunched_pulses_and_recovers_from_garbage():
    times = pulse_times([(120.0, 120)], start=0.0, jitter_s=0.0005, seed=2)
    for i in range(50, 56):
        times[i] = times[56]  # six pulses held up, then delivered together (a late cycle)
    estimator = TempoEstimator(window=24)
    for k, t in enumerate(times):
        estimator.add(t)
        if k >= 30:
            assert estimator.bpm == pytest.approx(120.0, abs=1.5), k
    # A burst of pulses on top of each other first, then a steady 100 BPM: no lock-up.
    estimator = TempoEstimator(window=24)
    for i in range(10):
        estimator.add(5.0 + i * 1e-5)
    for t in pulse_times([(100.0, 48)], start=5.01, jitter_s=0.0005, seed=3):
        estimator.add(t)
    assert estimator.bpm == pytest.approx(100.0, abs=1.0)


def test_tempo_estimator_restarts_after_a_pause():
    estimator = TempoEstimator(window=24)
    for t in pulse_times([(100.0, 48)], start=0.0, jitter_s=0.0, seed=0):
        estimator.add(t)
    assert estimator.bpm == pytest.approx(100.0)
    for t in pulse_times([(140.0, 30)], start=60.0, jitter_s=0.0, seed=0):  # a minute later
        estimator.add(t)
    assert estimator.bpm == pytest.approx(140.0)


def test_midi_clock_transport_position_and_events():
    clock = MidiClock(Meter(4, 4), initial_tempo=100.0)
    events: list[Any] = []
    clock.add_listener(events.append)
    assert not clock.running
    with pytest.raises(ClockNotRunningError):
        clock.time_at(1.0)
    period = 60.0 / 120.0 / 24
    clock.handle(Start(9.99))
    for i in range(48):  # two beats at 120 BPM
        clock.handle(ClockTick(10.0 + i * period))
    assert clock.running
    assert clock.tempo == pytest.approx(120.0)
    assert clock.beat_at(10.0 + 47 * period) == pytest.approx(47 / 24)
    assert clock.time_at(4.0) == pytest.approx(10.0 + 96 * period)  # beat 4 = next bar
    assert clock.next_bar_time(10.5) == pytest.approx(12.0)
    transport = [e for e in events if isinstance(e, TransportChanged)]
    assert transport == [TransportChanged(10.0, True, 0.0)]
    assert any(isinstance(e, TempoChanged) and e.bpm == pytest.approx(120.0) for e in events)

    clock.handle(Stop(11.0))
    assert not clock.running and clock.position_beat == pytest.approx(2.0)
    with pytest.raises(ClockNotRunningError):
        clock.next_bar_time(11.0)
    clock.handle(SongPosition(32, 11.5))  # 32 sixteenths = beat 8
    for i in range(10):  # pulses keep coming while stopped: tempo only
        clock.handle(ClockTick(11.6 + i * period))
    assert clock.position_beat == 8.0 and not clock.running
    clock.handle(Continue(11.9))
    clock.handle(ClockTick(12.0))
    assert clock.running
    assert clock.beat_at(12.0) == pytest.approx(8.0, abs=1e-3)
    assert events[-1] == TransportChanged(12.0, True, 8.0)
    with pytest.raises(ClockError, match="follows"):
        clock.set_tempo(100.0)
    assert clock.handle(Stop(12.1))
    assert not clock.handle(NoteOn(0, 60, 100, 12.2))  # not a clock event
    assert not InternalClock(120.0).handle(Start(0.0))  # only the MIDI clock uses transport


# -- MIDI clock through real JACK -----------------------------------------------------------------


def test_midi_clock_through_jack_follows_120_then_90_bpm(jack_server):
    """A real sender (the OutputScheduler on its own JACK client) plays Start and 24-ppqn clock:
    4 beats at 120 BPM, then 6 beats at 90 BPM; the daemon's port and MidiClock follow."""
    config = MidiConfig(api="jack", in_port=unique_client_name("rwkv-clock-in"), out_port="")
    sender = JackMidiSender(jack_server, prefix="clock-sender")
    first_segment, second_segment = 96, 144
    total = first_segment + second_segment

    async def main() -> list[tuple[int, float]]:
        clock = MidiClock(Meter(4, 4), initial_tempo=100.0)
        estimates: list[tuple[int, float]] = []
        async with MidiPorts(config) as ports:
            jack_server.connect(sender.port, jack_server.wait_for_port(f"{config.in_port}:"))
            with OutputScheduler(sender.send) as scheduler:
                t = time.perf_counter() + 0.2
                plan = [(t - 0.01, (0xFA,))]
                for bpm, count in ((120.0, first_segment), (90.0, second_segment)):
                    for _ in range(count):
                        plan.append((t, (0xF8,)))
                        t += 60.0 / bpm / 24
                scheduler.schedule_many(plan)
                while clock.ticks < total:
                    try:
                        event = await asyncio.wait_for(ports.receive(), 5.0)
                    except asyncio.TimeoutError:  # the builtin one only from Python 3.11
                        pytest.fail(f"only {clock.ticks} of {total} clock pulses arrived")
                    if clock.handle(event) and isinstance(event, ClockTick):
                        estimates.append((clock.ticks, clock.tempo))
            assert ports.stats.invalid == 0
        assert clock.running
        assert clock.position_beat == pytest.approx(total / 24)
        return estimates

    try:
        estimates = asyncio.run(asyncio.wait_for(main(), 60.0))
    finally:
        sender.close()
    tempo = dict(estimates)
    # The last two beats of each segment, so the estimate has had two beats to follow the
    # change. Medians, so that one stall of a busy test machine (pulses delivered in a burst)
    # does not decide the outcome; the pure tests above check the estimator pulse by pulse.
    late_120 = [tempo[k] for k in range(first_segment - 47, first_segment + 1)]
    late_90 = [tempo[k] for k in range(total - 47, total + 1)]
    assert statistics.median(late_120) == pytest.approx(120.0, abs=3.0)
    assert statistics.median(late_90) == pytest.approx(90.0, abs=3.0)


# -- Ableton Link -----------------------------------------------------------------------------------


def test_link_clock_two_peers_on_loopback_agree_on_tempo():
    pytest.importorskip("aalink", reason="aalink (optional, for clock source 'link') is not installed")

    async def main() -> None:
        async with LinkClock(120.0, Meter(4, 4)) as a, LinkClock(100.0, Meter(4, 4)) as b:
            deadline = time.monotonic() + 5.0
            while (a.num_peers < 1 or b.num_peers < 1) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if a.num_peers < 1:
                pytest.skip("Link peers did not find each other within 5 s (no multicast on loopback here)")
            heard: list[TempoChanged] = []
            b.add_listener(lambda e: heard.append(e) if isinstance(e, TempoChanged) else None)
            a.set_tempo(133.0)
            deadline = time.monotonic() + 5.0
            while abs(b.tempo - 133.0) > 0.01 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert b.tempo == pytest.approx(133.0, abs=0.01)
            assert heard and heard[-1].bpm == pytest.approx(133.0, abs=0.01)
            now = time.perf_counter()
            # Same session, same quantum: same beat and the same next bar boundary.
            assert a.beat_at(now) == pytest.approx(b.beat_at(now), abs=0.01)
            assert a.next_bar_time(now) == pytest.approx(b.next_bar_time(now), abs=0.005)
            assert b.time_at(b.beat_at(now)) == pytest.approx(now, abs=1e-4)

    asyncio.run(asyncio.wait_for(main(), 20.0))
