"""`rwkv-music complete`, the piano roll and the WAV renderer, on real MIDI files from the corpus.

A small random model (tests/model_factory.py) keeps generation fast; one test runs the real
default checkpoint when it is present. fluidsynth and the soundfont are the system's own.
"""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import mido
import numpy as np
import pytest
import symusic

from model import save
from model.checkpoint import CheckpointMeta
from model.remi_grammar import RemiGrammar, TokenKind
from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
from tests.model_factory import random_model
from tools import cli
from tools.audio_render import (
    SOUNDFONT_ENV,
    AudioRenderError,
    FluidsynthNotFoundError,
    FluidsynthRenderer,
    SoundfontNotFoundError,
    find_soundfont,
)
from tools.complete import (
    CompleteOptionError,
    CompletionRequest,
    build_prompt,
    complete_midi,
    default_checkpoint,
    read_midi,
)
from tools.piano_roll import CONTEXT_COLOR, RollNote, save_piano_roll

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fluidsynth_ready() -> bool:
    try:
        FluidsynthRenderer.locate()
    except AudioRenderError:
        return False
    return True


needs_fluidsynth = pytest.mark.skipif(not _fluidsynth_ready(), reason="fluidsynth or a GM soundfont is not installed")


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object, CheckpointMeta]:
    """A small random model saved as a checkpoint: (path, model, meta)."""
    tokenizer = build_tokenizer()
    model = random_model(n_layer=2, n_embd=64, seed=3)
    meta = CheckpointMeta(model_config=model.cfg, tokenizer_params=DEFAULT_TOKENIZER_PARAMS,
                          vocab_hash=vocab_hash(tokenizer))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    meta = save(model, path, meta)
    return path, model, meta


@pytest.fixture
def with_complete_command(monkeypatch):
    """`rwkv-music complete` in the CLI whether or not tools/cli.py lists it yet."""
    if "tools.complete" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "tools.complete"])


def _single_meter(path: Path) -> tuple[int, int] | None:
    score = symusic.Score(str(path))
    meters = {(ts.numerator, ts.denominator) for ts in score.time_signatures}
    return meters.pop() if len(meters) == 1 else None


@pytest.fixture(scope="module")
def chorale(corpus_midi_files) -> Path:
    """A four-voice Bach chorale in 4/4."""
    return next(p for p in corpus_midi_files if p.parent.name == "bach" and _single_meter(p) == (4, 4))


@pytest.fixture(scope="module")
def jig(corpus_midi_files) -> Path:
    """A folk tune in 6/8 (a bar is 3 quarter-note beats)."""
    return next(p for p in corpus_midi_files if p.parent.name in ("oneills", "airds") and _single_meter(p) == (6, 8))


def _bar_ticks(score: symusic.Score, tick: int) -> tuple[int, int]:
    """(bar length in ticks, the time of the meter in force) at `tick`."""
    ts = [t for t in score.time_signatures if t.time <= tick][-1]
    return ts.numerator * score.ticks_per_quarter * 4 // ts.denominator, ts.time


def _last_note_end(score: symusic.Score) -> int:
    return max(n.end for t in score.tracks for n in t.notes)


def _continuation_tick(original: symusic.Score) -> int:
    """The first bar line at or after the end of the input's last note (1/16 beat of slack)."""
    end = _last_note_end(original)
    bar, meter_time = _bar_ticks(original, end)
    return meter_time + -(-(end - meter_time - original.ticks_per_quarter // 16) // bar) * bar


def _check_continuation(source: Path, out: Path, bars: int, variations: int, result=None,
                        meter_kept: bool = True) -> symusic.Score:
    """The output holds the input's tracks unchanged, then `variations` tracks of at most `bars`
    bars that start at the first bar line after the input's last note; returns it.

    With `result` (a ContinuedScore), each track must hold exactly its decoded notes, within
    the bars the model wrote. Otherwise the bars are taken in the input's meter (meter_kept),
    or as the longest bar the vocabulary has (4/2: 8 quarter-note beats)."""
    original = symusic.Score(str(source))
    midi = mido.MidiFile(str(out))  # an independent reader accepts the file
    output = symusic.Score(str(out))
    tpq = original.ticks_per_quarter
    assert midi.ticks_per_beat == tpq == output.ticks_per_quarter
    names = [t.name for t in output.tracks]
    assert names[len(original.tracks):] == [f"variation {k + 1}" for k in range(variations)]
    assert [t.name for t in midi.tracks if any(m.type == "note_on" for m in t)][-variations:] == \
        names[len(original.tracks):]
    for before, after in zip(original.tracks, output.tracks, strict=False):
        assert [(n.time, n.duration, n.pitch) for n in before.notes] == \
            [(n.time, n.duration, n.pitch) for n in after.notes]
    assert [(t.time, t.qpm) for t in output.tempos] == [(t.time, t.qpm) for t in original.tempos]
    first_line = _continuation_tick(original)
    bar, _ = _bar_ticks(original, first_line)
    tracks = output.tracks[len(original.tracks):]
    assert any(len(track.notes) for track in tracks)
    for k, track in enumerate(tracks):
        if result is not None:
            assert result.continuation_tick == first_line and result.bars_generated[k] <= bars
            expected = sorted((first_line + round(n.start_beats * tpq), n.pitch) for n in result.notes[k])
            assert sorted((n.time, n.pitch) for n in track.notes) == expected
            length = round(result.variation_beats(k) * tpq)
        else:
            length = bars * (bar if meter_kept else 8 * tpq)
        for note in track.notes:
            assert first_line <= note.time < first_line + length
    return output


# ---------------------------------------------------------------------------------------------
# Prompt


def test_prompt_restates_meter_and_tempo_like_a_training_window(chorale):
    tokenizer = build_tokenizer()
    grammar = RemiGrammar(tokenizer)
    score = read_midi(chorale)
    whole = build_prompt(score, tokenizer, grammar.layout, context_bars=10_000)
    cut = build_prompt(score, tokenizer, grammar.layout, context_bars=3)
    kinds = grammar.layout.kinds
    assert whole.context_bars == whole.piece_bars > 3 and whole.context_beats == 0.0
    assert cut.context_bars == 3 and cut.piece_bars == whole.piece_bars
    assert [t for t in cut.ids if t == grammar.layout.bar_id] == [grammar.layout.bar_id] * 3
    assert kinds[cut.ids[0]] == TokenKind.BAR and kinds[cut.ids[1]] == TokenKind.TIMESIG
    first_position = next(i for i, t in enumerate(cut.ids) if kinds[t] == TokenKind.POSITION)
    assert kinds[cut.ids[first_position + 1]] == TokenKind.TEMPO
    for prompt in (whole, cut):  # with the BOS the engine puts first, a stream the grammar accepts
        assert grammar.accepts([grammar.layout.bos_id, *prompt.ids])
    assert cut.continuation_beats == whole.continuation_beats
    assert cut.context_beats == whole.continuation_beats - 3 * whole.beats_per_bar
    end_beats = _last_note_end(score) / score.ticks_per_quarter
    assert 0 <= cut.continuation_beats - end_beats < cut.beats_per_bar


def test_prompt_waits_for_held_notes(chorale, tmp_path):
    tokenizer = build_tokenizer()
    layout = RemiGrammar(tokenizer).layout
    score = read_midi(chorale)
    plain = build_prompt(score, tokenizer, layout, context_bars=4)
    last = max((n for t in score.tracks for n in t.notes), key=lambda n: n.end)
    # Hold the last note 1.5 bars past the bar line where the continuation would start.
    tpq = score.ticks_per_quarter
    last.duration = round((plain.continuation_beats + 1.5 * plain.beats_per_bar) * tpq) - last.time
    held = tmp_path / "held.mid"
    score.dump_midi(str(held))
    waited = build_prompt(read_midi(held), tokenizer, layout, context_bars=4)
    assert waited.waiting_bars == 2
    assert waited.continuation_beats == plain.continuation_beats + 2 * plain.beats_per_bar
    assert waited.ids[-4:] == [layout.bar_id, waited.ids[-3], layout.bar_id, waited.ids[-1]]


# ---------------------------------------------------------------------------------------------
# Completion with the small model


def test_complete_midi_writes_the_input_then_the_continuation(tiny, chorale, tmp_path):
    _, model, meta = tiny
    out = tmp_path / "out.mid"
    result = complete_midi(chorale, out, model, meta, CompletionRequest(bars=2, context_bars=4, seed=11))
    _check_continuation(chorale, out, bars=2, variations=1, result=result)
    assert result.prompt.meter == (4, 4) and result.prompt.context_bars == 4


def test_complete_midi_in_six_eight(tiny, jig, tmp_path):
    _, model, meta = tiny
    out = tmp_path / "jig.mid"
    result = complete_midi(jig, out, model, meta, CompletionRequest(bars=3, context_bars=4, seed=2))
    assert result.prompt.meter == (6, 8) and result.prompt.beats_per_bar == 3.0
    _check_continuation(jig, out, bars=3, variations=1, result=result)


def test_complete_variations_differ_and_come_from_one_batch(tiny, chorale, tmp_path):
    _, model, meta = tiny
    batch_sizes: list[int] = []
    step = model.step

    def counting_step(idx, state):
        batch_sizes.append(int(idx.shape[0]))
        return step(idx, state)

    model.step = counting_step
    try:
        out = tmp_path / "four.mid"
        result = complete_midi(chorale, out, model, meta,
                               CompletionRequest(bars=2, context_bars=4, variations=4, seed=5))
    finally:
        del model.step
    _check_continuation(chorale, out, bars=2, variations=4, result=result)
    tracks = symusic.Score(str(out)).tracks[-4:]
    notes = [tuple((n.time, n.duration, n.pitch, n.velocity) for n in t.notes) for t in tracks]
    assert len(set(notes)) > 1, "four variations, all equal"
    # Generation ran the four streams together: every step after the prompt had batch 4, and
    # there were as many as the longest variation needed, not the sum of all four.
    generation_steps = [b for b in batch_sizes if b == 4]
    assert batch_sizes[-len(generation_steps):] == generation_steps
    longest = max(len(tokens) for tokens in result.completion.tokens)
    assert longest <= len(generation_steps) <= longest + 1
    assert len(generation_steps) < sum(len(tokens) for tokens in result.completion.tokens)


def test_complete_seed_repeats_the_same_file(tiny, chorale, tmp_path):
    _, model, meta = tiny
    request = CompletionRequest(bars=2, context_bars=2, variations=2, seed=123)
    first, second, other = tmp_path / "a.mid", tmp_path / "b.mid", tmp_path / "c.mid"
    complete_midi(chorale, first, model, meta, request)
    complete_midi(chorale, second, model, meta, request)
    complete_midi(chorale, other, model, meta, CompletionRequest(bars=2, context_bars=2, variations=2, seed=124))
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()


# ---------------------------------------------------------------------------------------------
# Command line


@needs_fluidsynth
def test_complete_cli_writes_midi_png_and_wav(tiny, chorale, tmp_path, capsys, with_complete_command):
    ckpt, _, _ = tiny
    out, png, wav = tmp_path / "out.mid", tmp_path / "roll.png", tmp_path / "out.wav"
    code = cli.main(["complete", str(chorale), str(out), "--checkpoint", str(ckpt), "--bars", "2",
                     "--context-bars", "2", "--variations", "2", "--seed", "9", "--png", str(png),
                     "--wav", str(wav)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "variation 1:" in printed and "variation 2:" in printed and "notes" in printed
    score = _check_continuation(chorale, out, bars=2, variations=2, meter_kept=False)
    assert png.read_bytes()[:8] == PNG_MAGIC
    wavs = [tmp_path / "out-1.wav", tmp_path / "out-2.wav"]
    assert not wav.exists() and all(p.exists() for p in wavs)
    # Each WAV holds the two context bars and one variation, up to its last note's end.
    tpq, qpm = score.ticks_per_quarter, score.tempos[-1].qpm
    assert len(score.tempos) == 1
    bar = 4 * tpq
    n_input = len(score.tracks) - 2
    continuation_tick = _continuation_tick(symusic.Score(str(chorale)))
    context_tick = continuation_tick - 2 * bar
    context_end = max(n.end for t in score.tracks[:n_input] for n in t.notes if n.time >= context_tick)
    for k, path in enumerate(wavs):
        last_end = max([context_end] + [n.end for n in score.tracks[n_input + k].notes])
        music_seconds = (last_end - context_tick) / tpq * 60 / qpm
        with wave.open(str(path), "rb") as audio:
            frames = audio.readframes(audio.getnframes())
            seconds = audio.getnframes() / audio.getframerate()
            assert audio.getsampwidth() == 2
        samples = np.frombuffer(frames, dtype="<i2")
        assert np.abs(samples).max() > 1000, "silent WAV"
        assert music_seconds - 0.1 < seconds < music_seconds + 5  # fluidsynth adds the release tail


def test_complete_cli_without_fluidsynth_fails_before_generating(tiny, chorale, tmp_path, monkeypatch, capsys,
                                                                  with_complete_command):
    ckpt, _, _ = tiny
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    out = tmp_path / "out.mid"
    code = cli.main(["complete", str(chorale), str(out), "--checkpoint", str(ckpt), "--wav", str(tmp_path / "o.wav")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "fluidsynth" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="fluidsynth is not installed")
def test_complete_cli_missing_soundfont(tiny, chorale, tmp_path, capsys, with_complete_command):
    ckpt, _, _ = tiny
    missing = tmp_path / "nowhere.sf2"
    code = cli.main(["complete", str(chorale), str(tmp_path / "out.mid"), "--checkpoint", str(ckpt),
                     "--wav", str(tmp_path / "o.wav"), "--soundfont", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(missing) in err


@pytest.mark.parametrize("case", ["not-midi", "missing", "no-playable-notes", "output-is-input", "bars-zero",
                                  "bars-negative", "variations-zero", "temperature-zero", "no-output-folder",
                                  "missing-checkpoint"])
def test_complete_cli_bad_input_is_one_line(case, tiny, chorale, tmp_path, capsys, with_complete_command):
    ckpt, _, _ = tiny
    source, out, extra = str(chorale), str(tmp_path / "out.mid"), []
    if case == "not-midi":
        text = tmp_path / "notes.mid"
        text.write_text("this is a text file, not a standard MIDI file\n")
        source = str(text)
    elif case == "missing":
        source = str(tmp_path / "absent.mid")
    elif case == "no-playable-notes":  # a real MIDI file whose only note is below the piano's A0
        score = symusic.Score(480)
        track = symusic.Track("low", 0, False)
        track.notes.append(symusic.Note(0, 480, 12, 90))
        score.tracks.append(track)
        score.dump_midi(str(tmp_path / "low.mid"))
        source = str(tmp_path / "low.mid")
    elif case == "output-is-input":
        shutil.copyfile(chorale, tmp_path / "out.mid")
        source = out
    elif case == "no-output-folder":
        out = str(tmp_path / "no" / "such" / "out.mid")
    else:
        extra = {"bars-zero": ["--bars", "0"], "bars-negative": ["--bars", "-3"],
                 "variations-zero": ["--variations", "0"], "temperature-zero": ["--temperature", "0"],
                 "missing-checkpoint": ["--checkpoint", str(tmp_path / "none.safetensors")]}[case]
    if case != "missing-checkpoint":
        extra += ["--checkpoint", str(ckpt)]
    code = cli.main(["complete", source, out, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rwkv-music: error: ") and err.count("\n") == 1 and "Traceback" not in err
    if case == "output-is-input":
        assert Path(out).read_bytes() == chorale.read_bytes()
    else:
        assert not Path(out).exists()


def test_completion_request_names_the_option():
    with pytest.raises(CompleteOptionError) as caught:
        CompletionRequest(top_p=0.0)
    assert caught.value.option == "--top-p"
    with pytest.raises(CompleteOptionError, match="--context-bars"):
        CompletionRequest(context_bars=0)
    with pytest.raises(CompleteOptionError, match="--weights.*fp32 . bf16 . int8"):
        CompletionRequest(weights="fp16")


def test_complete_with_the_default_checkpoint(chorale, tmp_path, capsys, with_complete_command):
    if not default_checkpoint().is_file():
        pytest.skip("checkpoints/default.safetensors is not present")
    out = tmp_path / "default.mid"
    code = cli.main(["complete", str(chorale), str(out), "--bars", "2", "--variations", "2", "--seed", "4"])
    assert code == 0, capsys.readouterr().err
    score = _check_continuation(chorale, out, bars=2, variations=2)
    notes = [t.notes for t in score.tracks[-2:]]
    assert all(len(n) >= 4 for n in notes), "the trained model wrote (almost) nothing"
    # Trained on chorales, it writes in the register of the input, not at random across 88 keys.
    pitches = [n.pitch for n in score.tracks[0].notes] + [n.pitch for t in score.tracks[1:-2] for n in t.notes]
    low, high = min(pitches) - 12, max(pitches) + 12
    assert all(low <= n.pitch <= high for track in notes for n in track)


# ---------------------------------------------------------------------------------------------
# Piano roll


def _pixels_of(image: np.ndarray, hex_color: str) -> int:
    import matplotlib.colors as mcolors

    rgb = np.array(mcolors.to_rgb(hex_color))
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).sum())


def test_piano_roll_rows_colours_and_size(tmp_path):
    import matplotlib.image as mpimg

    context = [RollNote(i * 0.5, i * 0.5 + 0.5, 60 + i % 7, 127) for i in range(16)]
    rows = [[RollNote(8 + i, 9 + i, 62 + k + i, 127) for i in range(8)] for k in range(3)]
    one = save_piano_roll(tmp_path / "one.png", context, rows[:1], beats_per_bar=4.0, title="one")
    three = save_piano_roll(tmp_path / "three.png", context, rows, beats_per_bar=3.0)
    alone = save_piano_roll(tmp_path / "alone.png", context, [])
    for path in (one, three, alone):
        assert path.read_bytes()[:8] == PNG_MAGIC
    one_img, three_img, alone_img = (mpimg.imread(p) for p in (one, three, alone))
    assert three_img.shape[0] > 2 * one_img.shape[0] * 0.9  # a row per continuation
    blue, orange, green = "#1f77b4", "#ff7f0e", "#2ca02c"  # matplotlib's tab10, rows 1..3
    assert _pixels_of(one_img, CONTEXT_COLOR) > 100 and _pixels_of(one_img, blue) > 100
    assert all(_pixels_of(three_img, c) > 100 for c in (blue, orange, green))
    assert _pixels_of(alone_img, CONTEXT_COLOR) > 100 and _pixels_of(alone_img, blue) == 0
    with pytest.raises(ValueError):
        save_piano_roll(tmp_path / "bad.png", context, rows, beats_per_bar=0.0)


# ---------------------------------------------------------------------------------------------
# Audio


@needs_fluidsynth
def test_render_wav_with_the_system_fluidsynth(chorale, tmp_path):
    renderer = FluidsynthRenderer.locate()
    wav = renderer.render(chorale, tmp_path / "chorale.wav")
    seconds_expected = symusic.Score(str(chorale)).to("second").end()
    with wave.open(str(wav), "rb") as audio:
        assert audio.getframerate() == 44100 and audio.getnchannels() == 2
        seconds = audio.getnframes() / audio.getframerate()
    assert seconds_expected <= seconds < seconds_expected + 5


@needs_fluidsynth
def test_find_soundfont_order_and_errors(tmp_path):
    system = find_soundfont(environ={})
    assert system.is_file() and system.suffix in (".sf2", ".sf3")
    copy = tmp_path / "mine.sf2"
    shutil.copyfile(system, copy)
    assert find_soundfont(environ={SOUNDFONT_ENV: str(copy)}) == copy
    assert find_soundfont(copy, environ={SOUNDFONT_ENV: "/elsewhere.sf2"}) == copy
    with pytest.raises(SoundfontNotFoundError, match=SOUNDFONT_ENV):
        find_soundfont(environ={SOUNDFONT_ENV: str(tmp_path / "gone.sf2")})
    with pytest.raises(SoundfontNotFoundError, match="none was found"):
        find_soundfont(environ={}, folders=(tmp_path / "empty",))
    folder = tmp_path / "fonts"
    folder.mkdir()
    shutil.copyfile(system, folder / "zz.sf2")
    assert find_soundfont(environ={}, folders=(folder,)) == folder / "zz.sf2"


def test_fluidsynth_missing_from_path(tmp_path):
    with pytest.raises(FluidsynthNotFoundError, match="apt install fluidsynth"):
        FluidsynthRenderer.locate(search_path=str(tmp_path))
