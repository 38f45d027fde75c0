"""The whole daemon under outside clocks and an unreliable broker, through real JACK ports:

- external MIDI clock on the input port drives the bar grid, and a tempo change is followed;
- an Ableton Link peer (a second Link session member in this process) sets the tempo and the
  bars, and the daemon's answers fall on that peer's bar lines;
- the mosquitto broker stops and comes back while the daemon plays: the music goes on and the
  bridge reconnects.

Answers are checked where they were scheduled (AnswerRecord: the bar line's time and every
message's due time, as the daemon's clock computed them) against the outside clock's own
timeline, and where they arrived (the recorder client).
"""

from __future__ import annotations

import asyncio
import bisect
import subprocess
import threading
import time

import pytest

from daemon.clock import LinkClock, Meter
from tests.test_daemon_jack import (  # noqa: F401 - session_factory and tiny_checkpoint are fixtures
    daemon_settings,
    note_pairs,
    session_factory,
    tiny_checkpoint,
)

# Due times computed by the daemon's clock against the outside clock's grid. The MIDI clock is
# extrapolated from pulses stamped at JACK-cycle resolution, up to two bars ahead.
MIDI_CLOCK_TOLERANCE_S = 0.015
LINK_TOLERANCE_S = 0.003  # both read the same Link session in one process
POSITION_BEATS = 1.0 / 8.0  # the REMI position grid of the default vocabulary


def unreleased_notes(session, timeout: float = 3.0) -> list[str]:
    """The recorder's note-ons never released, once the last note-offs have had `timeout` to
    arrive (the daemon has sent them when its status says nothing sounds; on a loaded machine
    the recorder's callback, which needs this process's interpreter lock, may lag behind)."""
    deadline = time.monotonic() + timeout
    while True:
        _, problems = note_pairs(session.recorder.timed_messages)
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.05)


def note_on_times(scheduled) -> list[float]:
    return [t for t, msg in scheduled if msg[0] & 0xF0 == 0x90 and msg[2] > 0]


class PulseTimeline:
    """The sender's 24-ppqn clock: pulse k (k = 0 is beat 0) at times[k]."""

    def __init__(self, times: list[float]):
        self.times = times

    def time_at(self, beat: float) -> float:
        return self.times[round(beat * 24)]

    def beat_at(self, t: float) -> float:
        k = min(max(bisect.bisect_right(self.times, t) - 1, 0), len(self.times) - 2)
        t0, t1 = self.times[k], self.times[k + 1]
        return (k + (t - t0) / (t1 - t0)) / 24.0


def off_grid_s(timeline, t: float) -> float:
    """Seconds from `t` to the nearest 1/8-beat point of an outside timeline."""
    beat = timeline.beat_at(t)
    return abs(t - timeline.time_at(round(beat / POSITION_BEATS) * POSITION_BEATS))


def test_external_midi_clock_drives_the_bars_and_a_tempo_change_is_followed(session_factory, tiny_checkpoint):  # noqa: F811
    """Start, 8 beats at 120 BPM, 16 at 90, Stop. Autopilot answers bar after bar; after the
    change the answers' bar lines and notes sit on the 90 BPM grid of the pulses sent."""
    session = session_factory(daemon_settings(
        tiny_checkpoint, 'clock.source="midi"', "daemon.mode=\"autopilot\"", "daemon.length_bars=1"))
    start = time.perf_counter() + 0.5
    pulses, t = [], start
    for bpm, beats in ((120.0, 8), (90.0, 16)):
        for _ in range(beats * 24):
            pulses.append(t)
            t += 60.0 / bpm / 24
    pulses.append(t)  # the pulse of the last bar line
    plan = [(start - 0.01, (0xFA,))] + [(p, (0xF8,)) for p in pulses] + [(pulses[-1] + 0.005, (0xFC,))]
    session.player.schedule_many(plan)
    timeline = PulseTimeline(pulses)
    change = timeline.time_at(8.0)

    time.sleep(max(0.0, pulses[-1] - time.perf_counter()) + 0.3)
    status = session.wait_status(lambda s: not s["clock_running"] and s["sounding"] == 0, 5.0, "the stop")
    assert status["tempo"] == pytest.approx(90.0, abs=2.0)
    assert status["failed"] == 0

    # Answers decided two beats after the change or later, and over before the Stop.
    settled = [a for a in session.daemon.recent_answers
               if a.start_time - session.settings.daemon.lead_ms / 1000 > change + 2 * 60 / 90
               and 4.0 * (a.bar + 1) <= 24.0]
    assert len(settled) >= 2, f"answers after the change: {[(a.bar, a.notes) for a in session.daemon.recent_answers]}"
    for answer in settled:
        # The bar line the daemon chose is the sender's bar line at 90 BPM (a daemon still at
        # 120 would be seconds off by now).
        assert abs(answer.start_time - timeline.time_at(4.0 * answer.bar)) < MIDI_CLOCK_TOLERANCE_S, answer
        errors = [off_grid_s(timeline, on) for on in note_on_times(answer.scheduled)]
        assert errors and max(errors) < MIDI_CLOCK_TOLERANCE_S, (answer.bar, errors)
    # Stop silenced everything: every note that started was released.
    assert unreleased_notes(session) == []


class LinkPeer:
    """Another member of the Link session, on a thread with its own event loop."""

    def __init__(self, tempo: float):
        self._ready = threading.Event()
        self._done: asyncio.Event | None = None
        self.clock: LinkClock | None = None
        self._tempo = tempo
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the Link peer did not start"

    async def _main(self) -> None:
        self._loop, self._done = asyncio.get_running_loop(), asyncio.Event()
        async with LinkClock(self._tempo, Meter(4, 4)) as clock:
            self.clock = clock
            self._ready.set()
            await self._done.wait()

    def set_tempo(self, bpm: float) -> None:
        assert self._loop is not None and self.clock is not None
        self._loop.call_soon_threadsafe(self.clock.set_tempo, bpm)

    def close(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)


def test_the_daemon_follows_a_link_peer_tempo_and_bar_lines(session_factory, tiny_checkpoint):  # noqa: F811
    pytest.importorskip("aalink", reason="aalink (optional, for clock source 'link') is not installed")
    peer = LinkPeer(100.0)
    try:
        session = session_factory(daemon_settings(
            tiny_checkpoint, 'clock.source="link"', "daemon.mode=\"off\"", "daemon.length_bars=1"))
        deadline = time.monotonic() + 5.0
        while peer.clock.num_peers < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        if peer.clock.num_peers < 1:
            pytest.skip("Link peers did not find each other within 5 s (no multicast on loopback here)")
        peer.set_tempo(137.0)
        session.wait_status(lambda s: abs(s["tempo"] - 137.0) < 0.01, 5.0, "the peer's tempo")
        assert session.osc("mode", "autopilot") == ("/rwkv/ack", ("/rwkv/mode",))
        time.sleep(4 * 4 * 60 / 137.0)  # four bars
        assert session.osc("mode", "off") == ("/rwkv/ack", ("/rwkv/mode",))
        session.wait_status(lambda s: s["sounding"] == 0 and s["answers_active"] == 0, 5.0, "silence")

        answers = list(session.daemon.recent_answers)
        assert len(answers) >= 2
        for answer in answers:
            # Link peers share the phase within the bar, not the beat count: the daemon's bar
            # line is one of the peer's bar lines, whatever number each gives it.
            peer_bar = round(peer.clock.beat_at(answer.start_time) / 4.0)
            assert abs(answer.start_time - peer.clock.time_at(4.0 * peer_bar)) < LINK_TOLERANCE_S, answer
            errors = [off_grid_s(peer.clock, on) for on in note_on_times(answer.scheduled)]
            assert max(errors, default=0.0) < LINK_TOLERANCE_S, (answer.bar, errors)
        assert sum(a.notes for a in answers) > 0
        assert unreleased_notes(session) == []
    finally:
        peer.close()


def test_music_goes_on_while_the_broker_is_away_and_the_bridge_reconnects(session_factory, tiny_checkpoint,  # noqa: F811
                                                                         mosquitto):
    session = session_factory(daemon_settings(
        tiny_checkpoint, "daemon.mode=\"autopilot\"", "daemon.length_bars=1", "mqtt.enabled=true",
        f'mqtt.host="{mosquitto.host}"', f"mqtt.port={mosquitto.port}", 'mqtt.instance="clocktest"'))
    session.wait_status(lambda s: s["mqtt_connected"], 10.0, "the MQTT connection")
    answers_before = session.status()["answers"]

    mosquitto.stop()
    away = time.perf_counter()
    session.wait_status(lambda s: not s["mqtt_connected"], 10.0, "the bridge to notice")
    time.sleep(3 * 2.0)  # three bars at 120 BPM without a broker
    back = time.perf_counter()
    status = session.status()
    assert status["answers"] >= answers_before + 2, "the answers stopped with the broker"
    played = [t for t, _ in note_pairs(session.recorder.timed_messages)[0] if away < t < back]
    assert played, "no note was played while the broker was away"

    mosquitto.start()
    session.wait_status(lambda s: s["mqtt_connected"], 20.0, "the bridge to reconnect")
    topic = "rwkv-music/clocktest/set/temperature"
    subprocess.run(["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-q", "1", "-t", topic,
                    "-m", "0.5"], check=True, timeout=10)
    session.wait_status(lambda s: s["temperature"] == 0.5, 10.0, "the temperature set over MQTT")
    assert session.osc("mode", "off") == ("/rwkv/ack", ("/rwkv/mode",))
    status = session.wait_status(lambda s: s["sounding"] == 0 and s["answers_active"] == 0, 5.0, "silence")
    assert status["failed"] == 0
    assert unreleased_notes(session) == []
