"""`rwkv-music complete IN.mid OUT.mid --bars N`: continue a MIDI file with the model.

The input is read with symusic, its tracks merged into one piano stream and encoded with the
checkpoint's REMI tokenizer, exactly as `rwkv-music prepare` encodes training pieces. The
last `context_bars` bars become the prompt, shaped like a training window: BOS, then bars
that start with their time signature, and the tempo in force restated at the first position
when the window does not start at the top of the piece. The prompt is prefilled into the
engine's state and `Engine.generate` samples every variation in one batch (K states).

The output file holds every track of the input, unchanged, plus one piano track per
variation ("variation 1", ...), which starts at the first bar line after the input's last
note has ended. Tempo, time signatures and key signatures of the input are kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tools
from kernels.weight_formats import DEFAULT_WEIGHTS, WEIGHT_FORMATS
from tools.cli import UserError
from tools.piano_roll import RollNote

if TYPE_CHECKING:
    import symusic

    from daemon.engine import Completion, Engine
    from model.checkpoint import CheckpointMeta
    from model.remi_grammar import DecodedEvent, RemiLayout
    from model.rwkv7 import RWKV7
    from model.sampling import SamplingSettings
    from tools.audio_render import FluidsynthRenderer

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path("checkpoints") / "default.safetensors"
MAX_BARS = 128
MAX_CONTEXT_BARS = 512
MAX_VARIATIONS = 64
SUSTAIN_CC = 64
# A note that ends within this many beats after a bar line still belongs to the bar before:
# half the 1/8-beat grid, so a rounding tick does not push the continuation a whole bar later.
END_TOLERANCE_BEATS = 1 / 16

EPILOG = """examples:
  rwkv-music complete song.mid song-more.mid --bars 8
  rwkv-music complete song.mid ideas.mid --bars 4 --variations 4 --seed 7 --png ideas.png
  rwkv-music complete song.mid more.mid --bars 8 --temperature 0.8 --top-p 0.9 --wav more.wav
  rwkv-music complete song.mid more.mid --checkpoint runs/mine/latest.safetensors --context-bars 16

what OUT.mid holds:
  every track of IN.mid unchanged, then one piano track per variation, named "variation 1",
  "variation 2", ..., each starting at the first bar line after the last note of IN.mid ends.
  With several variations they play at the same time: solo one track in your DAW to hear it.
  The continuation plays at the input's final tempo and meter (tempo changes the model
  writes are left out, since variations cannot have different tempos in one file).

context:
  the last --context-bars bars of IN.mid (all tracks merged into one piano part) are the
  model's prompt. Bars are counted as the checkpoint's tokenizer sees them (the MIDI file's
  time signatures).

--png draws a piano roll: one row per variation, the context in grey, the variation in
colour, bar lines in between. --wav renders the context bars and the continuation with
fluidsynth and a General MIDI soundfont (--soundfont, $RWKV_MUSIC_SOUNDFONT, or
/usr/share/sounds/sf2); with several variations it writes one file per variation,
OUT-1.wav, OUT-2.wav, ...

--seed makes a run repeatable (same checkpoint, input, options and device).
"""


class CompleteError(UserError):
    """A completion that cannot be made as asked; `path` is the file concerned, if any."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


class CompleteOptionError(CompleteError):
    """An option out of its range; `option` names it as the command line spells it."""

    def __init__(self, option: str, value: object, allowed: str):
        super().__init__(f"{option} must be {allowed}, got {value}")
        self.option = option
        self.value = value


@dataclass(frozen=True)
class CompletionRequest:
    """What to generate. Ranges are checked here, naming the command-line option."""

    bars: int = 4
    context_bars: int = 8
    variations: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 0.95  # 1 = off
    seed: int = -1  # -1 = a fresh seed
    weights: str = DEFAULT_WEIGHTS  # how the CPU step stores the large matrices

    def __post_init__(self) -> None:
        checks = [
            ("--bars", self.bars, 1 <= self.bars <= MAX_BARS, f"1..{MAX_BARS}"),
            ("--context-bars", self.context_bars, 1 <= self.context_bars <= MAX_CONTEXT_BARS,
             f"1..{MAX_CONTEXT_BARS}"),
            ("--variations", self.variations, 1 <= self.variations <= MAX_VARIATIONS, f"1..{MAX_VARIATIONS}"),
            ("--temperature", self.temperature, 0.05 <= self.temperature <= 5.0, "0.05..5"),
            ("--top-k", self.top_k, 0 <= self.top_k <= 65536, "0..65536 (0 = off)"),
            ("--top-p", self.top_p, 0.01 <= self.top_p <= 1.0, "0.01..1 (1 = off)"),
            ("--seed", self.seed, -1 <= self.seed <= 2**31 - 1, "-1..2147483647 (-1 = fresh)"),
            ("--weights", self.weights, self.weights in WEIGHT_FORMATS, " | ".join(WEIGHT_FORMATS)),
        ]
        for option, value, ok, allowed in checks:
            if not ok:
                raise CompleteOptionError(option, value, allowed)

    def sampling(self) -> SamplingSettings:
        from model.sampling import SamplingSettings

        return SamplingSettings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass
class Prompt:
    """The token prompt cut from an input piece, and where it sits in the piece.

    ids: tokens to feed after BOS. Times are quarter-note beats from the piece's start:
    context_beats is the first bar line of the prompt, continuation_beats the bar line where
    the continuation starts; beats_per_bar the length of a bar in the last meter.
    """

    ids: list[int]
    context_beats: float
    continuation_beats: float
    beats_per_bar: float
    meter: tuple[int, int]
    context_bars: int  # bars of the input in the prompt
    waiting_bars: int  # empty bars appended while the input's last notes still sound
    piece_bars: int  # bars of the whole input, as the tokenizer counts them
    input_meter: tuple[int, int] | None = None  # the file's meter at the end, when it differs from `meter`


@dataclass
class ContinuedScore:
    """The result of a completion: the output score and everything needed to show it."""

    score: symusic.Score
    prompt: Prompt
    completion: Completion
    notes: list[list[RollNote]]  # per variation, beats from the continuation's first bar line
    context_notes: list[RollNote]  # input notes from the prompt's first bar line to the continuation
    meters: list[list[tuple[int, int]]]  # per variation, the meter of each generated bar
    prefill_seconds: float
    generate_seconds: float
    wav_paths: list[Path] = field(default_factory=list)

    @property
    def continuation_tick(self) -> int:
        return round(self.prompt.continuation_beats * self.score.ticks_per_quarter)

    @property
    def bars_generated(self) -> list[int]:
        """Bars per variation: fewer than asked when the model ended the piece (EOS)."""
        return [len(meters) for meters in self.meters]

    def variation_beats(self, k: int) -> float:
        """The length of variation k's bars together, in quarter-note beats."""
        return sum(num * 4 / den for num, den in self.meters[k])

    def changed_meter(self, k: int) -> tuple[int, int] | None:
        """The first meter of variation k that differs from the input's last one, if any.

        Possible (the grammar allows a time signature after every bar line), rare with a
        trained model; the file keeps the input's meter and the notes keep their beat times."""
        return next((m for m in self.meters[k] if m != tuple(self.prompt.meter)), None)

    def roll_rows(self) -> tuple[list[RollNote], list[list[RollNote]]]:
        """(context, continuations) for `save_piano_roll`: beats from the prompt's first bar line."""
        offset = self.prompt.continuation_beats - self.prompt.context_beats
        rows = [[RollNote(n.start_beats + offset, n.end_beats + offset, n.pitch, n.velocity) for n in row]
                for row in self.notes]
        return self.context_notes, rows


# ---------------------------------------------------------------------------------------------
# Reading and encoding the input


def default_checkpoint() -> Path:
    """The project's checkpoints/default.safetensors, else ./checkpoints/default.safetensors."""
    beside_project = Path(tools.__file__).resolve().parents[1] / DEFAULT_CHECKPOINT
    return beside_project if beside_project.exists() else Path.cwd() / DEFAULT_CHECKPOINT


def read_midi(path: Path | str) -> symusic.Score:
    """Read a MIDI file with symusic; CompleteError (one line) if it is missing or not MIDI."""
    import symusic

    path = Path(path)
    if not path.exists():
        raise CompleteError(f"{path}: no such file", path)
    if not path.is_file():
        raise CompleteError(f"{path} is not a file", path)
    try:
        return symusic.Score.from_midi(path.read_bytes())
    except (RuntimeError, ValueError) as err:
        reason = str(err).replace("MiniMidi: ", "").replace(": iostream error", "").strip()
        raise CompleteError(f"{path} is not a readable MIDI file ({reason})", path) from err


def _note_end_beats(score: symusic.Score) -> float:
    """When the last note of any track stops sounding, in quarter-note beats (0 if no notes)."""
    ends = [note.end for track in score.tracks for note in track.notes]
    return max(ends, default=0) / score.ticks_per_quarter


def build_prompt(score: symusic.Score, tokenizer, layout: RemiLayout, context_bars: int,
                 source: Path | None = None) -> Prompt:
    """Encode `score` like a training piece and cut the prompt of its last `context_bars` bars."""
    import numpy as np

    from model.remi_grammar import RemiStreamDecoder, TokenKind
    from train.prepare import bar_index, encode_score, token_id_sets

    name = source if source is not None else "the input"
    ids = encode_score(tokenizer, score).astype(np.int64)
    if not any(layout.kinds[token] == TokenKind.PITCH for token in ids.tolist()):
        raise CompleteError(f"{name} has no notes the model can read (pitches {_pitch_span(layout)})", source)
    bars, bar_context = bar_index(ids, np.array([0, ids.size]), *token_id_sets(tokenizer))
    decoder = RemiStreamDecoder(layout=layout)
    bar_starts: list[float] = []
    for token in ids.tolist():
        decoder.push(token)
        if layout.kinds[token] == TokenKind.BAR:
            bar_starts.append(decoder.bar_start_beats)
    first = max(0, len(bars) - context_bars)
    window = ids[bars[first]:].tolist()
    if first > 0:
        window = _restate(window, int(bar_context[first, 0]), int(bar_context[first, 1]), layout)

    meter = decoder.meter
    timesig_id = layout.timesig_ids.get(meter)
    beats_per_bar = decoder.bar_length_beats
    continuation = decoder.bar_start_beats + beats_per_bar
    waiting = 0
    input_end = _note_end_beats(score)
    # Let held notes ring out: an empty bar (Bar TimeSig) per bar line they cross, as the
    # tokenizer writes a long note, so the continuation does not start under them.
    while input_end > continuation + END_TOLERANCE_BEATS and timesig_id is not None:
        window += [layout.bar_id, timesig_id]
        continuation += beats_per_bar
        waiting += 1
    in_file = [(ts.numerator, ts.denominator) for ts in score.time_signatures]
    file_meter = in_file[-1] if in_file else (4, 4)
    return Prompt(window, bar_starts[first], continuation, beats_per_bar, meter, len(bars) - first, waiting,
                  len(bars), None if file_meter == tuple(meter) else file_meter)


def _pitch_span(layout: RemiLayout) -> str:
    pitches = sorted(layout.pitch_ids)
    return f"{pitches[0]}..{pitches[-1]}"


def _restate(window: list[int], tempo_id: int, timesig_id: int, layout: RemiLayout) -> list[int]:
    """A window cut at a bar line, with its meter and tempo stated as a training window has them:
    TimeSig right after the first Bar, the tempo in force right after the first Position."""
    from model.remi_grammar import TokenKind

    tokens = list(window)
    if timesig_id >= 0 and (len(tokens) < 2 or layout.kinds[tokens[1]] != TokenKind.TIMESIG):
        tokens.insert(1, timesig_id)
    if tempo_id >= 0:
        pos = next((i for i, t in enumerate(tokens) if layout.kinds[t] == TokenKind.POSITION), None)
        if pos is not None and (pos + 1 >= len(tokens) or layout.kinds[tokens[pos + 1]] != TokenKind.TEMPO):
            tokens.insert(pos + 1, tempo_id)
    return tokens


# ---------------------------------------------------------------------------------------------
# Writing the result


def _variation_track(events: list[DecodedEvent], start_tick: int, end_tick: int, tpq: int,
                     name: str) -> symusic.Track:
    """A piano track of decoded notes and pedal moves placed from `start_tick` on."""
    import symusic

    from model.remi_grammar import DecodedNote, DecodedPedal

    track = symusic.Track(name, 0, False)
    pedal_down = False
    for event in events:
        if isinstance(event, DecodedNote):
            tick = start_tick + round(event.start_beats * tpq)
            duration = max(1, round(event.duration_beats * tpq))
            track.notes.append(symusic.Note(tick, duration, event.pitch, event.velocity))
        elif isinstance(event, DecodedPedal):
            track.controls.append(symusic.ControlChange(start_tick + round(event.beats * tpq), SUSTAIN_CC,
                                                        127 if event.down else 0))
            pedal_down = event.down
    if pedal_down:  # never leave the pedal down past the end of the continuation
        track.controls.append(symusic.ControlChange(end_tick, SUSTAIN_CC, 0))
    track.sort()
    return track


def _bar_meters(tokens: list[int], layout: RemiLayout) -> list[tuple[int, int]]:
    """The meter of every bar in a completion's tokens (each Bar is followed by its TimeSig)."""
    from model.remi_grammar import TokenKind

    return [layout.values[token] for token in tokens if layout.kinds[token] == TokenKind.TIMESIG]  # type: ignore[misc]


def _roll_notes(events: list[DecodedEvent]) -> list[RollNote]:
    from model.remi_grammar import DecodedNote

    return [RollNote(e.start_beats, e.start_beats + e.duration_beats, e.pitch, e.velocity)
            for e in events if isinstance(e, DecodedNote)]


def _context_roll(score: symusic.Score, start_beats: float, end_beats: float) -> list[RollNote]:
    """Notes of the input's melodic tracks that start between two times, in beats from `start_beats`."""
    tpq = score.ticks_per_quarter
    notes = []
    for track in score.tracks:
        if track.is_drum:
            continue
        for note in track.notes:
            start = note.time / tpq
            if start_beats - 1e-9 <= start < end_beats:
                notes.append(RollNote(start - start_beats, note.end / tpq - start_beats, note.pitch, note.velocity))
    return sorted(notes, key=lambda n: (n.start_beats, n.pitch))


def _add_meter(score: symusic.Score, tick: int, meter: tuple[int, int]) -> None:
    """State the continuation's meter at `tick` if the score's meter in force differs."""
    import symusic

    in_force = [ts for ts in score.time_signatures if ts.time <= tick]
    current = (in_force[-1].numerator, in_force[-1].denominator) if in_force else (4, 4)
    if current != tuple(meter):
        score.time_signatures.append(symusic.TimeSignature(tick, meter[0], meter[1]))
        score.time_signatures.sort()


def _write_midi(score: symusic.Score, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mid")
    try:
        score.dump_midi(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def wav_paths_for(wav_path: Path, variations: int) -> list[Path]:
    """OUT.wav for one variation; OUT-1.wav .. OUT-K.wav for K > 1."""
    if variations == 1:
        return [wav_path]
    return [wav_path.with_name(f"{wav_path.stem}-{k}{wav_path.suffix or '.wav'}") for k in range(1, variations + 1)]


def _render_wavs(result: ContinuedScore, input_tracks: int, wav_path: Path,
                 renderer: FluidsynthRenderer) -> list[Path]:
    """One WAV per variation: the prompt's bars of every input track, then that variation."""
    tpq = result.score.ticks_per_quarter
    context_tick = round(result.prompt.context_beats * tpq)
    longest = max(result.variation_beats(k) for k in range(len(result.meters)))
    end_tick = result.continuation_tick + round(longest * tpq)
    # clip() restates the tempo, meter and key in force at context_tick, so nothing is left
    # before it for shift_time to move to a negative time.
    excerpt = result.score.clip(context_tick, end_tick, clip_end=False).shift_time(-context_tick)
    variations = len(result.score.tracks) - input_tracks
    written = []
    for k, path in enumerate(wav_paths_for(wav_path, variations)):
        single = excerpt.copy()
        for index in reversed(range(input_tracks, len(single.tracks))):
            if index != input_tracks + k:
                del single.tracks[index]
        written.append(renderer.render_score(single, path))
    return written


# ---------------------------------------------------------------------------------------------
# The whole completion


def continue_score(score: symusic.Score, engine: Engine, request: CompletionRequest,
                   source: Path | None = None) -> ContinuedScore:
    """Continue `score` with `engine` (reset first); the output score is a new object."""
    import torch

    prompt = build_prompt(score, engine.tokenizer, engine.grammar.layout, request.context_bars, source)
    with torch.no_grad():
        engine.reset()  # BOS
        started = time.perf_counter()
        engine.feed(prompt.ids)
        prefill_seconds = time.perf_counter() - started
        completion = engine.generate(request.bars, request.sampling(), seed=request.seed,
                                     variations=request.variations)

    tpq = score.ticks_per_quarter
    out = score.copy()
    start_tick = round(prompt.continuation_beats * tpq)
    _add_meter(out, start_tick, prompt.meter)
    layout = engine.grammar.layout
    meters = [_bar_meters(tokens, layout) for tokens in completion.tokens]
    for k, events in enumerate(completion.events):
        end_tick = start_tick + round(sum(num * 4 / den for num, den in meters[k]) * tpq)
        out.tracks.append(_variation_track(events, start_tick, end_tick, tpq, f"variation {k + 1}"))
    return ContinuedScore(
        score=out,
        prompt=prompt,
        completion=completion,
        notes=[_roll_notes(events) for events in completion.events],
        context_notes=_context_roll(score, prompt.context_beats, prompt.continuation_beats),
        meters=meters,
        prefill_seconds=prefill_seconds,
        generate_seconds=completion.seconds,
    )


def complete_midi(source: Path | str, out: Path | str, model: RWKV7, meta: CheckpointMeta,
                  request: CompletionRequest | None = None, *, png: Path | str | None = None,
                  wav: Path | str | None = None, renderer: FluidsynthRenderer | None = None,
                  soundfont: Path | str | None = None) -> ContinuedScore:
    """Continue the MIDI file `source` and write `out` (plus a piano-roll PNG / WAV if asked).

    `model` and `meta` as `model.load` returns them. With `wav`, fluidsynth and a soundfont
    are found before anything is generated (`renderer`, or located with `soundfont`), so a
    missing one fails fast with AudioRenderError. Returns the ContinuedScore.
    """
    from daemon.engine import Engine
    from tools.audio_render import FluidsynthRenderer

    request = request or CompletionRequest()
    source, out = Path(source), Path(out)
    if not out.parent.is_dir():
        raise CompleteError(f"cannot write {out}: folder {out.parent} does not exist", out)
    if out.exists() and out.resolve() == source.resolve():
        raise CompleteError(f"{out} is the input file; choose another output name", out)
    if wav is not None and renderer is None:
        renderer = FluidsynthRenderer.locate(soundfont)
    score = read_midi(source)
    engine = Engine(model, meta, step_weights=request.weights)
    result = continue_score(score, engine, request, source)
    _write_midi(result.score, out)
    if png is not None:
        from tools.piano_roll import save_piano_roll

        context, rows = result.roll_rows()
        last_bar = result.prompt.piece_bars + result.prompt.waiting_bars
        save_piano_roll(png, context, rows, beats_per_bar=result.prompt.beats_per_bar,
                        title=f"{source.name}: {request.bars} bars after bar {last_bar}")
    if wav is not None:
        assert renderer is not None
        result.wav_paths = _render_wavs(result, len(score.tracks), Path(wav), renderer)
    return result


# ---------------------------------------------------------------------------------------------
# Command line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "complete",
        help="continue a MIDI file with the model (variations, piano roll, audio)",
        description=(
            "Continue IN.mid by --bars bars with an RWKV-7 checkpoint and write OUT.mid. "
            "--variations K samples K continuations in one batched pass."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, metavar="IN.mid", help="the MIDI file to continue")
    p.add_argument("output", type=Path, metavar="OUT.mid", help="where to write the input plus the continuation")
    p.add_argument("--bars", type=int, default=4, metavar="N", help=f"bars to generate, 1..{MAX_BARS} (default 4)")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                   help="a .safetensors checkpoint (default: checkpoints/default.safetensors)")
    p.add_argument("--context-bars", type=int, default=8, metavar="M",
                   help="the last M bars of the input are the prompt (default 8)")
    p.add_argument("--variations", type=int, default=1, metavar="K",
                   help=f"continuations sampled together in one batch, 1..{MAX_VARIATIONS} (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0.05..5 (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus mass, 0.01..1 (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K likeliest tokens, 0 = off (default)")
    p.add_argument("--seed", type=int, default=-1, metavar="S", help="sampling seed; -1 = a fresh one (default)")
    p.add_argument("--png", type=Path, default=None, metavar="OUT.png", help="also draw a piano roll")
    p.add_argument("--wav", type=Path, default=None, metavar="OUT.wav", help="also render audio with fluidsynth")
    p.add_argument("--soundfont", type=Path, default=None, metavar="SF2",
                   help="General MIDI soundfont for --wav (default: $RWKV_MUSIC_SOUNDFONT or a system one)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, metavar="FORMAT",
                   help=f"how the CPU step stores the large matrices: {' | '.join(WEIGHT_FORMATS)} "
                        f"(default {DEFAULT_WEIGHTS}, as [daemon] weights; docs/cpu-step.md)")
    p.set_defaults(run=run_complete)


def run_complete(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    request = CompletionRequest(bars=args.bars, context_bars=args.context_bars, variations=args.variations,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                weights=args.weights)
    # Cheap checks first: a wrong path should not wait for a model to load.
    read_midi(args.input)
    renderer = None
    if args.wav is not None:
        from tools.audio_render import FluidsynthRenderer

        renderer = FluidsynthRenderer.locate(args.soundfont)
    checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint()
    if not checkpoint.is_file():
        raise CompleteError(f"checkpoint {checkpoint} not found (name one with --checkpoint)", checkpoint)
    import torch

    from model import load

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CompleteError("--device cuda: no CUDA GPU is available here")
    model, meta = load(checkpoint, device=args.device)
    result = complete_midi(args.input, args.output, model, meta, request, png=args.png, wav=args.wav,
                           renderer=renderer)
    print(summary_text(args.input, args.output, result, request, meta.model_id, time.perf_counter() - started))
    if args.png is not None:
        print(f"wrote {args.png}")
    for path in result.wav_paths:
        print(f"wrote {path}")
    return 0


def summary_text(source: Path, out: Path, result: ContinuedScore, request: CompletionRequest, model_id: str,
                 seconds: float) -> str:
    """A few lines for the terminal: what was used, what came out, how long it took."""
    prompt = result.prompt
    waited = f", then {prompt.waiting_bars} bars for held notes" if prompt.waiting_bars else ""
    lines = []
    if prompt.input_meter is not None:
        lines.append(f"note: the tokenizer has no {prompt.input_meter[0]}/{prompt.input_meter[1]} time signature; "
                     f"the model read the input in {prompt.meter[0]}/{prompt.meter[1]} and the continuation "
                     "follows those bars")
    lines += [
        f"{source}: last {prompt.context_bars} of {prompt.piece_bars} bars as context "
        f"({len(prompt.ids) + 1} tokens{waited}); model {model_id}",
        f"{request.bars} bars from bar {prompt.piece_bars + prompt.waiting_bars + 1} "
        f"(meter {prompt.meter[0]}/{prompt.meter[1]}), {request.variations} "
        f"variation{'s' if request.variations > 1 else ''} in one batch",
    ]
    for k, (notes, bars) in enumerate(zip(result.notes, result.bars_generated, strict=True)):
        ended = f", ended after bar {bars} (the model closed the piece)" if bars < request.bars else ""
        meter = result.changed_meter(k)
        if meter is not None:
            ended += (f", changed the meter to {meter[0]}/{meter[1]} (the file keeps "
                      f"{prompt.meter[0]}/{prompt.meter[1]}; notes keep their beat times)")
        lines.append(f"  variation {k + 1}: {len(notes)} notes{ended}")
    lines.append(f"wrote {out}; {seconds:.2f} s in all (prompt {result.prefill_seconds:.2f} s, "
                 f"generation {result.generate_seconds:.2f} s)")
    return "\n".join(lines)
