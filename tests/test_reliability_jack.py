"""The JACK server going away under a playing daemon, and coming back.

A private JACK server of this test's own (not the session's `jack_server`: stopping that one
would break every other MIDI test), a real `rwkv-music daemon` process on it, and recording and
playing clients in processes of their own: a JACK client of this process left on a server that
died must not be freed after another client was opened (libjack then crashed the process here),
so this process opens none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.jack import PERIOD_FRAMES, SAMPLE_RATE, unique_client_name
from tests.test_daemon_jack import note_pairs, save_random_checkpoint
from tests.test_reliability_midi import DaemonProcess

PLAYING = ["clock.tempo=240.0", "daemon.mode=autopilot", "daemon.length_bars=1"]

PLAYER_PROGRAM = r"""
import sys, time
import rtmidi
from daemon.jack_watch import JackServerWatch
watch = JackServerWatch(sys.argv[1] + " watch")  # each change settles (daemon.jack_watch)
watch.open()
with watch.change():
    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=sys.argv[1])
with watch.change():
    out.open_port(out.get_ports().index(sys.argv[2]))
time.sleep(0.2)  # a message sent in the cycle the connection is made may not reach it
for pitch in (60, 64, 67):
    out.send_message([0x90, pitch, 90])
    time.sleep(0.05)
    out.send_message([0x80, pitch, 0])
time.sleep(0.3)
with watch.change():
    out.delete()
watch.close()
"""


class PrivateJack:
    """jackd with the dummy driver under a name of its own; `env` points clients at it."""

    def __init__(self, workdir: Path):
        self.name = unique_client_name("rwkv-rel-jack")
        self.log_path = workdir / "jackd.log"
        self.env = {**os.environ, "JACK_DEFAULT_SERVER": self.name, "JACK_NO_AUDIO_RESERVATION": "1"}
        self.process: subprocess.Popen | None = None

    def _tool(self, *args: str) -> str:
        return subprocess.run([args[0], "-s", self.name, *args[1:]], capture_output=True, text=True,
                              timeout=10, env=self.env).stdout

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["jackd", "--no-realtime", "-S", "-n", self.name, "-d", "dummy", "-r", str(SAMPLE_RATE),
                 "-p", str(PERIOD_FRAMES)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.monotonic() + 20.0
        while self._tool("jack_wait", "-c").strip() != "running":
            assert self.process.poll() is None and time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def wait_for_port(self, name: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = [p for p in self._tool("jack_lsp").splitlines() if name in p]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no JACK port {name!r}"
            time.sleep(0.1)

    def connect(self, source: str, destination: str) -> None:
        subprocess.run(["jack_connect", "-s", self.name, source, destination], check=True, timeout=10,
                       env=self.env, capture_output=True)


@pytest.fixture
def private_jack(tmp_path: Path) -> Iterator[PrivateJack]:
    if shutil.which("jackd") is None or shutil.which("jack_wait") is None:
        pytest.skip("jackd is not installed (Debian package jackd2)")
    server = PrivateJack(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def record(server: PrivateJack, port: str, seconds: float) -> list[tuple[float, tuple[int, ...]]]:
    """Messages arriving from `port` over `seconds`, recorded by a client in another process."""
    program = "from daemon.scheduler import record_arrivals_main; record_arrivals_main()"
    recorder = subprocess.Popen(
        [sys.executable, "-c", program, port, unique_client_name("rel-recorder")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=server.env,
    )
    assert recorder.stdin is not None and recorder.stdout is not None
    try:
        assert recorder.stdout.readline().strip() == "ready"
        time.sleep(seconds)
        recorder.stdin.write("stop\n")
        recorder.stdin.flush()
        arrivals = json.loads(recorder.stdout.readline())
    finally:
        if recorder.poll() is None:
            recorder.wait(timeout=10)
    return [(t, tuple(message)) for t, message in arrivals]


def play(server: PrivateJack, port: str) -> None:
    subprocess.run([sys.executable, "-c", PLAYER_PROGRAM, unique_client_name("rel-player"), port],
                   check=True, timeout=60, env=server.env, capture_output=True)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_random_checkpoint(path, seed=3)
    return path


def wait_for_log(daemon: DaemonProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log_text():
        assert daemon.alive, f"the daemon died:\n{daemon.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{daemon.log_text()[-3000:]}"
        time.sleep(0.05)


def test_daemon_reports_a_lost_jack_server_and_reopens_its_ports_when_it_returns(
    private_jack, tiny_checkpoint, tmp_path
):
    daemon = DaemonProcess(tiny_checkpoint, tmp_path, *PLAYING, env=private_jack.env)
    try:
        out_port = private_jack.wait_for_port(f"{daemon.out_port}:")
        before = record(private_jack, out_port, 2.0)
        assert any(m[0] & 0xF0 == 0x90 for _, m in before), "nothing played before the outage"

        private_jack.stop()
        wait_for_log(daemon, "the JACK server went away", 10.0)
        # Still up, still answering control, still generating (into no port) during the outage.
        status = daemon.status()
        played = status["notes_played"]
        time.sleep(1.5)
        assert daemon.alive and daemon.status()["answers"] >= status["answers"]

        private_jack.start()
        # Up to about 20 s when the reopening meets the race with start()'s `jack_wait` clients
        # (a stale libjack client: two 5 s stalls of the new server, then the ports opened again;
        # daemon.midi_ports._open_ports), else well under a second.
        wait_for_log(daemon, "the JACK server is back; ports reopened", 40.0)
        out_port = private_jack.wait_for_port(f"{daemon.out_port}:")
        in_port = private_jack.wait_for_port(f"{daemon.in_port}:")
        after = record(private_jack, out_port, 2.5)
        ons, problems = note_pairs(after)
        # A note may still sound when the recording stops; none may be struck twice.
        assert len(ons) >= 2 and [p for p in problems if "never released" not in p] == [], after
        # The input hears the player again: its notes take over the autopilot.
        inputs = daemon.status()["input_notes"]
        play(private_jack, in_port)
        daemon.wait_status(lambda s: s["input_notes"] >= inputs + 3, 10.0, "the player's notes after the return")
        assert daemon.status()["notes_played"] > played

        # Gone again, and the daemon is told to stop meanwhile: it exits cleanly.
        private_jack.stop()
        wait_for_log(daemon, "reopening them when it is back", 10.0)
        assert daemon.stop() == 0
        log_text = daemon.log_text()
        assert "Traceback" not in log_text and "stopped" in log_text
    finally:
        daemon.kill()


def test_status_says_the_midi_ports_are_away_during_a_jack_outage(private_jack, tiny_checkpoint, tmp_path):
    daemon = DaemonProcess(tiny_checkpoint, tmp_path, *PLAYING, env=private_jack.env)
    try:
        assert daemon.status().get("midi_connected") is True
        private_jack.stop()
        wait_for_log(daemon, "the JACK server went away", 10.0)
        status = daemon.status()
        assert status.get("midi_connected") is False and status.get("midi_server_lost") == 1
        private_jack.start()
        daemon.wait_status(lambda s: s.get("midi_connected") is True, 15.0, "the ports back")
    finally:
        # A clean stop: jackd takes seconds to let go of a killed client.
        try:
            daemon.stop()
        finally:
            daemon.kill()
