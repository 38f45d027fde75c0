"""`rwkv-music demo` end to end: the default model, a real chorale phrase played into the daemon
through JACK, the answer recorded, MIDI and PNG written. Once on the test session's JACK server,
once with no server running for the process (the demo must start its own).

The answer's timing is not judged here (a shared, loaded machine); its structure is.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import mido
import pytest

from tests.fixtures.jack import jack_server_runs
from tools.cli import main as cli_main
from tools.demo import DEFAULT_CHECKPOINT, DEFAULT_PHRASE, read_phrase

ROOT = Path(__file__).resolve().parents[1]

LATE_SLACK_BEATS = 0.5  # beats a recorded note may stray past its answer's bars (load)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

needs_default_model = pytest.mark.skipif(
    not DEFAULT_CHECKPOINT.is_file(), reason=f"{DEFAULT_CHECKPOINT} is not there (not in git)"
)


def markers(midi: mido.MidiFile) -> dict[str, int]:
    """Marker text -> absolute tick, from every track."""
    found = {}
    for track in midi.tracks:
        tick = 0
        for message in track:
            tick += message.time
            if message.type == "marker":
                found[message.text] = tick
    return found


def track_notes(track: mido.MidiTrack) -> tuple[list[tuple[int, int, int]], list[str]]:
    """(start tick, end tick, pitch) of every note of a track, and pairing problems: a key struck
    while it sounds, a note-off for a silent key, a key never released."""
    sounding: dict[tuple[int, int], int] = {}
    notes, problems = [], []
    tick = 0
    for message in track:
        tick += message.time
        if message.type == "note_on" and message.velocity > 0:
            key = (message.channel, message.note)
            if key in sounding:
                problems.append(f"note {message.note} struck at tick {tick} while sounding")
            sounding[key] = tick
        elif message.type in ("note_off", "note_on"):
            key = (message.channel, message.note)
            if key not in sounding:
                problems.append(f"note-off of silent note {message.note} at tick {tick}")
                continue
            notes.append((sounding.pop(key), tick, message.note))
    problems += [f"note {note} from tick {t} never released" for (_, note), t in sounding.items()]
    return notes, problems


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and the CRC of its IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0], "IHDR CRC mismatch"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND", "the PNG is cut short"
    return struct.unpack(">II", data[16:24])


def check_demo_output(out: Path, *, phrase_bars: int, length: int, printed: str) -> mido.MidiFile:
    """The checks every demo run must pass: MIDI structure, answer length, PNG, summary lines."""
    midi = mido.MidiFile(str(out / "demo.mid"))
    tpb = midi.ticks_per_beat
    beats = read_phrase(DEFAULT_PHRASE, 1).beats_per_bar  # per bar of the bundled phrase
    names = [next(m.name for m in t if m.type == "track_name") for t in midi.tracks]
    assert names == ["RWKV-Music demo", "phrase", "answer"]
    marks = markers(midi)
    # The answer spans exactly the requested bars, after the phrase and a bar of rest at most.
    assert marks["phrase"] == 0
    assert marks["end"] - marks["answer"] == length * beats * tpb
    assert phrase_bars * beats * tpb <= marks["answer"] <= (phrase_bars + 2) * beats * tpb

    phrase_notes, problems = track_notes(midi.tracks[1])
    assert problems == []
    expected = read_phrase(DEFAULT_PHRASE, phrase_bars).notes
    assert sorted(p for _, _, p in phrase_notes) == sorted(n.pitch for n in expected)
    assert max(end for _, end, _ in phrase_notes) <= phrase_bars * beats * tpb

    answer_notes, problems = track_notes(midi.tracks[2])
    assert problems == []
    assert answer_notes, "the answer has no notes"
    slack = LATE_SLACK_BEATS * tpb
    for start, end, pitch in answer_notes:
        # Within the answer's bars, released by its end (the daemon cuts notes at its last bar line).
        assert marks["answer"] - slack <= start < end <= marks["end"] + slack, (start, end, pitch, marks)
        assert 21 <= pitch <= 108  # the model's 88 keys
    width, height = png_size(out / "demo.png")
    assert width >= 400 and height >= 100

    assert f"answer: {length} bar(s)" in printed
    assert re.search(rf"answer: {length} bar\(s\) \(bars \d+-\d+\), {len(answer_notes)} notes", printed), printed
    assert re.search(r"timing error .*: p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms", printed), printed
    return midi


@needs_default_model
def test_demo_on_the_running_jack_server_writes_phrase_and_answer(jack_server, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["demo", "--out", str(out), "--bars", "2", "--length", "2", "--tempo", "160"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    check_demo_output(out, phrase_bars=2, length=2, printed=printed)
    # It used the session's server rather than starting one.
    assert f"JACK server {jack_server.name!r}" in printed and "private" not in printed


@needs_default_model
def test_demo_starts_a_private_jack_server_when_none_runs(tmp_path, monkeypatch):
    # In a process of its own: libjack keeps per-process state, and this process already
    # holds clients of the session's server.
    missing = f"rwkv-no-such-server-{tmp_path.name}"
    monkeypatch.setenv("JACK_DEFAULT_SERVER", missing)
    assert not jack_server_runs(missing)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "tools", "demo", "--out", str(out), "--bars", "1", "--length", "1",
         "--tempo", "180"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    printed = result.stdout
    assert result.returncode == 0, printed + result.stderr[-3000:]
    check_demo_output(out, phrase_bars=1, length=1, printed=printed)
    server = re.search(r"private JACK server '([^']+)' \(started for the demo\)", printed)
    assert server, printed
    assert not jack_server_runs(server.group(1))  # stopped afterwards


def test_read_phrase_cuts_the_bars_of_the_bundled_piano_phrase():
    """The bundled Gymnopedie's first two bars: both hands (bass below C3, melody above C5),
    ends cut at the bar line, no key struck while it sounds."""
    phrase = read_phrase(DEFAULT_PHRASE, 2)
    assert phrase.meter == "3/4" and phrase.bars == 2
    assert len(phrase.notes) >= 12
    assert min(n.pitch for n in phrase.notes) < 48 and max(n.pitch for n in phrase.notes) > 72
    assert all(0 <= n.start_beats < n.end_beats <= 6.0 for n in phrase.notes)
    assert min(n.start_beats for n in phrase.notes) == 0.0
    by_pitch: dict[int, list] = {}
    for n in phrase.notes:
        by_pitch.setdefault(n.pitch, []).append(n)
    for notes in by_pitch.values():
        notes.sort(key=lambda n: n.start_beats)
        assert all(a.end_beats <= b.start_beats for a, b in zip(notes, notes[1:], strict=False))
    longer = read_phrase(DEFAULT_PHRASE, 4)
    assert len(longer.notes) > len(phrase.notes)


def test_demo_user_mistakes_are_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "nothing.mid"
    assert cli_main(["demo", "--phrase", str(missing)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nothing.mid not found" in lines[0], lines
    assert cli_main(["demo", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "none.safetensors not found" in lines[0], lines
    assert cli_main(["demo", "--length", "0"]) == 2
    assert "--length 1..16" in capsys.readouterr().err
    not_midi = tmp_path / "text.mid"
    not_midi.write_text("not a MIDI file")
    assert cli_main(["demo", "--phrase", str(not_midi)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a readable MIDI file" in lines[0], lines
