"""`rwkv-music corpus`: real pieces from music21's corpus written as MIDI, with a manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import symusic

from tools.cli import main as cli_main
from train.corpus import (
    COLLECTIONS,
    CorpusManifest,
    build_corpus,
    music21_corpus_root,
    plan_corpus,
    split_abc_tunes,
)

pytest.importorskip("music21")

_GOOD_TUNE = """X:{x}
T:Tune {x}
M:3/4
L:1/8
K:G
GABc d2|e2 d2 B2|{notes}|G6|
"""


def _notes_in(path: Path) -> int:
    return sum(len(t.notes) for t in symusic.Score(str(path)).tracks)


def test_build_corpus_three_collections_end_to_end(tmp_path: Path) -> None:
    manifest = build_corpus(tmp_path, ["bach", "essen", "oneills"], limit=3, jobs=2, progress=False)

    assert [s.pieces for s in manifest.collections.values()] == [3, 3, 3]
    assert [s.failures for s in manifest.collections.values()] == [0, 0, 0]
    assert len(manifest.pieces) == 9 and not manifest.failures
    for piece in manifest.pieces:
        path = tmp_path / piece.path
        assert path.exists() and path.parent.name == piece.collection
        assert _notes_in(path) == piece.notes > 0
        assert piece.duration_s > 0
    # Folk tunes come one per tune of their ABC file, with the tune's position and X: label.
    folk = [p for p in manifest.pieces if p.collection == "essen"]
    assert all(p.tune_index is not None and p.tune_label for p in folk)
    # The limit spreads over the collection: three tunes from three different ABC files.
    assert len({p.source for p in folk}) == 3
    # Bach chorales are four voices: more than one note sounds at once.
    chorale = symusic.Score(str(tmp_path / manifest.pieces[0].path))
    onsets = [n.time for t in chorale.tracks for n in t.notes]
    assert len(onsets) > len(set(onsets))

    on_disk = CorpusManifest.read(tmp_path)
    assert on_disk == manifest
    summary = json.loads((tmp_path / "manifest.json").read_text())
    assert summary["collections"]["essen"]["licence"].count("non-commercial") >= 1
    assert summary["collections"]["bach"]["notes"] == sum(
        p.notes for p in manifest.pieces if p.collection == "bach"
    )


def _corpus_with_broken_files(root: Path) -> None:
    """A corpus folder with music21's layout: two real chorales and a broken one, an ABC file
    with two good tunes and one without notes."""
    real = music21_corpus_root()
    (root / "bach").mkdir(parents=True)
    for name in ("bwv1.6.mxl", "bwv10.7.mxl"):
        shutil.copyfile(real / "bach" / name, root / "bach" / name)
    # A MusicXML archive cut in half: a real transfer failure.
    data = (real / "bach" / "bwv101.7.mxl").read_bytes()
    (root / "bach" / "bwv101.7.mxl").write_bytes(data[: len(data) // 2])
    (root / "essenFolksong").mkdir()
    text = (
        _GOOD_TUNE.format(x=1, notes="c2 B2 A2")
        + "\nX:2\nT:Only a header\nK:C\n\n"
        + _GOOD_TUNE.format(x=3, notes="A2 B2 c2")
    )
    (root / "essenFolksong" / "mixed.abc").write_text(text)


def test_build_corpus_counts_failures_without_stopping(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _corpus_with_broken_files(root)
    out = tmp_path / "out"

    manifest = build_corpus(out, ["bach", "essen"], jobs=2, corpus_root=root, progress=False)

    bach, essen = manifest.collections["bach"], manifest.collections["essen"]
    assert (bach.pieces, bach.failures) == (2, 1)
    assert (essen.pieces, essen.failures) == (2, 1)
    failed = {(f.source, f.tune_index) for f in manifest.failures}
    assert failed == {("bach/bwv101.7.mxl", None), ("essenFolksong/mixed.abc", 2)}
    assert all(f.reason for f in manifest.failures)
    assert sorted(p.path for p in manifest.pieces) == sorted(
        ["bach/bwv1.6.mid", "bach/bwv10.7.mid", "essen/mixed-0001.mid", "essen/mixed-0003.mid"]
    )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.mid")) == sorted(
        p.path for p in manifest.pieces
    )


def test_corpus_cli_writes_manifest_and_rebuild_replaces_old_files(tmp_path: Path, capsys) -> None:
    root = tmp_path / "corpus"
    _corpus_with_broken_files(root)
    out = tmp_path / "out"
    args = ["corpus", str(out), "--corpus-root", str(root), "--jobs", "1", "--no-progress"]

    assert cli_main(args + ["--collections", "bach", "essen"]) == 0
    printed = capsys.readouterr().out
    assert "4 pieces" in printed and "2 failed" in printed
    assert (out / "essen" / "mixed-0001.mid").exists()

    # Rebuilding only the chorales with a limit drops the chorales the first build wrote, and
    # leaves the other collections alone.
    assert cli_main(args + ["--collections", "bach", "--limit", "1"]) == 0
    assert sorted(p.name for p in (out / "bach").glob("*.mid")) == ["bwv1.6.mid"]
    assert (out / "essen" / "mixed-0001.mid").exists()


def test_corpus_cli_unknown_collection_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert cli_main(["corpus", str(tmp_path), "--collections", "bach", "mozart_operas"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mozart_operas" in err[0] and "bach" in err[0]


def test_corpus_cli_without_music21_names_the_extra(tmp_path: Path) -> None:
    # A None entry in sys.modules makes `import music21` raise ImportError, as when the
    # optional extra is not installed.
    code = (
        "import sys; sys.modules['music21'] = None\n"
        "from tools.cli import main\n"
        f"sys.exit(main(['corpus', {str(tmp_path / 'out')!r}, '--no-progress']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "pip install 'rwkv-music[corpus]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_split_abc_tunes_repeats_file_header_fields() -> None:
    text = "% a comment\nL:1/16\n\nX:7\nT:First\nK:C\nCDEF|\n\nX:8\nT:Second\nT:alt\nK:G\nGABc|\n"
    tunes = split_abc_tunes(text)
    assert [(label, title) for label, _, title in tunes] == [("7", "First"), ("8", "Second")]
    first = tunes[0][1].splitlines()
    assert first[0] == "X:7" and first[1] == "L:1/16" and "% a comment" not in tunes[0][1]
    assert split_abc_tunes("no tunes here") == []


def test_plan_corpus_covers_every_collection_without_duplicates() -> None:
    jobs = plan_corpus(list(COLLECTIONS))
    outputs = [j.output for j in jobs]
    assert len(outputs) == len(set(outputs))
    assert {j.collection for j in jobs} == set(COLLECTIONS)
    per = {name: sum(j.collection == name for j in jobs) for name in COLLECTIONS}
    # music21 ships ~400 chorales and thousands of Essen tunes; a tiny count means lost files.
    assert per["bach"] > 350 and per["essen"] > 5000 and per["palestrina"] > 1000


def test_corpus_midi_files_fixture_gives_real_polyphonic_and_folk_midi(corpus_midi_files) -> None:
    assert len(corpus_midi_files) >= 120
    collections = {p.parent.name for p in corpus_midi_files}
    assert {"bach", "essen", "oneills", "airds"} <= collections
    for path in corpus_midi_files[::10]:
        assert _notes_in(path) > 0


def test_small_corpus_dir_fixture_has_twenty_pieces_in_subfolders(small_corpus_dir) -> None:
    files = sorted(small_corpus_dir.rglob("*.mid"))
    assert len(files) == 20
    assert len({p.parent for p in files}) >= 3
