"""`rwkv-music eval` generation figures: the pure metrics on hand-built notes with known answers,
the key finder against music21's own Krumhansl-Schmuckler, pairs and baselines on real shards,
and the command's table and JSON with a tiny random model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.remi_grammar import RemiGrammar
from model.sampling import SamplingSettings
from tools.cli import main as cli_main
from tools.evaluate import (
    bar_notes,
    model_continuation,
    ngram_continuation,
    pair_figures,
    repeat_last_bar,
    restate_context,
    select_pairs,
)
from tools.generation_metrics import (
    BarNote,
    Key,
    Summary,
    chord_share,
    density_ratio,
    estimate_key,
    histogram_overlap,
    in_key_share,
    mean_polyphony,
    onset_histogram,
    pitch_class_entropy,
    pitch_class_histogram,
    pitch_range,
)
from tools.ngram import NGramModel
from train.shards import TokenShards
from train.windows import TokenTable

C_MAJOR_SCALE = [60, 62, 64, 65, 67, 69, 71, 72]


def notes_of(pitches, onsets=None, durations=None, bar: int = 0) -> list[BarNote]:
    onsets = onsets if onsets is not None else [0.5 * i for i in range(len(pitches))]
    durations = durations if durations is not None else [0.5] * len(pitches)
    return [BarNote(p, bar, o, d) for p, o, d in zip(pitches, onsets, durations)]


# --------------------------------------------------------------------------------- pure metrics


def test_histogram_overlap_identical_disjoint_and_partial():
    scale = notes_of(C_MAJOR_SCALE)
    assert histogram_overlap(pitch_class_histogram(scale), pitch_class_histogram(scale)) == pytest.approx(1.0)
    # Same shape, different counts: still 1 (histograms are normalised).
    doubled = pitch_class_histogram(scale + scale)
    assert histogram_overlap(doubled, pitch_class_histogram(scale)) == pytest.approx(1.0)
    black_keys = notes_of([61, 63, 66, 68, 70])
    assert histogram_overlap(pitch_class_histogram(scale), pitch_class_histogram(black_keys)) == 0.0
    # {C, E} against {C, G}: half of each on C -> 0.5.
    assert histogram_overlap(pitch_class_histogram(notes_of([60, 64])),
                             pitch_class_histogram(notes_of([48, 67]))) == pytest.approx(0.5)
    assert histogram_overlap([], pitch_class_histogram(scale)) == 0.0
    assert histogram_overlap([1, 0, 3], [1]) == pytest.approx(0.25)  # padded with zeros


def test_onset_histogram_counts_positions_on_a_sixteenth_grid():
    notes = notes_of([60, 64, 67, 72, 60], onsets=[0.0, 0.0, 1.0, 1.5, 3.76])
    hist = onset_histogram(notes)
    assert hist.tolist() == [2, 0, 0, 0, 1, 0, 1] + [0] * 8 + [1]  # 3.76 beats -> nearest 16th, 15
    assert onset_histogram([]).size == 0
    on_beats = notes_of([60] * 4, onsets=[0, 1, 2, 3])
    off_beats = notes_of([60] * 4, onsets=[0.5, 1.5, 2.5, 3.5])
    assert histogram_overlap(onset_histogram(on_beats), onset_histogram(off_beats)) == 0.0


def test_density_ratio_is_notes_per_bar_over_real_notes_per_bar():
    real = notes_of([60] * 8)
    assert density_ratio(notes_of([60] * 12), real, bars=4) == pytest.approx(1.5)
    assert density_ratio([], real, bars=4) == 0.0
    assert density_ratio(notes_of([60] * 4), real, bars=2, real_bars=4) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        density_ratio(real, [], bars=4)


def test_estimate_key_finds_tonic_and_mode():
    # C major: a long tonic triad over the scale.
    c_major = notes_of(C_MAJOR_SCALE + [60, 64, 67], durations=[0.5] * 8 + [4, 2, 3])
    key = estimate_key(c_major)
    assert (key.tonic, key.minor, key.name) == (0, False, "C major")
    # A harmonic minor with A, C, E held: A minor.
    a_minor = notes_of([69, 71, 72, 74, 76, 77, 80, 81, 57, 60, 64], durations=[0.5] * 8 + [4, 2, 3])
    key = estimate_key(a_minor)
    assert (key.tonic, key.minor, key.name) == (9, True, "A minor")
    assert estimate_key([]) is None
    assert estimate_key(notes_of(list(range(60, 72)))) is None  # every pitch class equally: no key


def test_estimate_key_moves_with_transposition():
    melody = notes_of([62, 66, 69, 74, 73, 71, 69, 67, 66, 64, 62], durations=[2, 1, 1, 2, 0.5, 0.5, 1, 1, 1, 1, 4])
    base = estimate_key(melody)
    assert (base.tonic, base.minor) == (2, False)  # D major
    for shift in range(1, 12):
        moved = estimate_key([BarNote(n.pitch + shift, n.bar, n.onset, n.duration) for n in melody])
        assert (moved.tonic, moved.minor) == ((2 + shift) % 12, False)
        assert moved.correlation == pytest.approx(base.correlation)


def test_estimate_key_agrees_with_music21_on_real_pieces(corpus_midi_files):
    """music21's KrumhanslSchmuckler is an independent implementation of the same method."""
    music21 = pytest.importorskip("music21")
    from music21.analysis.discrete import KrumhanslSchmuckler

    for path in corpus_midi_files[::25]:
        flat = music21.converter.parse(path).flatten()
        notes = [BarNote(p.midi, 0, 0.0, float(n.quarterLength)) for n in flat.notes for p in n.pitches]
        ours = estimate_key(notes)
        theirs = KrumhanslSchmuckler().getSolution(flat)
        assert (ours.tonic, ours.minor) == (theirs.tonic.pitchClass, theirs.mode == "minor"), path.name
        assert ours.correlation == pytest.approx(theirs.correlationCoefficient, abs=1e-6)


def test_in_key_share_of_scales():
    c_major = Key(0, False, 1.0)
    assert in_key_share(notes_of(C_MAJOR_SCALE), c_major) == 1.0
    assert in_key_share(notes_of(list(range(60, 72))), c_major) == pytest.approx(7 / 12)
    assert in_key_share(notes_of([61, 63]), c_major) == 0.0
    a_minor = Key(9, True, 1.0)
    assert in_key_share(notes_of([69, 71, 72, 74, 76, 77, 79, 80]), a_minor) == 1.0  # G and G# both in key
    assert in_key_share(notes_of([70, 73]), a_minor) == 0.0
    assert math.isnan(in_key_share([], c_major))


def test_texture_of_a_line_block_chords_and_an_arpeggio():
    line = notes_of([60, 62, 64, 65], onsets=[0, 1, 2, 3], durations=[1, 1, 1, 1])
    assert chord_share(line) == 0.0 and mean_polyphony(line) == 1.0
    assert pitch_range(line) == 5.0
    # Two triads (C E G, then F A C) held for two beats each: every onset is a chord of three.
    chords = notes_of([60, 64, 67, 65, 69, 72], onsets=[0, 0, 0, 2, 2, 2], durations=[2] * 6)
    assert chord_share(chords) == 1.0 and mean_polyphony(chords) == 3.0 and pitch_range(chords) == 12.0
    # An arpeggio whose notes are held: one onset each, but up to four sound together.
    arpeggio = notes_of([48, 55, 60, 64], onsets=[0, 0.5, 1, 1.5], durations=[4, 3.5, 3, 2.5])
    assert chord_share(arpeggio) == 0.0
    assert mean_polyphony(arpeggio) == pytest.approx((1 * 2 + 2 * 2 + 3 * 2 + 4 * 10) / 16)
    # A left-hand note and a melody note on the same onset in another bar count per bar.
    two_bars = notes_of([48, 72], onsets=[0, 0]) + notes_of([50], onsets=[0], bar=1)
    assert chord_share(two_bars) == pytest.approx(0.5)
    assert pitch_class_entropy(notes_of([60, 72, 48])) == 0.0
    assert pitch_class_entropy(notes_of(list(range(60, 72)))) == pytest.approx(math.log2(12))
    assert pitch_class_entropy(notes_of([60, 62])) == pytest.approx(1.0)
    for figure in (chord_share, mean_polyphony, pitch_range, pitch_class_entropy):
        assert math.isnan(figure([]))


def test_summary_mean_std_ci_and_nan():
    s = Summary.of([1.0, 2.0, 3.0, float("nan")])
    assert (s.mean, s.std, s.n, s.median) == (2.0, 1.0, 3, 2.0)
    assert Summary.of([1.0, 2.0, 10.0]).median == 2.0
    assert s.ci95 == pytest.approx(1.96 / math.sqrt(3))
    assert Summary.of([float("nan")]).n == 0 and math.isnan(Summary.of([]).mean)


def test_pair_figures_of_a_perfect_copy():
    real = notes_of(C_MAJOR_SCALE, onsets=[0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5])
    figures = pair_figures(real, real, Key(0, False, 1.0), bars=1)
    assert figures.pitch_class_overlap == pytest.approx(1.0) and figures.onset_overlap == pytest.approx(1.0)
    assert figures.density_ratio == 1.0 and figures.in_key_share == 1.0 and figures.notes_per_bar == 8
    assert figures.chord_share == 0.0 and figures.polyphony == 1.0 and figures.pitch_range == 12.0


# --------------------------------------------------------------------------------- real shards


@pytest.fixture(scope="module")
def prepared(small_corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    assert cli_main(["prepare", str(small_corpus_dir), str(out), "--val-fraction", "0.2",
                     "--test-fraction", "0.25", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def shards(prepared) -> TokenShards:
    return TokenShards(prepared, "test")


@pytest.fixture(scope="module")
def tokenizer(shards):
    return shards.tokenizer()


@pytest.fixture(scope="module")
def table(tokenizer) -> TokenTable:
    return TokenTable.from_vocab(tokenizer.vocab)


@pytest.fixture(scope="module")
def grammar(tokenizer) -> RemiGrammar:
    return RemiGrammar(tokenizer)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny random model over the shards' vocabulary."""
    from model.checkpoint import CheckpointMeta, save
    from model.vocab import DEFAULT_TOKENIZER_PARAMS, vocab_hash
    from tests.model_factory import random_model

    model = random_model(n_layer=1, n_embd=64, vocab_size=len(tokenizer), seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save(model, path, CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(tokenizer), step=0))
    return path


def test_bar_notes_place_every_note_in_its_bar(shards, grammar):
    layout = grammar.layout
    for i in range(len(shards)):
        tokens = shards.piece(i).astype(int).tolist()
        expected, bar, den, pos = [], -1, 4, 0
        for t in tokens:  # an independent walk: (bar, onset) of every Pitch token
            kind = layout.kinds[t].name
            if kind == "BAR":
                bar += 1
            elif kind == "TIMESIG":
                den = layout.values[t][1]
            elif kind == "POSITION":
                pos = layout.values[t]
            elif kind == "PITCH":
                expected.append((layout.values[t], bar, pos / layout.positions_per_beat * 4 / den))
        notes = bar_notes(layout, tokens)
        assert [(n.pitch, n.bar) for n in notes] == [(p, b) for p, b, _ in expected]
        assert [n.onset for n in notes] == pytest.approx([o for _, _, o in expected])
        assert all(n.duration > 0 for n in notes)


def test_select_pairs_cuts_real_bars_deterministically(shards, table, grammar):
    pairs = select_pairs(shards, table, 10, bars=2, context_bars=3, seed=5)
    assert len(pairs) >= 2 and len({p.piece for p in pairs}) == len(pairs)  # one pair per piece
    again = select_pairs(shards, table, 10, bars=2, context_bars=3, seed=5)
    assert [(p.piece, p.cut_bar) for p in again] == [(p.piece, p.cut_bar) for p in pairs]
    other = select_pairs(shards, table, 10, bars=2, context_bars=3, seed=6)
    assert [(p.piece, p.cut_bar) for p in other] != [(p.piece, p.cut_bar) for p in pairs]
    for pair in pairs:
        tokens = shards.piece(pair.piece).astype(np.int64)
        starts = shards.bars_of_piece(pair.piece)
        cut = starts[pair.cut_bar]
        assert np.array_equal(pair.continuation, tokens[cut: cut + len(pair.continuation)])
        assert np.count_nonzero(pair.continuation == table.bar_id) == 2
        assert 1 <= pair.context_bars <= 3 and np.count_nonzero(pair.context == table.bar_id) == pair.context_bars
        assert np.array_equal(pair.last_bar, tokens[starts[pair.cut_bar - 1]: cut])
        # Apart from a re-stated tempo, the context is the piece right before the cut.
        plain = pair.context[table.tempo_rank[pair.context] < 0]
        before = tokens[starts[pair.cut_bar - pair.context_bars]: cut]
        assert np.array_equal(plain, before[table.tempo_rank[before] < 0])
        assert grammar.accepts([table.bos_id, *pair.context.tolist(), *pair.continuation.tolist()])
        assert bar_notes(grammar.layout, pair.continuation)


def test_restate_context_inserts_the_tempo_after_the_first_position(tokenizer, table):
    v = tokenizer.vocab
    bar, ts, p0, p8 = v["Bar_None"], v["TimeSig_4/4"], v["Position_0"], v["Position_8"]
    velocity = next(i for name, i in v.items() if name.startswith("Velocity_"))
    note = [v["Pitch_60"], velocity, v["Duration_1.0.8"]]
    tempo = int(table.tempo_ids[5])
    passage = np.array([bar, ts, p8, *note], np.int64)
    assert restate_context(passage, table, tempo, ts).tolist() == [bar, ts, p8, tempo, *note]
    assert restate_context(np.array([bar, p0, *note]), table, tempo, ts).tolist() == [bar, ts, p0, tempo, *note]
    stated = np.array([bar, ts, p0, int(table.tempo_ids[2]), *note])
    assert restate_context(stated, table, tempo, ts).tolist() == stated.tolist()  # already there
    assert restate_context(passage, table, -1, -1).tolist() == passage.tolist()


def test_repeat_last_bar_repeats_it(shards, table, grammar):
    pair = select_pairs(shards, table, 1, bars=3, context_bars=4, seed=0)[0]
    repeated = repeat_last_bar(pair, 3)
    assert np.count_nonzero(np.array(repeated) == table.bar_id) == 3
    one = bar_notes(grammar.layout, pair.last_bar)
    notes = bar_notes(grammar.layout, repeated)
    assert len(notes) == 3 * len(one)
    assert [(n.pitch, n.onset) for n in notes if n.bar == 2] == [(n.pitch, n.onset) for n in one]


def test_ngram_continuation_keeps_the_grammar_and_the_bar_count(prepared, shards, table, grammar):
    train = TokenShards(prepared, "train")
    ngram = NGramModel(4, len(grammar.layout.kinds)).fit(
        [[table.bos_id, *train.piece(i).tolist()] for i in range(len(train))])
    settings = SamplingSettings(1.0, 0, 0.95)
    for pair in select_pairs(shards, table, 3, bars=2, context_bars=4, seed=1):
        history = [table.bos_id, *pair.context.tolist()]
        out = ngram_continuation(ngram, grammar, history, 2, settings, torch.Generator().manual_seed(9))
        timesigs = [t for t in pair.context.tolist() if table.is_timesig[t]]
        assert out[:2] == [table.bar_id, timesigs[-1]]
        assert np.count_nonzero(np.array(out) == table.bar_id) == 2
        assert grammar.accepts(out)
        assert out == ngram_continuation(ngram, grammar, history, 2, settings, torch.Generator().manual_seed(9))


# --------------------------------------------------------------------------------- the command


def test_eval_json_reports_generation_for_the_model_and_both_baselines(checkpoint, prepared, shards, table,
                                                                      grammar, capsys):
    args = ["eval", str(checkpoint), str(prepared), "--max-tokens", "3000", "--ngram-order", "3",
            "--pairs", "3", "--bars", "2", "--context-bars", "4", "--seed", "2", "--json"]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["name"].split()[0] for r in report["results"]] == ["RWKV-7", "3-gram"]
    gen = report["generation"]
    assert (gen["pairs"], gen["bars"], gen["context_bars"]) == (3, 2, 4)
    assert gen["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 0.95}
    names = [s["name"] for s in gen["systems"]]
    assert names[0].startswith("RWKV-7") and names[1:] == ["repeat the last bar", "3-gram",
                                                           "real continuation (reference)"]
    for system in gen["systems"][:3]:
        figures = system["figures"]
        for key in ("pitch_class_overlap", "onset_overlap", "in_key_share"):
            assert 0.0 <= figures[key]["mean"] <= 1.0
        assert figures["pitch_class_overlap"]["n"] == 3 and figures["density_ratio"]["mean"] >= 0
    reference = gen["systems"][3]["figures"]
    assert reference["pitch_class_overlap"] == {"mean": None, "std": None, "ci95": None, "n": 0, "median": None}
    for key in ("chord_share", "polyphony", "pitch_range", "pc_entropy"):  # texture beside the real one's
        assert reference[key]["n"] == 3 and gen["systems"][0]["figures"][key]["n"] >= 1
    assert 0 < reference["in_key_share"]["mean"] <= 1

    # The repeat-the-last-bar row, recomputed here from the same pairs.
    pairs = select_pairs(shards, table, 3, bars=2, context_bars=4, seed=2)
    overlaps = [histogram_overlap(pitch_class_histogram(bar_notes(grammar.layout, repeat_last_bar(p, 2))),
                                  pitch_class_histogram(bar_notes(grammar.layout, p.continuation)))
                for p in pairs]
    assert gen["systems"][1]["figures"]["pitch_class_overlap"]["mean"] == pytest.approx(np.mean(overlaps))
    ratios = [2 * len(bar_notes(grammar.layout, p.last_bar)) / len(bar_notes(grammar.layout, p.continuation))
              for p in pairs]
    assert gen["systems"][1]["figures"]["density_ratio"]["mean"] == pytest.approx(np.mean(ratios))
    # The model's row, regenerated here with the seeds the command uses (seed + pair index).
    from daemon.engine import Engine
    from model import load

    engine = Engine(*load(checkpoint))
    settings = SamplingSettings(1.0, 0, 0.95)
    continuations = [model_continuation(engine, p, 2, settings, 2 + i) for i, p in enumerate(pairs)]
    for tokens in continuations:
        assert grammar.accepts(tokens) and tokens[0] == table.bar_id
        assert 1 <= np.count_nonzero(np.array(tokens) == table.bar_id) <= 2  # fewer if EOS came
    model_density = [len(bar_notes(grammar.layout, tokens)) / 2 for tokens in continuations]
    assert gen["systems"][0]["figures"]["notes_per_bar"]["mean"] == pytest.approx(np.mean(model_density))
    real_density = [len(bar_notes(grammar.layout, p.continuation)) / 2 for p in pairs]
    assert reference["notes_per_bar"]["mean"] == pytest.approx(np.mean(real_density))


def test_eval_table_lists_every_system_and_the_baseline_checkpoint(checkpoint, prepared, tmp_path, capsys):
    from model import load
    from model.checkpoint import save

    # A second checkpoint of the same tokenizer: the same weights, perturbed.
    model, meta = load(checkpoint)
    with torch.no_grad():
        model.head.weight.mul_(0.5)
    baseline = tmp_path / "baseline.safetensors"
    meta.model_id = ""
    save(model, baseline, meta)
    args = ["eval", str(checkpoint), str(prepared), "--max-tokens", "2000", "--ngram-order", "2",
            "--pairs", "2", "--bars", "1", "--top-p", "0.9", "--baseline", str(baseline)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "generation on 2 pairs of the test split" in out and "top-p 0.9" in out
    for heading in ("pitch-class overlap", "onset overlap", "density ratio", "in-key share", "notes/bar",
                    "chord share", "polyphony", "pitch range", "pc entropy"):
        assert heading in out
    nll_rows = out.split("NLL/note\n")[1].split("\n\n")[0].splitlines()
    assert [row.split()[0] for row in nll_rows] == ["RWKV-7", "baseline", "2-gram"]
    agreement, texture = out.split("agreement with the real continuation\n")[1].split("\ntexture\n")
    for block, cells in ((agreement, 4), (texture.strip(), 5)):
        rows = block.strip().splitlines()[1:]
        names = [row[:36].strip() for row in rows]
        assert names[0].startswith("RWKV-7") and names[1].startswith("baseline RWKV-7")
        assert names[2:] == ["repeat the last bar", "2-gram", "real continuation (reference)"]
        assert rows[2][36:].count("±") == cells
    reference = agreement.strip().splitlines()[-1][36:].split()
    assert reference[:3] == ["-", "-", "-"]
    assert texture.strip().splitlines()[-1][36:].count("±") == 5  # the real texture, to compare with

    other = tmp_path / "other.safetensors"
    meta.vocab_hash = "0" * 16
    save(model, other, meta)
    assert cli_main(["eval", str(checkpoint), str(prepared), "--baseline", str(other)]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_eval_without_pairs_skips_generation_and_bad_values_are_one_line_errors(checkpoint, prepared, capsys):
    assert cli_main(["eval", str(checkpoint), str(prepared), "--max-tokens", "1000", "--ngram-order", "2",
                     "--pairs", "0", "--json"]) == 0
    assert "generation" not in json.loads(capsys.readouterr().out)
    assert cli_main(["eval", str(checkpoint), str(prepared), "--bars", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkv-music: error:") and "--bars" in err and len(err.splitlines()) == 1
    assert cli_main(["eval", str(checkpoint), str(prepared), "--bars", "500", "--ngram-order", "2",
                     "--max-tokens", "500"]) == 2
    assert "lower --bars" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("cc") is None, reason="the CPU step needs a C compiler (cc)")
def test_bench_weights_reports_every_format_against_fp32(checkpoint, prepared, capsys):
    assert cli_main(["bench", "weights", str(checkpoint), str(prepared), "--max-tokens", "300", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    formats = {f["weights"]: f for f in report["formats"]}
    assert list(formats) == ["fp32", "bf16", "int8"] and report["tokens"] >= 300
    assert formats["fp32"]["nll_change"] == 0.0 and formats["fp32"]["logits_rel_err_max"] == 0.0
    assert formats["int8"]["bytes_per_token"] < formats["bf16"]["bytes_per_token"] < formats["fp32"]["bytes_per_token"]
    assert 0 < formats["bf16"]["logits_rel_err_median"] < 0.05
