"""Reliability of the MIDI input: a real `rwkv-music daemon` process on the test JACK server is
fed garbage and floods by independent JACK clients, and must stay up, answer OSC over real UDP,
keep its memory, release every note and play normally afterwards.

The daemon runs as a process of its own (`DaemonProcess`), so a crash shows as an exit status
instead of taking the test session with it, and its resident memory is its own. The figures of
the flood (status reply times, memory) are printed with `-s` and kept as test properties; the
assertions bound them loosely (this machine is shared), docs/reliability.md has the numbers.
"""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.midi_events import ALL_NOTES_OFF, control_change, note_off, note_on
from daemon.osc_server import send_and_wait, status_values
from tests.fixtures.jack import JackMidiRecorder, JackMidiSender, JackServer, unique_client_name
from tests.test_daemon_jack import save_random_checkpoint, unreleased_after_settling
from tools.soak import process_tree_rss_kib

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class DaemonProcess:
    """`python -m daemon` on a JACK server, with unique port names and a free OSC port.

    `overrides` are `--set` values. The process inherits JACK_DEFAULT_SERVER from `env`
    (default: this process's environment). `stop()` sends SIGINT and returns the exit status.
    """

    def __init__(
        self,
        checkpoint: Path,
        workdir: Path,
        *overrides: str,
        env: dict[str, str] | None = None,
        in_port: str | None = None,
        out_port: str | None = None,
    ):
        self.in_port = in_port or unique_client_name("rel-in")
        self.out_port = out_port or unique_client_name("rel-out")
        self.log_path = workdir / f"daemon-{self.in_port}.log"
        command = [
            sys.executable, "-m", "daemon", "--checkpoint", str(checkpoint),
            "--set", "midi.api=jack", "--set", f'midi.in_port="{self.in_port}"',
            "--set", f'midi.out_port="{self.out_port}"', "--set", "osc.port=0",
            "--set", "daemon.seed=7", "--set", "daemon.watch=false",
        ]  # fmt: skip
        for override in overrides:
            command += ["--set", override]
        environment = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while "ready: model" not in self.log_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the daemon did not start:\n{self.log_text()}")
            time.sleep(0.05)
        match = re.search(r"OSC ([0-9.]+):(\d+)", self.log_text())
        assert match, self.log_text()
        self.osc_address = (match.group(1), int(match.group(2)))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def osc(self, tail: str, *args: Any, timeout: float = 5.0) -> tuple[str, tuple[Any, ...]]:
        return send_and_wait(*self.osc_address, f"/rwkv/{tail}", list(args), timeout=timeout)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        reply, args = self.osc("status", timeout=timeout)
        assert reply == "/rwkv/status", (reply, args)
        return status_values(args)

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.alive, f"the daemon died while waiting for {what}:\n{self.log_text()[-3000:]}"
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; status: {status}\ndaemon log:\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)

    def rss_kib(self) -> int:
        return process_tree_rss_kib(self.process.pid)

    def stop(self) -> int:
        """SIGINT, then wait; the exit status (a hang is killed and reported as an error)."""
        if self.alive:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the daemon did not stop on SIGINT:\n{self.log_text()[-3000:]}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class StatusProbe:
    """A thread that asks /rwkv/status every `interval` seconds and keeps the reply times (ms);
    an unanswered request counts as infinity."""

    def __init__(self, daemon: DaemonProcess, interval: float = 0.05, timeout: float = 1.0):
        self.daemon, self.interval, self.timeout = daemon, interval, timeout
        self.times_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                reply, _ = self.daemon.osc("status", timeout=self.timeout)
                ok = reply == "/rwkv/status"
            except Exception:  # noqa: BLE001 - no reply, refused: counted as unanswered
                ok = False
            self.times_ms.append((time.perf_counter() - start) * 1000.0 if ok else float("inf"))
            self._stop.wait(self.interval)

    def __enter__(self) -> StatusProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        times = sorted(self.times_ms)
        return {
            "requests": len(times),
            "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2),
            "max_ms": round(times[-1], 2),
        }


# A separate process floods the daemon's input, so the sending costs this process nothing.
FLOOD_PROGRAM = r"""
import random, sys, time
import rtmidi
from daemon.jack_watch import JackServerWatch
client, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
watch = JackServerWatch(client + " watch")  # each change settles (daemon.jack_watch)
watch.open()
with watch.change():
    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=client)
with watch.change():
    out.open_virtual_port("out")
print("ready", flush=True)
sys.stdin.readline()
rng = random.Random(1)
sounding, sent, start = [], 0, time.perf_counter()
while (elapsed := time.perf_counter() - start) < seconds:
    while sent < int(elapsed * rate):
        if sent % 2 == 0 or not sounding:  # a note-on on any of the 16 channels...
            key = (rng.randrange(16), rng.randrange(21, 109))
            out.send_message([0x90 | key[0], key[1], rng.randrange(1, 128)])
            sounding.append(key)
        else:  # ...and a note-off for one that sounds, mostly the oldest
            channel, note = sounding.pop(0 if len(sounding) > 24 else rng.randrange(len(sounding)))
            out.send_message([0x80 | channel, note, 0])
        sent += 1
    time.sleep(0.001)
for channel, note in sounding:
    out.send_message([0x80 | channel, note, 0])
    sent += 1
print(sent, flush=True)
time.sleep(0.5)
out.delete()
"""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_random_checkpoint(path, seed=3)
    return path


class Stage:
    """A daemon process with a player (sender) on its input and a recorder on its output."""

    def __init__(self, jack: JackServer, daemon: DaemonProcess):
        self.jack, self.daemon = jack, daemon
        self.player = JackMidiSender(jack, prefix="rel-player")
        self.recorder = JackMidiRecorder(jack, prefix="rel-monitor")
        self.input_port = jack.wait_for_port(f"{daemon.in_port}:")
        jack.connect(self.player.port, self.input_port)
        jack.connect(jack.wait_for_port(f"{daemon.out_port}:"), self.recorder.port)

    def close(self) -> None:
        self.recorder.close()
        self.player.close()
        self.daemon.kill()

    def play_phrase(self, notes: int = 6, gap_s: float = 0.08) -> None:
        """A short melody, each note released before the next (a phrase to answer)."""
        for i in range(notes):
            pitch = 60 + (2 * i) % 12
            self.player.send(note_on(0, pitch, 90))
            time.sleep(gap_s)
            self.player.send(note_off(0, pitch))

    def answers_normally(self, what: str) -> dict[str, Any]:
        """Play a phrase; an answer must start and play notes, and every note must end."""
        before = self.daemon.status()
        self.play_phrase()
        status = self.daemon.wait_status(
            lambda s: s["answers"] > before["answers"] and s["notes_played"] > before["notes_played"],
            20.0, f"an answer {what}",
        )
        status = self.daemon.wait_status(
            lambda s: s["answers_active"] == 0 and s["output_pending"] == 0 and s["sounding"] == 0,
            20.0, f"the answer {what} to end",
        )
        problems = unreleased_after_settling(self.recorder)
        assert problems == [], problems
        assert status["failed"] == 0
        return status


# A fast tempo keeps the waits short: bar lines every second, silence after 1 beat.
FAST = ["clock.tempo=240.0", "daemon.length_bars=1", "daemon.silence_beats=1.0"]


@pytest.fixture(scope="module")
def stage(jack_server: JackServer, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """One daemon process for the module's tests; each test leaves it answering normally."""
    daemon = DaemonProcess(tiny_checkpoint, tmp_path_factory.mktemp("midi-reliability"), *FAST)
    try:
        stage = Stage(jack_server, daemon)
    except BaseException:
        daemon.kill()
        raise
    yield stage
    try:
        assert daemon.stop() == 0
        log_text = daemon.log_text()
        assert "Traceback" not in log_text and "stopped" in log_text
    finally:
        stage.close()


def test_daemon_survives_garbage_midi_and_keeps_playing(stage):
    """Random bytes, truncated messages, undefined status bytes, long SysEx, note-offs of keys
    never pressed, chords on all 16 channels at once: the daemon stays up, counts what it
    dropped, holds no key down afterwards and answers the next phrase."""
    player, daemon = stage.player, stage.daemon
    rng = random.Random(5)
    # Random bytes: python-rtmidi sends up to 3 bytes as they are, longer runs only behind F0.
    for _ in range(300):
        player.send([rng.randrange(256) for _ in range(rng.randrange(1, 4))])
    for _ in range(30):
        player.send([0xF0, *(rng.randrange(256) for _ in range(rng.randrange(1, 40)))])
    for channel in range(16):  # random bytes hold valid note-ons too: a DAW's stop releases them
        player.send(control_change(channel, ALL_NOTES_OFF, 0))
    for message in ([0x90, 60], [0x80], [0xB0, 64], [0xE0, 1], [0xF2, 1]):  # truncated
        player.send(message)
    for status_byte in (0xF4, 0xF5, 0xF9, 0xFD):  # undefined in MIDI 1.0
        player.send([status_byte])
        player.send([status_byte, 1, 2])
    for length in (64, 1024, 4096):  # system exclusive, well-formed and long
        player.send([0xF0, 0x7D, *(rng.randrange(128) for _ in range(length)), 0xF7])
        time.sleep(0.05)
    # A SysEx cut short: rtmidi would take every later event as part of it; the port's guard
    # ends it after a second without input.
    player.send([0xF0, 0x7D, 1, 2, 3])
    time.sleep(1.5)
    for channel in range(16):  # releases of keys never pressed
        for note in range(0, 128, 3):
            player.send(note_off(channel, note))
    time.sleep(0.2)
    before = daemon.status()["input_notes"]
    for pitch in (48, 55, 60, 64, 67):  # a chord on all 16 channels at once...
        for channel in range(16):
            player.send(note_on(channel, pitch, 80))
    time.sleep(0.3)
    for pitch in (48, 55, 60, 64, 67):  # ...and its release
        for channel in range(16):
            player.send(note_off(channel, pitch))
    status = daemon.wait_status(lambda s: s["input_notes"] >= before + 80, 10.0, "the chord on 16 channels")
    assert daemon.alive and status["failed"] == 0
    assert re.search(r"dropped .* \((\d+) invalid so far\)", daemon.log_text()), daemon.log_text()[-2000:]
    stage.answers_normally("after the garbage")
    # Keys the player pressed and never released are released by its All Notes Off.
    for pitch in (40, 52):
        player.send(note_on(3, pitch, 70))
    player.send(control_change(3, ALL_NOTES_OFF, 0))
    stage.answers_normally("after All Notes Off from the player")
    assert "Traceback" not in daemon.log_text()


def test_daemon_under_a_midi_flood_stays_responsive_bounded_and_plays_afterwards(stage, jack_server, record_property):
    """20,000 events a second for 10 s on all 16 channels from another process: OSC status
    answered throughout, resident memory flat, no note left sounding, a normal answer after."""
    rate, seconds = 20_000, 10.0
    daemon = stage.daemon
    stage.answers_normally("before the flood")  # warm: every code path has run once
    rss_before = daemon.rss_kib()
    overflowed_before = daemon.status()["input_overflowed"]
    flooder_client = unique_client_name("rel-flood")
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOOD_PROGRAM, flooder_client, str(rate), str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert flooder.stdout is not None and flooder.stdin is not None
        assert flooder.stdout.readline().strip() == "ready"
        jack_server.connect(jack_server.wait_for_port(f"{flooder_client}:out"), stage.input_port)
        rss_peak = rss_before
        with StatusProbe(daemon) as probe:
            flooder.stdin.write("go\n")
            flooder.stdin.flush()
            while flooder.poll() is None:
                rss_peak = max(rss_peak, daemon.rss_kib())
                time.sleep(0.25)
        sent = int(flooder.stdout.readline())
    finally:
        if flooder.poll() is None:
            flooder.kill()
        flooder.wait()
    assert flooder.returncode == 0
    assert daemon.alive, daemon.log_text()[-3000:]
    figures = {**probe.summary(), "sent": sent, "rss_before_mib": round(rss_before / 1024, 1),
               "rss_peak_mib": round(rss_peak / 1024, 1)}
    status = daemon.wait_status(lambda s: s["sounding"] == 0 and s["output_pending"] == 0, 20.0, "quiet")
    figures["input_overflowed"] = status["input_overflowed"]
    figures["input_notes"] = status["input_notes"]
    for key, value in figures.items():
        record_property(key, value)
    print(f"\nMIDI flood of {sent} events in {seconds:g} s: {figures}")
    assert sent >= rate * seconds * 0.9
    # Every event was either handled or dropped, oldest first, by the bounded queue (a fast
    # machine keeps up with the whole flood and drops none).
    assert status["input_notes"] + status["input_overflowed"] - overflowed_before > 0, figures
    # Every status request was answered (1 s timeout each), through the whole flood.
    assert probe.summary()["requests"] >= 50 and probe.summary()["max_ms"] < 1000.0, figures
    # Memory: the queues are bounded; a small allowance for allocator noise.
    assert rss_peak < rss_before * 1.05, figures
    stage.answers_normally("after the flood")
    assert "Traceback" not in daemon.log_text()


def test_midi_ports_never_lose_a_release_to_an_overflow(jack_server):
    """A note-off dropped by the full input queue would leave its key held for ever in the
    daemon's view (call_response then never answers): it is delivered after the queue drains."""
    import asyncio

    from daemon.midi_events import NoteOff, NoteOn
    from daemon.midi_ports import MidiConfig, MidiPorts

    config = MidiConfig(api="jack", in_port=unique_client_name("rel-ports-in"), out_port="", queue_size=16)
    sender = JackMidiSender(jack_server, prefix="rel-ports-player")

    async def body() -> list[Any]:
        async with MidiPorts(config) as ports:
            jack_server.connect(sender.port, jack_server.wait_for_port(f"{config.in_port}:"))
            sender.send(note_on(0, 60, 100))
            first = await asyncio.wait_for(ports.receive(), 5.0)
            assert isinstance(first, NoteOn) and first.note == 60  # the daemon now holds key 60
            sender.send(note_off(0, 60))  # the oldest when the queue overflows...
            for value in range(40):
                sender.send(control_change(0, 1, value))  # ...under 40 mod-wheel moves
            deadline = time.monotonic() + 5.0
            while ports.stats.delivered < 42 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert ports.stats.overflowed == 25
            events = []
            while True:
                try:
                    events.append(await asyncio.wait_for(ports.receive(), 0.5))
                except TimeoutError:
                    return events

    try:
        events = asyncio.run(body())
    finally:
        sender.close()
    releases = [e for e in events if isinstance(e, NoteOff)]
    assert len(events) == 17 and [e.note for e in releases] == [60], events
