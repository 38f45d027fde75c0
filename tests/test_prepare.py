"""`rwkv-music prepare` and the shard reader, on real corpus pieces and real broken files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import symusic

from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer
from tools.cli import main as cli_main
from train.errors import ShardError
from train.prepare import bar_index, merge_to_piano, split_of, token_id_sets
from train.shards import SPLITS, TokenShards

BAD_FILES = {
    "broken/truncated.mid": "unreadable MIDI",
    "broken/not_midi.mid": "unreadable MIDI",
    "broken/empty.mid": "empty file",
    "broken/silence.mid": "no notes",
    "broken/drums.midi": "only drum notes",
}
ABC_FILE = "folk/two_tunes.abc"
ABC_TEXT = """% two tunes in one file
L:1/8

X:1
T:First
M:2/4
K:D
DF AF|GB AF|EF GE|D4|

X:2
T:Second
M:6/8
K:G
GAB c2A|BAG A3|GAB cBA|G3 G3|
"""


def _write_bad_files(root: Path, good_midi: Path) -> None:
    (root / "broken").mkdir()
    data = good_midi.read_bytes()
    (root / "broken/truncated.mid").write_bytes(data[: len(data) // 3])
    (root / "broken/not_midi.mid").write_text("this is a text file with a .mid name\n")
    (root / "broken/empty.mid").write_bytes(b"")
    silence = symusic.Score(480)
    silence.tracks.append(symusic.Track("silent", 0, False))
    silence.dump_midi(str(root / "broken/silence.mid"))
    drums = symusic.Score(480)
    kit = symusic.Track("kit", 0, True)
    for beat in range(8):
        kit.notes.append(symusic.Note(beat * 480, 240, 36, 100))
    drums.tracks.append(kit)
    drums.dump_midi(str(root / "broken/drums.midi"))


@pytest.fixture(scope="module")
def midi_tree(small_corpus_dir: Path, tmp_path_factory) -> Path:
    """The small corpus, an ABC file with two tunes, and five files that cannot be pieces."""
    root = tmp_path_factory.mktemp("midi") / "in"
    shutil.copytree(small_corpus_dir, root)
    (root / "folk").mkdir()
    (root / ABC_FILE).write_text(ABC_TEXT)
    _write_bad_files(root, next(iter(sorted(root.rglob("*.mid")))))
    return root


def _prepare(src: Path, out: Path, *extra: str) -> int:
    args = ["prepare", str(src), str(out), "--no-progress", "--val-fraction", "0.2", "--test-fraction", "0.2"]
    return cli_main([*args, *extra])


@pytest.fixture(scope="module")
def prepared(midi_tree: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    assert _prepare(midi_tree, out, "--jobs", "2") == 0
    return out


def _good_pieces(root: Path) -> set[str]:
    names = {p.relative_to(root).as_posix() for p in root.rglob("*.mid") if not p.parts[-2] == "broken"}
    return names | {f"{ABC_FILE}#1", f"{ABC_FILE}#2"}


def _all_names(out: Path) -> dict[str, list[str]]:
    return {split: TokenShards(out, split).piece_names for split in SPLITS}


def test_prepare_keeps_every_good_piece_and_lists_the_bad_files(midi_tree: Path, prepared: Path) -> None:
    summary = json.loads((prepared / "prepare.json").read_text())
    good = _good_pieces(midi_tree)

    names = _all_names(prepared)
    assert sorted(n for split in names.values() for n in split) == sorted(good)
    assert summary["pieces"] == len(good) == 22
    assert summary["files_found"] == 20 + 1 + len(BAD_FILES)
    assert summary["files_tokenized"] == summary["files_found"] and summary["files_reused"] == 0
    skipped = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert set(skipped) == set(BAD_FILES)
    for path, reason in BAD_FILES.items():
        assert skipped[path].startswith(reason), (path, skipped[path])
    for split in SPLITS:
        shards = TokenShards(prepared, split)
        assert summary["splits"][split] == {
            "pieces": len(shards),
            "tokens": shards.n_tokens,
            "bars": len(shards.bars),
        }
    assert summary["tokens"] == sum(TokenShards(prepared, s).n_tokens for s in SPLITS)
    record = json.loads((prepared / "tokenizer.json").read_text())
    assert record["params"] == DEFAULT_TOKENIZER_PARAMS and record["vocab_size"] == summary["vocab_size"]


def _notes_in_beats(score: symusic.Score) -> list[tuple[float, int, float, int]]:
    tpq = score.ticks_per_quarter
    return sorted(
        (n.time / tpq, n.pitch, n.duration / tpq, n.velocity) for t in score.tracks for n in t.notes
    )


def test_prepare_shards_decode_back_to_the_same_notes(midi_tree: Path, prepared: Path) -> None:
    tokenizer = build_tokenizer(DEFAULT_TOKENIZER_PARAMS)
    checked = 0
    for split in SPLITS:
        shards = TokenShards(prepared, split)
        for i, name in enumerate(shards.piece_names):
            if "#" in name or not (name.startswith("bach/") or name.startswith("essen/")):
                continue
            original = merge_to_piano(symusic.Score(str(midi_tree / name)))
            expected = _notes_in_beats(tokenizer.preprocess_score(original))
            decoded = _notes_in_beats(tokenizer.decode([shards.piece(i).astype(np.int64).tolist()]))
            assert decoded == expected, name
            checked += 1
    assert checked >= 10


def test_prepare_rerun_reuses_everything_and_writes_the_same_shards(
    midi_tree: Path, prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "prepared"
    shutil.copytree(prepared, out)
    before = {f.name: f.read_bytes() for f in out.glob("*.npy")}

    assert _prepare(midi_tree, out, "--jobs", "1") == 0

    summary = json.loads((out / "prepare.json").read_text())
    assert summary["files_reused"] == summary["files_found"] and summary["files_tokenized"] == 0
    assert {item["path"] for item in summary["skipped"]} == set(BAD_FILES)
    assert {f.name: f.read_bytes() for f in out.glob("*.npy")} == before


def test_prepare_retokenizes_only_changed_files_and_forgets_removed_ones(
    midi_tree: Path, prepared: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    shutil.copytree(midi_tree, src)
    out = tmp_path / "prepared"
    shutil.copytree(prepared, out)
    # copytree keeps mtimes, so the cache still matches; now change one file, delete another.
    chorales = sorted((src / "bach").glob("*.mid"))
    changed, removed = chorales[0], chorales[1]
    shutil.copyfile(chorales[2], changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    removed.unlink()
    cache_entries = len(list((out / "cache").glob("*.npz")))

    assert _prepare(src, out) == 0

    summary = json.loads((out / "prepare.json").read_text())
    assert summary["files_tokenized"] == 1
    assert summary["files_reused"] == summary["files_found"] - 1
    assert len(list((out / "cache").glob("*.npz"))) == cache_entries - 1
    names = {n for split in _all_names(out).values() for n in split}
    assert removed.relative_to(src).as_posix() not in names
    assert changed.relative_to(src).as_posix() in names


def test_prepare_split_is_deterministic_and_follows_the_fractions(prepared: Path, tmp_path: Path) -> None:
    # A second run from scratch (other worker count, other output folder) splits the same way.
    src_names = _all_names(prepared)
    rel_paths = [n.split("#")[0] for split in src_names.values() for n in split]
    for split, names in src_names.items():
        assert all(split_of(n.split("#")[0], 0.2, 0.2) == split for n in names)
    # Over many paths the fractions hold, and tunes of one ABC file stay in one split.
    paths = [f"collection/{i:05d}.mid" for i in range(20000)] + rel_paths
    counts = {s: 0 for s in SPLITS}
    for path in paths:
        counts[split_of(path, 0.05, 0.05)] += 1
    assert abs(counts["val"] / len(paths) - 0.05) < 0.01
    assert abs(counts["test"] / len(paths) - 0.05) < 0.01
    abc_splits = {split for split, names in src_names.items() for n in names if n.startswith(ABC_FILE)}
    assert len(abc_splits) == 1


def test_prepare_same_input_gives_same_shards_from_scratch(
    midi_tree: Path, prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "again"
    assert _prepare(midi_tree, out, "--jobs", "1") == 0
    for split in SPLITS:
        a, b = TokenShards(prepared, split), TokenShards(out, split)
        assert a.piece_names == b.piece_names
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.bar_context, b.bar_context)


def test_token_shards_bars_and_context_point_at_the_right_tokens(prepared: Path) -> None:
    shards = TokenShards(prepared, "train")
    tokenizer = shards.tokenizer()
    bar_id, tempo_ids, timesig_ids = token_id_sets(tokenizer)
    assert len(shards) > 0 and shards.vocab_size == len(tokenizer)
    assert np.all(shards.tokens[shards.bars] == bar_id)
    assert np.count_nonzero(shards.tokens == bar_id) == len(shards.bars)
    tempo_col, meter_col = shards.bar_context[:, 0], shards.bar_context[:, 1]
    assert np.all(np.isin(tempo_col[tempo_col >= 0], tempo_ids))
    assert np.all(np.isin(meter_col[meter_col >= 0], timesig_ids))
    for i in range(len(shards)):
        piece = shards.piece(i)
        rel = shards.bars_of_piece(i)
        assert np.all(piece[rel] == bar_id)
        context = shards.bar_context[shards.bar_slice(i)]
        # Nothing is in force before a piece's first bar; every later bar has a meter.
        assert tuple(context[0]) == (-1, -1)
        assert np.all(context[1:, 1] >= 0)
        vocab = {v: k for k, v in tokenizer.vocab.items()}
        for k in range(1, len(rel)):
            before = [vocab[int(t)] for t in piece[: rel[k]]]
            last_tempo = [t for t in before if t.startswith("Tempo_")][-1]
            assert vocab[int(context[k, 0])] == last_tempo


def test_bar_index_resets_context_at_piece_boundaries() -> None:
    bar, tempo_a, tempo_b, sig = 1, 10, 11, 20
    tokens = np.array([bar, sig, tempo_a, 5, bar, sig, 5, bar, 5, tempo_b, bar, sig], dtype=np.uint16)
    offsets = np.array([0, 7, 12], dtype=np.int64)  # piece 0: tokens 0..6, piece 1: 7..11
    bars, context = bar_index(tokens, offsets, bar, np.array([tempo_a, tempo_b]), np.array([sig]))
    assert bars.tolist() == [0, 4, 7, 10]
    assert context.tolist() == [[-1, -1], [tempo_a, sig], [-1, -1], [tempo_b, -1]]


def test_token_shards_refuses_inconsistent_directories(prepared: Path, tmp_path: Path) -> None:
    def broken_copy(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(prepared, out, ignore=shutil.ignore_patterns("cache"))
        return out

    missing = broken_copy("missing")
    (missing / "train.bars.npy").unlink()
    with pytest.raises(ShardError, match="train.bars.npy"):
        TokenShards(missing, "train")

    short = broken_copy("short")
    offsets = np.load(short / "train.pieces.npy")
    np.save(short / "train.pieces.npy", offsets[:-1])
    with pytest.raises(ShardError, match="offsets"):
        TokenShards(short, "train")

    other_vocab = broken_copy("vocab")
    record = json.loads((other_vocab / "tokenizer.json").read_text())
    record["vocab_hash"] = "0" * 16
    (other_vocab / "tokenizer.json").write_text(json.dumps(record))
    with pytest.raises(ShardError, match="vocabulary hash"):
        TokenShards(other_vocab, "train")

    with pytest.raises(ShardError, match="differs from the expected"):
        TokenShards(prepared, "train", expected_vocab_hash="f" * 16)
    with pytest.raises(ShardError, match="unknown split"):
        TokenShards(prepared, "training")


def test_prepare_other_tokenizer_config_retokenizes(midi_tree: Path, prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    shutil.copytree(prepared, out)
    assert _prepare(midi_tree, out, "--tokenizer-config", '{"num_velocities": 8}') == 0
    summary = json.loads((out / "prepare.json").read_text())
    assert summary["files_reused"] == 0
    shards = TokenShards(out, "train")
    assert shards.tokenizer_params["num_velocities"] == 8
    assert shards.vocab_hash != TokenShards(prepared, "train").vocab_hash


def test_prepare_user_mistakes_are_one_line_errors(midi_tree: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (["prepare", str(tmp_path / "nowhere"), str(tmp_path / "o1")], "is not a folder"),
        (["prepare", str(midi_tree), str(tmp_path / "o2"), "--tokenizer-config", '{"colour": 1}'], "colour"),
        (["prepare", str(midi_tree), str(tmp_path / "o3"), "--val-fraction", "0.6", "--test-fraction", "0.5"],
         "fraction"),
    ]
    for argv, needle in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_prepare_exclude_leaves_folders_and_globs_out_and_keeps_the_other_splits(
    midi_tree: Path, prepared: Path, tmp_path: Path
) -> None:
    everything = _all_names(prepared)
    folders = sorted({name.split("/")[0] for names in everything.values() for name in names if "/" in name})
    assert len(folders) >= 2
    left_out = folders[0]
    out = tmp_path / "excluded"
    assert _prepare(midi_tree, out, "--exclude", left_out, "--exclude", "*.abc") == 0
    kept = _all_names(out)
    for split, names in everything.items():
        expected = [n for n in names if not n.startswith(left_out + "/") and ".abc#" not in n]
        assert kept[split] == expected  # nothing else moved to another split
    summary = json.loads((out / "prepare.json").read_text())
    assert left_out not in summary["folders"]
    assert _prepare(midi_tree, tmp_path / "nothing", "--exclude", "*") == 2
