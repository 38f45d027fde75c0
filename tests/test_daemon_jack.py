"""The daemon end to end through a real JACK server: a player client plays a real corpus piece
into the daemon's input port, a recorder client records its output port, OSC goes over real UDP.

The model is a tiny random one (random but valid notes, enough for structure and timing). Timing
tolerances are generous (this machine is shared and loaded); the tight figures come from
`rwkv-music bench daemon`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.app import Daemon
from daemon.config import DaemonSettings, load_daemon_settings
from daemon.midi_events import ALL_NOTES_OFF, note_off, note_on
from daemon.osc_server import send_and_wait, status_values
from daemon.runner import BackgroundDaemon
from daemon.scheduler import OutputScheduler
from tests.fixtures.jack import JackMidiRecorder, JackMidiSender, JackServer, unique_client_name
from tools.cli import main as cli_main

# A note-on this close to a grid point counts as on it (the grid is 62.5 ms at 120 BPM).
GRID_TOLERANCE_S = 0.050
# The answer's first note may come this early or late against its bar line.
BAR_TOLERANCE_S = 0.060
TEMPO = 120.0
SECONDS_PER_BEAT = 60.0 / TEMPO


# -- shared with tests/test_hot_reload.py -----------------------------------------------------------


def save_random_checkpoint(path: Path, seed: int = 0, tokenizer_params: dict | None = None) -> str:
    """A tiny random RWKV-7 (1 layer, 64 channels) as a checkpoint at `path`; returns its model id."""
    from model.checkpoint import CheckpointMeta, save
    from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
    from tests.model_factory import random_model

    params = tokenizer_params or DEFAULT_TOKENIZER_PARAMS
    tokenizer = build_tokenizer(params)
    model = random_model(n_layer=1, n_embd=64, vocab_size=len(tokenizer), seed=seed)
    meta = CheckpointMeta(model.cfg, params, vocab_hash(tokenizer), step=seed)
    return save(model, path, meta).model_id


def daemon_settings(checkpoint: Path, *overrides: str) -> DaemonSettings:
    """Settings for a daemon on the test JACK server: unique port names, a free OSC port."""
    base = [
        "midi.api=jack",
        f'midi.in_port="{unique_client_name("rwkv-in")}"',
        f'midi.out_port="{unique_client_name("rwkv-out")}"',
        "osc.port=0",
        f"clock.tempo={TEMPO}",
        "daemon.seed=7",
        "daemon.watch=false",
        'cc.learn_file=""',  # never the user's learned CC map
    ]
    return load_daemon_settings(None, [*base, *overrides], checkpoint=checkpoint)


class DaemonSession:
    """A daemon on its own thread, a player wired to its input and a recorder to its output."""

    def __init__(self, jack: JackServer, settings: DaemonSettings):
        self.jack = jack
        self.settings = settings
        self.background = BackgroundDaemon(settings)
        self.daemon: Daemon = self.background.start()
        self.sender = JackMidiSender(jack, prefix="player")
        self.recorder = JackMidiRecorder(jack, prefix="monitor")
        jack.connect(self.sender.port, jack.wait_for_port(f"{settings.midi.in_port}:"))
        jack.connect(jack.wait_for_port(f"{settings.midi.out_port}:"), self.recorder.port)
        self.player = OutputScheduler(self.sender.send, name="test-player").start()

    def close(self) -> None:
        self.recorder.close()
        self.player.close()
        self.sender.close()
        self.background.stop()

    # -- control over real UDP
    def osc(self, tail: str, *args: Any) -> tuple[str, tuple[Any, ...]]:
        host, port = self.daemon.osc_address
        return send_and_wait(host, port, f"{self.settings.osc.prefix}/{tail}", list(args), timeout=5.0)

    def status(self) -> dict[str, Any]:
        reply, args = self.osc("status")
        assert reply.endswith("/status"), (reply, args)
        return status_values(args)

    def wait_status(self, predicate, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {status}")
            time.sleep(0.05)

    # -- musical time (the daemon's clock; perf_counter seconds)
    def time_at(self, beat: float) -> float:
        return self.daemon.clock.time_at(beat)

    def next_bar_beat(self, margin_s: float = 0.4) -> float:
        """The first bar line at least `margin_s` from now."""
        clock = self.daemon.clock
        beat = clock.beat_at(time.perf_counter() + margin_s)
        return clock.bar_start_beat(clock.bar_index(beat) + 1)

    def play(self, notes: list[tuple[float, float, int, int]], at_beat: float) -> None:
        """Schedule (start, end, pitch, velocity) notes, in beats from `at_beat`, on the player."""
        messages = []
        for start, end, pitch, velocity in notes:
            messages.append((self.time_at(at_beat + start), note_on(0, pitch, velocity)))
            messages.append((self.time_at(at_beat + end), note_off(0, pitch)))
        self.player.schedule_many(messages)

    def sleep_until_beat(self, beat: float) -> None:
        time.sleep(max(0.0, self.time_at(beat) - time.perf_counter()))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_random_checkpoint(path, seed=3)
    return path


@pytest.fixture
def session_factory(jack_server: JackServer) -> Iterator[Any]:
    sessions: list[DaemonSession] = []

    def make(settings: DaemonSettings) -> DaemonSession:
        sessions.append(DaemonSession(jack_server, settings))
        return sessions[-1]

    yield make
    for session in sessions:
        session.close()


def four_bars_of(path: Path) -> list[tuple[float, float, int, int]]:
    """The notes of a piece's first four 4/4 bars as (start, end, pitch, velocity) in beats,
    ends cut at the fourth bar line; a pitch struck while it sounds ends the earlier note."""
    import symusic

    score = symusic.Score(str(path))
    tpq = score.ticks_per_quarter
    raw = sorted(
        (n.time / tpq, min(n.end, 16 * tpq) / tpq, n.pitch, n.velocity)
        for track in score.tracks
        for n in track.notes
        if n.time < 16 * tpq and n.duration > 0
    )
    notes: list[tuple[float, float, int, int]] = []
    for start, end, pitch, velocity in raw:
        for i, (s, e, p, v) in enumerate(notes):
            if p == pitch and e > start:  # unison voices: one key, one note at a time
                notes[i] = (s, start, p, v)
        notes.append((start, end, pitch, velocity))
    return [n for n in notes if n[1] > n[0]]


def corpus_phrase(corpus_midi_files: list[Path]) -> tuple[Path, list[tuple[float, float, int, int]]]:
    """The first corpus piece in 4/4 with a dozen notes or more in its first four bars."""
    import symusic

    for path in corpus_midi_files:
        score = symusic.Score(str(path))
        signatures = [(t.numerator, t.denominator) for t in score.time_signatures if t.time == 0]
        if signatures[:1] == [(4, 4)]:
            notes = four_bars_of(path)
            if len(notes) >= 12:
                return path, notes
    pytest.fail("no 4/4 piece in the test corpus")


def note_pairs(messages: list[tuple[float, tuple[int, ...]]]) -> tuple[list[tuple[float, int]], list[str]]:
    """Note-ons (time, pitch) of recorded messages, and the problems of their on/off pairing:
    a note-on whose key already sounds, a note-off for a silent key is fine, a key never released
    is a problem."""
    sounding: dict[int, float] = {}
    ons: list[tuple[float, int]] = []
    problems = []
    for t, msg in messages:
        kind = msg[0] & 0xF0
        if kind == 0x90 and msg[2] > 0:
            if msg[1] in sounding:
                problems.append(f"note {msg[1]} struck at {t:.3f} while sounding")
            sounding[msg[1]] = t
            ons.append((t, msg[1]))
        elif kind == 0x80 or (kind == 0x90 and msg[2] == 0):
            sounding.pop(msg[1], None)
    problems += [f"note {p} from {t:.3f} never released" for p, t in sounding.items()]
    return ons, problems


def unreleased_after_settling(recorder, timeout: float = 5.0) -> list[str]:
    """note_pairs' problems of everything `recorder` heard, waiting up to `timeout` for them to
    go away: when the daemon reports nothing sounding it has sent the note-offs, and the
    recorder's reader thread may not have taken them from JACK yet. A note that is really
    stuck is still reported, `timeout` later."""
    deadline = time.monotonic() + timeout
    _, problems = note_pairs(recorder.timed_messages)
    while problems and time.monotonic() < deadline:
        time.sleep(0.05)
        _, problems = note_pairs(recorder.timed_messages)
    return problems


def grid_error(session: DaemonSession, t: float, step_beats: float = 0.125) -> float:
    """Seconds from `t` to the closest point of the 1/8-beat grid of the daemon's clock."""
    beat = session.daemon.clock.beat_at(t)
    nearest = round(beat / step_beats) * step_beats
    return abs(t - session.time_at(nearest))


# -- tests ------------------------------------------------------------------------------------------


def test_daemon_answers_a_corpus_phrase_at_the_bar_line_for_the_osc_length(
    session_factory, tiny_checkpoint, corpus_midi_files
):
    """Four bars of a real piece in; one answer out, on the bar line after the silence, as many
    bars long as /rwkv/length said over UDP, every note released; then /rwkv/mode off silences it."""
    silence = 1.5
    session = session_factory(
        daemon_settings(tiny_checkpoint, "daemon.length_bars=1", f"daemon.silence_beats={silence}")
    )
    assert session.osc("length", 2) == ("/rwkv/ack", ("/rwkv/length",))
    _, notes = corpus_phrase(corpus_midi_files)
    start = session.next_bar_beat()
    session.play([(s, e, p, v) for s, e, p, v in notes], start)
    last_off = start + max(e for _, e, _, _ in notes)
    threshold = last_off + silence
    clock = session.daemon.clock
    bar = clock.bar_index(threshold)
    if clock.bar_start_beat(bar) < threshold:
        bar += 1
    answer_start = clock.bar_start_beat(bar)
    answer_end = clock.bar_start_beat(bar + 2)
    assert answer_start - threshold > 0.05  # the expected bar is not a matter of milliseconds

    session.sleep_until_beat(answer_end + 0.5)
    status = session.wait_status(lambda s: s["output_pending"] == 0, 5.0, "the output to drain")
    messages = session.recorder.timed_messages
    ons, problems = note_pairs(messages)
    assert problems == []
    assert status["answers"] == 1 and status["input_notes"] == len(notes)
    assert status["late_dropped"] == 0 and status["failed"] == 0
    assert len(ons) >= 3, f"the answer has too few notes to judge: {messages}"
    first, last = ons[0][0], ons[-1][0]
    # On the bar line after the silence, not earlier; no note starts after its second bar.
    assert first >= session.time_at(answer_start) - BAR_TOLERANCE_S
    assert first < session.time_at(answer_start + 4.0), "the first note is not in the answer's first bar"
    assert last < session.time_at(answer_end) - 0.05
    errors = [grid_error(session, t) for t, _ in ons]
    assert max(errors) < GRID_TOLERANCE_S, errors
    # Notes are released by the end of the answer at the latest.
    assert messages[-1][0] <= session.time_at(answer_end) + BAR_TOLERANCE_S

    # Off: a new phrase gets no answer.
    assert session.osc("mode", "off") == ("/rwkv/ack", ("/rwkv/mode",))
    before = len(ons)
    phrase = session.next_bar_beat()
    session.play([(0.0, 0.5, 60, 90), (0.5, 1.0, 64, 90)], phrase)
    session.sleep_until_beat(phrase + 5.0)  # an answer would have been decided and begun by now
    ons, problems = note_pairs(session.recorder.timed_messages)
    assert len(ons) == before and problems == []
    assert session.status()["answers"] == 1


def test_playing_over_an_answer_stops_it_with_note_offs(session_factory, tiny_checkpoint, capsys):
    session = session_factory(daemon_settings(tiny_checkpoint, "daemon.length_bars=2", "daemon.silence_beats=1.0"))
    phrase = session.next_bar_beat()
    session.play([(0.0, 0.5, 60, 90), (0.5, 1.0, 64, 90), (1.0, 2.0, 67, 90)], phrase)
    answer_start = phrase + 4.0  # silent from beat 2 of the bar: threshold 3 -> the next bar line
    # Wait until one of the answer's notes sounds, then play over it.
    deadline = session.time_at(answer_start + 8.0)
    sounding: set[int] = set()
    while time.perf_counter() < deadline:
        sounding = set()
        for _, msg in session.recorder.timed_messages:
            if msg[0] & 0xF0 == 0x90 and msg[2] > 0:
                sounding.add(msg[1])
            elif msg[0] & 0xF0 == 0x80:
                sounding.discard(msg[1])
        if sounding and time.perf_counter() > session.time_at(answer_start + 0.5):
            break
        time.sleep(0.002)
    assert sounding, "no answer note sounded"
    takeover = time.perf_counter()
    session.sender.send(note_on(0, 72, 100))
    time.sleep(1.0)
    # No new answer after the player stops: the count below is about this one answer only.
    assert session.osc("mode", "manual") == ("/rwkv/ack", ("/rwkv/mode",))
    session.sender.send(note_off(0, 72))
    messages = session.recorder.timed_messages
    ons, problems = note_pairs(messages)
    assert problems == []  # no stuck note
    assert all(t < takeover + 0.03 for t, _ in ons), "the answer went on after the player came in"
    offs = [t for t, msg in messages if msg[0] & 0xF0 == 0x80 and msg[1] in sounding and t >= takeover - 0.005]
    assert offs and min(offs) - takeover < 0.2  # released at once, not at the note's own end
    assert any(msg == (0xB0, ALL_NOTES_OFF, 0) for _, msg in messages)
    # The status through `rwkv-music osc` (the command line client), over UDP.
    capsys.readouterr()
    assert cli_main(["osc", "--port", str(session.daemon.osc_address[1]), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["takeovers"] == 1 and status["sounding"] == 0 and status["output_pending"] == 0
    assert status["answers"] == 1 and status["mode"] == "manual"
    assert cli_main(["osc", "--port", str(session.daemon.osc_address[1]), "length", "0"]) == 1
    assert "length must be between 1 and 64 (got 0)" in capsys.readouterr().err


def test_daemon_process_stops_on_sigint_releasing_every_note(jack_server, tiny_checkpoint, tmp_path):
    """`rwkv-music daemon` as a process, in autopilot: SIGINT while notes sound -> note-offs,
    All Notes Off, ports closed, exit status 0; the start log names API, ports, OSC and model."""
    settings = daemon_settings(tiny_checkpoint)
    in_port, out_port = settings.midi.in_port, settings.midi.out_port
    config = tmp_path / "config.toml"
    config.write_text(
        f'[midi]\napi = "jack"\nin_port = "{in_port}"\nout_port = "{out_port}"\n'
        f'[osc]\nport = 0\n[clock]\ntempo = {TEMPO}\n'
        '[daemon]\nmode = "autopilot"\nlength_bars = 4\nseed = 11\nwatch = false\n'
    )
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(config), "--checkpoint", str(tiny_checkpoint)],
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    recorder = JackMidiRecorder(jack_server, prefix="sigint-monitor")
    try:
        # Wait on the log, not on the port list: every jack_lsp is one more JACK client opened
        # and closed while the process starts, and a busy dummy server copes badly with many.
        deadline = time.monotonic() + 60.0
        while "ready: model" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        jack_server.connect(jack_server.wait_for_port(f"{out_port}:"), recorder.port)
        deadline = time.monotonic() + 30.0
        sounding = False
        while time.monotonic() < deadline and not sounding:
            state: dict[int, bool] = {}
            for msg in recorder.messages:
                if msg[0] & 0xF0 == 0x90 and msg[2] > 0:
                    state[msg[1]] = True
                elif msg[0] & 0xF0 == 0x80:
                    state[msg[1]] = False
            sounding = any(state.values())
            time.sleep(0.002)
        assert sounding, f"autopilot played nothing:\n{log_path.read_text()}"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, log_path.read_text()
        time.sleep(0.1)
        messages = [(0.0, m) for m in recorder.messages]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        recorder.close()
    _, problems = note_pairs(messages)
    assert problems == []
    assert messages[-1][1] == (0xB0, ALL_NOTES_OFF, 0)  # the last word: All Notes Off
    log_text = log_path.read_text()
    ready = next(line for line in log_text.splitlines() if "ready: model" in line)
    assert "MIDI jack" in ready and in_port in ready and out_port in ready and "OSC 127.0.0.1:" in ready
    assert "stopped" in log_text and "Traceback" not in log_text


def test_a_daemon_stopped_while_stderr_has_no_descriptor_closes_its_ports(jack_server, tiny_checkpoint, capsys):
    """Embedded where sys.stderr is captured (here capsys; a notebook alike), the exit
    watchdog has no file descriptor to write to. It once raised there and the stop never ran:
    the ports stayed on the server and the daemon's threads lived on in the test process."""
    settings = daemon_settings(tiny_checkpoint)
    background = BackgroundDaemon(settings)
    background.start()
    ours = (settings.midi.in_port, settings.midi.out_port)
    jack_server.wait_for_port(f"{settings.midi.out_port}:")
    with pytest.raises(io.UnsupportedOperation):
        sys.stderr.fileno()  # the condition under test
    background.stop()
    assert [p for p in jack_server.ports() if p.startswith(ours)] == []
    assert "stopped with an error" not in capsys.readouterr().err


def test_daemon_without_checkpoint_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nothing.safetensors"
    assert cli_main(["daemon", "--checkpoint", str(missing)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nothing.safetensors not found" in lines[0], lines
