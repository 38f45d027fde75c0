"""`rwkv-music demo`: the instrument end to end, on a machine where nothing is set up.

What it does, in one process:

1. JACK: the server JACK_DEFAULT_SERVER names (or the default one) when it runs, else a private
   dummy server (daemon.jack_server.PrivateJackServer) for the length of the demo.
2. The daemon (daemon.app.Daemon on a thread of its own) with the checkpoint, in call_response
   mode, on JACK ports of its own, with an OSC port the system picks.
3. A player client plays the phrase (the first bars of a MIDI file) into the daemon's input, each
   message at its beat of the daemon's clock (daemon.scheduler.OutputScheduler); a recording
   client in a process of its own stamps every message of the daemon's output on arrival
   (daemon.scheduler.record_arrivals_main: this process's interpreter lock does not delay it).
4. When the answer is over: OUT/demo.mid (tempo and meter, a phrase track, an answer track and
   markers "phrase", "answer", "end" at the bar lines), OUT/demo.png (piano roll), and a summary:
   the answer's bars and notes, and the timing error of its notes: arrival at the recorder minus
   the grid time the daemon scheduled each note-on for (bar line + the note's beat), p50, p99,
   max, as `rwkv-music bench daemon` measures it. The figures include JACK's delivery (up to one
   0.67 ms period on a private server).

The phrase's bars are counted from the start of the file, in its first time signature; the
daemon's clock takes that meter and `--tempo`. In call_response the answer starts at the first
bar line after `daemon.silence_beats` (2) beats of silence, so a phrase that fills its last bar
gets a bar of rest before the answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mido

    from daemon.answer_player import AnswerRecord
    from daemon.app import Daemon
    from daemon.clock import Clock
    from daemon.midi_events import MidiBytes
    from daemon.runner import BackgroundDaemon

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = PROJECT_ROOT / "checkpoints" / "default.safetensors"
DEFAULT_PHRASE = PROJECT_ROOT / "examples" / "satie-gymnopedie-1.mid"
TICKS_PER_BEAT = 480
# The phrase starts at the first bar line at least this far ahead once everything is connected.
START_MARGIN_S = 0.8
# After the answer's last bar line: time for the last messages to arrive at the recorder.
DRAIN_S = 0.4
# How long the daemon may take beyond the expected bar line before the demo gives up.
ANSWER_GRACE_S = 20.0
DAEMON_START_TIMEOUT_S = 120.0
_tags = itertools.count()

EPILOG = """examples:
  rwkv-music demo                                   # a Satie phrase (4 bars), a 2-bar answer -> out/
  rwkv-music demo --phrase my-riff.mid --bars 2 --length 4 --tempo 96
  rwkv-music demo --checkpoint runs/mine/latest.safetensors --out out/mine --seed 3
  rwkv-music demo --set daemon.temperature=0.8 --set daemon.top_p=0.9

It needs JACK (Debian: jackd2): it uses the running JACK server, or starts a private one with
the dummy driver (no sound hardware needed) and stops it at the end. out/demo.mid holds the
phrase and the answer as played (an answer track on channel 2); out/demo.png shows them.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="play a phrase into the daemon, record its answer: out/demo.mid, out/demo.png",
        description="The whole instrument end to end: the daemon with a model, a phrase from a real\n"
        "MIDI file played into its input port, its answer recorded from its output port, through a\n"
        "JACK server (a private one when none runs). Writes the phrase and the answer as MIDI and\n"
        "as a piano roll, and prints the answer's bars, notes and timing error.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model to play (default: checkpoints/default.safetensors of the project)")
    p.add_argument("--phrase", type=Path, default=None,
                   help="MIDI file whose first bars are played (default: examples/satie-gymnopedie-1.mid)")
    p.add_argument("--bars", type=int, default=4, help="bars of the phrase to play, 1..32 (default 4)")
    p.add_argument("--length", type=int, default=2, help="bars of the answer, 1..16 (default 2)")
    p.add_argument("--tempo", type=float, default=120.0, help="BPM, 20..300 (default 120)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed, -1 for a fresh one (default 1)")
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for demo.mid and demo.png (default out/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a daemon config value, e.g. daemon.temperature=0.8 (repeatable)")
    p.set_defaults(run=run)


@dataclass(frozen=True)
class TimedNote:
    """A note in quarter-note beats from the phrase's first bar line."""

    start_beats: float
    end_beats: float
    pitch: int
    velocity: int


@dataclass(frozen=True)
class Phrase:
    """The bars of a MIDI file that are played, and their meter."""

    path: Path
    notes: list[TimedNote]
    bars: int
    numerator: int
    denominator: int

    @property
    def beats_per_bar(self) -> float:
        return self.numerator * 4.0 / self.denominator

    @property
    def meter(self) -> str:
        return f"{self.numerator}/{self.denominator}"

    def timed_messages(self, clock: Clock, start_beat: float) -> list[tuple[float, MidiBytes]]:
        """The phrase played from `start_beat` of `clock` on channel 1: (perf_counter time,
        Note On or Note Off bytes) for every note."""
        from daemon.midi_events import note_off, note_on

        messages = []
        for n in self.notes:
            messages.append((clock.time_at(start_beat + n.start_beats), note_on(0, n.pitch, n.velocity)))
            messages.append((clock.time_at(start_beat + n.end_beats), note_off(0, n.pitch)))
        return messages


@dataclass(frozen=True)
class Performance:
    """What happened: the answer as recorded, where it lies, and how well it kept time.

    Beats count from the phrase's first bar line. `timing_errors_ms`: per answer note-on that
    arrived, |arrival - the grid time it was scheduled for|, sorted.
    """

    answer_notes: list[TimedNote]
    answer_start_beats: float
    answer_end_beats: float
    answer_bars: int
    timing_errors_ms: list[float]
    late_dropped: int
    model: str
    jack_server: str
    private_jack: bool


def run(args: argparse.Namespace) -> int:
    from tools.cli import UserError

    if not 1 <= args.bars <= 32 or not 1 <= args.length <= 16 or not 20.0 <= args.tempo <= 300.0:
        raise UserError("--bars must be 1..32, --length 1..16, --tempo 20..300")
    phrase = read_phrase(args.phrase or DEFAULT_PHRASE, args.bars)
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} not found: pass --checkpoint PATH (rwkv-music train writes one)")
    performance = perform(
        checkpoint, phrase, tempo=args.tempo, length=args.length, seed=args.seed, overrides=args.set
    )
    midi_path = write_demo_midi(args.out / "demo.mid", phrase, performance, tempo=args.tempo)
    png_path = save_demo_roll(args.out / "demo.png", phrase, performance, tempo=args.tempo)
    print(summary(phrase, performance, tempo=args.tempo))
    print(f"wrote {midi_path} and {png_path}")
    return 0


# -- the phrase -------------------------------------------------------------------------------------


def read_phrase(path: Path, bars: int) -> Phrase:
    """The notes of the first `bars` bars of a MIDI file (all tracks but drums), ends cut at the
    last bar line; a pitch struck while it sounds ends the earlier note (one key, one note).
    Raises UserError for a missing or unreadable file, or one with no notes in those bars."""
    import symusic

    from tools.cli import UserError

    if not path.is_file():
        raise UserError(f"phrase {path} not found")
    try:
        score = symusic.Score(str(path))
    except Exception as err:  # symusic raises plain RuntimeErrors for any malformed file
        raise UserError(f"phrase {path} is not a readable MIDI file: {err}") from err
    signature = next((t for t in score.time_signatures if t.time == 0), None)
    numerator, denominator = (signature.numerator, signature.denominator) if signature else (4, 4)
    tpq = score.ticks_per_quarter
    end_beats = bars * numerator * 4.0 / denominator
    raw = sorted(
        (n.time / tpq, min(n.end / tpq, end_beats), n.pitch, n.velocity)
        for track in score.tracks
        if not track.is_drum
        for n in track.notes
        if n.time / tpq < end_beats and n.duration > 0
    )
    notes: list[TimedNote] = []
    sounding: dict[int, int] = {}  # pitch -> index in notes of its latest note
    for start, end, pitch, velocity in raw:
        previous = sounding.get(pitch)
        if previous is not None and notes[previous].end_beats > start:
            notes[previous] = dataclasses.replace(notes[previous], end_beats=start)
        sounding[pitch] = len(notes)
        notes.append(TimedNote(start, end, pitch, max(1, min(127, velocity))))
    notes = [n for n in notes if n.end_beats > n.start_beats]
    if not notes:
        raise UserError(f"phrase {path} has no notes in its first {bars} bar(s)")
    return Phrase(path, notes, bars, numerator, denominator)


# -- the performance --------------------------------------------------------------------------------


def perform(
    checkpoint: Path, phrase: Phrase, *, tempo: float, length: int, seed: int, overrides: Sequence[str] = ()
) -> Performance:
    """Run the daemon, play `phrase` into it, record its answer of `length` bars (see the module)."""
    from daemon.jack_server import ensure_jack_server

    with ensure_jack_server() as jack:
        return _perform_on_jack(
            checkpoint, phrase, tempo=tempo, length=length, seed=seed, overrides=overrides,
            server=jack.name, private=jack.private,
        )  # fmt: skip


def _perform_on_jack(
    checkpoint: Path, phrase: Phrase, *, tempo: float, length: int, seed: int, overrides: Sequence[str],
    server: str, private: bool,
) -> Performance:
    import rtmidi

    from daemon.config import load_daemon_settings
    from daemon.jack_watch import JackServerWatch
    from daemon.runner import BackgroundDaemon
    from daemon.scheduler import OutputScheduler
    from tools.cli import UserError

    tag = f"{os.getpid()}-{next(_tags)}"
    in_port, out_port = f"demo-in-{tag}", f"demo-out-{tag}"
    settings = load_daemon_settings(None, [
        "midi.api=jack", f'midi.in_port="{in_port}"', f'midi.out_port="{out_port}"', "osc.port=0",
        f"clock.tempo={tempo}", f'clock.meter="{phrase.meter}"', "daemon.mode=call_response",
        f"daemon.length_bars={length}", "daemon.watch=false", f"daemon.seed={seed}", *overrides,
    ], checkpoint=checkpoint)  # fmt: skip
    if settings.daemon.mode != "call_response" or settings.clock.source != "internal":
        raise UserError("the demo needs daemon.mode = call_response and clock.source = internal")
    with ExitStack() as stack:
        background = BackgroundDaemon(settings)
        stack.callback(background.stop)  # also ends a daemon that is still starting after the timeout
        daemon = background.start(timeout=DAEMON_START_TIMEOUT_S)
        clock = daemon.clock
        assert clock is not None
        recorder = stack.enter_context(_ArrivalRecorder(f"{out_port}:{out_port}", f"demo-recorder-{tag}"))
        # Each change of the graph settles before the next (daemon.jack_watch: libjack crashes
        # a client that registers or unregisters a port while it handles a notification).
        watch = stack.enter_context(JackServerWatch(f"demo-watch-{tag}"))
        with watch.change():
            player = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"demo-player-{tag}")
        stack.callback(player.delete)
        target = f"{in_port}:{in_port}"
        ports = player.get_ports()
        if target not in ports:
            raise UserError(f"the daemon's input port {target!r} is not on JACK server {server!r}: {ports}")
        with watch.change():
            player.open_port(ports.index(target), "out")
        scheduler = stack.enter_context(OutputScheduler(player.send_message, name="demo-player"))

        start = clock.bar_start_beat(clock.bar_index(clock.beat_at(time.perf_counter() + START_MARGIN_S)) + 1)
        scheduler.schedule_many(phrase.timed_messages(clock, start))
        phrase_end = start + phrase.bars * phrase.beats_per_bar
        log.info("playing %d notes of %s from beat %.1f", len(phrase.notes), phrase.path, start)

        # The answer may come a bar after the phrase (silence_beats of rest) and lasts `length`.
        latest = phrase_end + settings.daemon.silence_beats + phrase.beats_per_bar * (length + 1)
        record = _wait_for_answer(background, clock.time_at(latest) + ANSWER_GRACE_S, len(phrase.notes))
        answer_start = clock.bar_start_beat(record.bar)
        answer_end = clock.bar_start_beat(record.bar + record.bars)
        time.sleep(max(0.0, clock.time_at(answer_end) - time.perf_counter()) + DRAIN_S)
        pending_deadline = time.perf_counter() + 5.0
        while background.call(daemon.status)["output_pending"] and time.perf_counter() < pending_deadline:
            time.sleep(0.05)
        arrivals = recorder.stop()
        status = background.call(daemon.status)
        model = _model_description(daemon)

    notes = _answer_notes(arrivals, clock, start, answer_end)
    errors = note_on_errors(arrivals, record.scheduled)
    return Performance(
        answer_notes=notes,
        answer_start_beats=answer_start - start,
        answer_end_beats=answer_end - start,
        answer_bars=record.bars,
        timing_errors_ms=errors,
        late_dropped=int(status["late_dropped"]),
        model=model,
        jack_server=server,
        private_jack=private,
    )


def _wait_for_answer(background: BackgroundDaemon, deadline: float, phrase_notes: int) -> AnswerRecord:
    """The daemon's first AnswerRecord, once its generation is over; UserError when the model
    failed or no answer came by `deadline` (perf_counter seconds)."""
    from tools.cli import UserError

    daemon, call = background.daemon, background.call
    assert daemon is not None
    while not (records := call(lambda: list(daemon.recent_answers))):
        status = call(daemon.status)
        if status["failed"]:
            raise UserError("the model failed to answer (the log above says why)")
        if time.perf_counter() > deadline:
            raise UserError(
                f"no answer within {ANSWER_GRACE_S:g} s of the bar line it was due on (answers "
                f"{status['answers']}, discarded {status['discarded']}, input notes {status['input_notes']} "
                f"of {phrase_notes})"
            )
        time.sleep(0.1)
    return records[0]


class _ArrivalRecorder:
    """A JACK client in a process of its own, connected to `source`, stamping every message."""

    def __init__(self, source: str, client: str):
        self.source = source
        self.client = client
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> _ArrivalRecorder:
        from tools.cli import UserError

        program = "from daemon.scheduler import record_arrivals_main; record_arrivals_main()"
        self._process = subprocess.Popen(
            [sys.executable, "-c", program, self.source, self.client],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._process.stdout is not None
        if self._process.stdout.readline().strip() != "ready":
            self._process.kill()
            _, err = self._process.communicate()
            reason = (err.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"the recording client could not connect to {self.source!r}: {reason}")
        return self

    def stop(self) -> list[tuple[float, list[int]]]:
        """End the recording: [(perf_counter arrival time, message bytes), ...]."""
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write("stop\n")
        process.stdin.flush()
        arrivals = json.loads(process.stdout.readline() or "[]")
        process.wait(timeout=10)
        return [(float(t), list(m)) for t, m in arrivals]

    def __exit__(self, *exc_info: object) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def _model_description(daemon: Daemon) -> str:
    meta, model_id = daemon.swap.playing, daemon.model_id
    if meta is None:
        return model_id
    cfg = meta.model_config
    return f"{model_id} (L{cfg.n_layer}-D{cfg.n_embd}, step {meta.step})"


def _answer_notes(
    arrivals: Sequence[tuple[float, Sequence[int]]], clock: Clock, origin: float, end: float
) -> list[TimedNote]:
    """Recorded messages -> notes in beats from `origin`, as they arrived: each note-on paired
    with the next note-off of its key (a key still down when the recording ends is released at
    the answer's end, beat `end`, or at once if it began later). In call_response the daemon
    plays nothing but its answer, so every note recorded belongs to it."""
    beat_at = clock.beat_at
    sounding: dict[int, tuple[float, int]] = {}  # pitch -> (beat, velocity) of its note-on
    notes: list[TimedNote] = []
    for t, message in arrivals:
        kind = message[0] & 0xF0
        if kind not in (0x80, 0x90):
            continue
        beat = beat_at(t)
        held = sounding.pop(message[1], None)
        if held is not None:
            notes.append(TimedNote(held[0] - origin, beat - origin, message[1], held[1]))
        if kind == 0x90 and message[2] > 0:
            sounding[message[1]] = (beat, message[2])
    for pitch, (beat, velocity) in sounding.items():
        notes.append(TimedNote(beat - origin, max(end, beat + 0.125) - origin, pitch, velocity))
    return sorted(notes, key=lambda n: (n.start_beats, n.pitch))


def note_on_errors(
    arrivals: Sequence[tuple[float, Sequence[int]]], scheduled: Sequence[tuple[float, Sequence[int]]]
) -> list[float]:
    """|arrival - due| in ms of each arrived note-on matched to the scheduled note-on with the same
    bytes and the closest due time (within half a second), sorted."""
    from tools.bench_daemon import match_errors

    def is_note_on(message: Sequence[int]) -> bool:
        return message[0] & 0xF0 == 0x90 and message[2] > 0

    return sorted(match_errors(
        [[t, list(m)] for t, m in arrivals if is_note_on(m)],
        [(due, tuple(m)) for due, m in scheduled if is_note_on(m)],
    ))


# -- the results ------------------------------------------------------------------------------------


def _note_events(notes: Sequence[TimedNote], channel: int) -> list[tuple[int, int, mido.Message]]:
    import mido

    events = []
    for n in notes:
        on, off = round(n.start_beats * TICKS_PER_BEAT), round(n.end_beats * TICKS_PER_BEAT)
        off = max(off, on + 1)
        # At equal ticks a note-off goes first, so a repeated key is released before it is struck.
        events.append((on, 1, mido.Message("note_on", channel=channel, note=n.pitch, velocity=n.velocity)))
        events.append((off, 0, mido.Message("note_off", channel=channel, note=n.pitch, velocity=0)))
    return events


def _track(name: str, events: Sequence[tuple[int, int, mido.Message | mido.MetaMessage]]) -> mido.MidiTrack:
    import mido

    track = mido.MidiTrack([mido.MetaMessage("track_name", name=name, time=0)])
    now = 0
    for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(message.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


def write_demo_midi(path: Path, phrase: Phrase, performance: Performance, *, tempo: float) -> Path:
    """A type-1 MIDI file: a conductor track (tempo, meter, markers "phrase", "answer", "end" at
    the phrase's first bar line, the answer's first bar line and the answer's end), the phrase
    on channel 1 and the answer as recorded on channel 2. Returns `path`."""
    import mido

    path.parent.mkdir(parents=True, exist_ok=True)
    ticks = [round(b * TICKS_PER_BEAT) for b in (performance.answer_start_beats, performance.answer_end_beats)]
    conductor = [
        (0, 0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo))),
        (0, 0, mido.MetaMessage("time_signature", numerator=phrase.numerator, denominator=phrase.denominator)),
        (0, 1, mido.MetaMessage("marker", text="phrase")),
        (ticks[0], 1, mido.MetaMessage("marker", text="answer")),
        (ticks[1], 1, mido.MetaMessage("marker", text="end")),
    ]
    midi = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(_track("RWKV-Music demo", conductor))
    midi.tracks.append(_track("phrase", _note_events(phrase.notes, channel=0)))
    midi.tracks.append(_track("answer", _note_events(performance.answer_notes, channel=1)))
    midi.save(str(path))
    return path


def save_demo_roll(path: Path, phrase: Phrase, performance: Performance, *, tempo: float) -> Path:
    """The phrase (grey) and the answer (coloured) as a piano roll PNG."""
    from tools.piano_roll import RollNote, save_piano_roll

    def roll(notes: Sequence[TimedNote]) -> list[RollNote]:
        return [RollNote(n.start_beats, n.end_beats, n.pitch, n.velocity) for n in notes]

    # Short enough for the narrowest figure (a one-bar phrase); the summary names the model.
    title = f"{phrase.path.name}: {phrase.bars} bar(s) played, {performance.answer_bars} answered, {tempo:g} BPM"
    return save_piano_roll(path, roll(phrase.notes), [roll(performance.answer_notes)],
                           beats_per_bar=phrase.beats_per_bar, title=title)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile (0..1) of sorted values; nan when empty."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def summary(phrase: Phrase, performance: Performance, *, tempo: float) -> str:
    """The lines `rwkv-music demo` prints."""
    p = performance
    jack = f"private JACK server {p.jack_server!r} (started for the demo)" if p.private_jack else \
        f"JACK server {p.jack_server!r}"
    first_bar = round(p.answer_start_beats / phrase.beats_per_bar) + 1
    lines = [
        f"model {p.model}, {tempo:g} BPM {phrase.meter}, {jack}",
        f"phrase: {phrase.bars} bar(s), {len(phrase.notes)} notes from {phrase.path}",
        f"answer: {p.answer_bars} bar(s) (bars {first_bar}-{first_bar + p.answer_bars - 1}), "
        f"{len(p.answer_notes)} notes, {p.late_dropped} dropped as late",
    ]
    errors = p.timing_errors_ms
    if errors:
        lines.append(
            f"timing error of the answer's notes against the bar grid ({len(errors)} note-ons, through "
            f"JACK): p50 {percentile(errors, 0.5):.2f} ms, p99 {percentile(errors, 0.99):.2f} ms, "
            f"max {errors[-1]:.2f} ms"
        )
    else:
        lines.append("timing error: no answer note-ons arrived to measure")
    return "\n".join(lines)
