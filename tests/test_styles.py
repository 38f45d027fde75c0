"""Styles: `rwkv-music tune` on real MIDI files, and a running daemon (real JACK ports, real UDP)
switching between tuned checkpoints by name with /rwkv/style."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import load, read_meta
from tests.test_daemon_jack import DaemonSession, daemon_settings, note_pairs, save_random_checkpoint
from train.errors import TrainError
from train.tune import TuneConfig, choose_val_pieces, tune

# Four beats a second: bar lines (where swaps happen) come every second; autopilot answers each bar.
FAST = ["clock.tempo=240.0", "daemon.mode=autopilot", "daemon.length_bars=1"]


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (to prove nothing was written there)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def style_folder(small_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten real MIDI files and one corrupt file: the player's folder."""
    folder = tmp_path_factory.mktemp("mine")
    for path in sorted(small_corpus_dir.rglob("*.mid"))[:10]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")  # a header cut short
    return folder


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_random_checkpoint(path, seed=5)
    return path


@pytest.fixture(scope="module")
def state_style(style_folder: Path, base_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("styles") / "mine.safetensors"
    before = folder_digest(style_folder), base_checkpoint.read_bytes()
    report = tune(style_folder, out, base_checkpoint, TuneConfig(method="state", steps=6, ctx_len=64, eval_every=2),
                  progress=False)
    assert (folder_digest(style_folder), base_checkpoint.read_bytes()) == before  # nothing written there
    return out, report


def test_choose_val_pieces_holds_out_one_in_five_by_name():
    names = [f"piece-{i}.mid" for i in range(10)]
    held = choose_val_pieces(names, -1)
    assert len(held) == 2 and held == choose_val_pieces(list(reversed(names)), -1)
    assert choose_val_pieces(names[:4], -1) == set()
    assert len(choose_val_pieces(names, 3)) == 3 and len(choose_val_pieces(names[:2], 5)) == 1


def test_replay_is_the_base_models_own_music_and_costs_nothing_before_tuning(base_checkpoint):
    from train.tune import generate_replay, replay_kl, tunable_model

    base, meta = load(base_checkpoint)
    bos = meta.tokenizer().vocab["BOS_None"]
    ids, teacher = generate_replay(base, bos, windows=3, length=20, seed=1)
    assert ids.shape == (3, 21) and bool((ids[:, 0] == bos).all()) and teacher.shape == (3, 20, base.cfg.vocab_size)
    assert torch.equal(ids, generate_replay(base, bos, windows=3, length=20, seed=1)[0])  # seeded
    for method in ("lora", "state"):
        model, _ = tunable_model(base, method, lora_rank=4, seed=0)
        assert float(replay_kl(model, ids, teacher).detach()) < 1e-5  # the tuned model starts as the base


def test_tune_state_writes_one_checkpoint_whose_init_state_is_learned(state_style, base_checkpoint):
    out, report = state_style
    model, meta = load(out)
    base, base_meta = load(base_checkpoint)
    assert model.cfg.learned_state and not base.cfg.learned_state
    # The network is the base's; only the initial State is new, and init_state() returns it.
    for name, tensor in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    state = model.init_state(2)
    assert torch.equal(state.wkv[:, 0], model.state0.wkv.detach()) and torch.equal(state.wkv[:, 1], state.wkv[:, 0])
    assert float(state.wkv.abs().max()) > 0 and meta.model_id != base_meta.model_id
    tuned = meta.extra["tune"]
    assert tuned["method"] == "state" and tuned["base_model_id"] == base_meta.model_id
    assert len(tuned["pieces"]) == 8 and len(tuned["val_pieces"]) == 2  # 10 readable files, one in five held out
    assert [s["path"] for s in tuned["skipped"]] == ["broken.mid"]
    assert report.steps == 6 and tuned["val_nll_per_note_after"] <= tuned["val_nll_per_note_before"]


def test_tune_lora_merges_into_plain_weights(style_folder, base_checkpoint, tmp_path):
    out = tmp_path / "lora.safetensors"
    tune(style_folder, out, base_checkpoint, TuneConfig(method="lora", steps=2, ctx_len=64, lr=0.05), progress=False)
    model, meta = load(out)
    base, _ = load(base_checkpoint)
    assert not model.cfg.learned_state and set(model.state_dict()) == set(base.state_dict())
    changed = [n for n, t in base.state_dict().items() if not torch.equal(model.state_dict()[n], t)]
    assert changed and all(n.endswith(("receptance.weight", "key.weight", "value.weight", "output.weight"))
                           for n in changed), changed
    assert meta.extra["tune"]["method"] == "lora"


def test_tune_refuses_to_write_into_the_folder_or_over_the_base(style_folder, base_checkpoint):
    with pytest.raises(TrainError, match="never writes into the MIDI folder"):
        tune(style_folder, style_folder / "x.safetensors", base_checkpoint, TuneConfig(), progress=False)
    with pytest.raises(TrainError, match="never overwritten"):
        tune(style_folder, base_checkpoint, base_checkpoint, TuneConfig(), progress=False)
    with pytest.raises(TrainError, match="--method"):
        TuneConfig(method="magic")


def test_tune_interrupted_writes_nothing(style_folder, base_checkpoint, tmp_path):
    out = tmp_path / "out" / "mine.safetensors"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "tune", str(style_folder), str(out), "--base", str(base_checkpoint),
         "--steps", "0", "--minutes", "5", "--ctx-len", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "tuning on" not in line:  # training has started
            line = proc.stderr.readline()
            assert line or proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never started"
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout
    assert "was not written" in stdout and os.listdir(out.parent) == []


def test_daemon_switches_style_at_a_bar_line_and_refuses_a_corrupt_one(jack_server, state_style, base_checkpoint,
                                                                     tmp_path):
    styles = tmp_path / "styles"
    styles.mkdir()
    shutil.copy(state_style[0], styles / "mine.safetensors")
    data = (styles / "mine.safetensors").read_bytes()
    (styles / "broken.safetensors").write_bytes(data[: len(data) // 3])
    mine_id = read_meta(styles / "mine.safetensors").model_id
    session = DaemonSession(jack_server, daemon_settings(base_checkpoint, *FAST, f'daemon.styles_dir="{styles}"'))
    try:
        first = session.status()
        assert first["style"] == "default"
        assert session.osc("style") == ("/rwkv/styles", ("default", "broken", "mine"))
        session.wait_status(lambda s: s["answers"] >= 2, 15.0, "answers before the swap")

        assert session.osc("style", "mine") == ("/rwkv/ack", ("/rwkv/style",))
        status = session.wait_status(lambda s: s["model_id"] == mine_id, 15.0, "the style's model")
        assert status["style"] == "mine" and status["reloads"] == 1
        assert status["last_swap_beat"] % 4.0 < 0.25, status["last_swap_beat"]  # at a bar line
        answers = status["answers"]
        session.wait_status(lambda s: s["answers"] >= answers + 2, 15.0, "answers after the swap")

        reply, args = session.osc("style", "broken")
        assert reply == "/rwkv/error" and "broken.safetensors" in args[1], (reply, args)
        reply, args = session.osc("style", "nosuch")
        assert reply == "/rwkv/error" and "styles: default, broken, mine" in args[1], (reply, args)
        status = session.status()
        assert status["model_id"] == mine_id and status["reload_errors"] == 1 and status["style"] == "mine"
        answers = status["answers"]
        session.wait_status(lambda s: s["answers"] >= answers + 2, 15.0, "answers after the refusal")

        assert session.osc("style", "default") == ("/rwkv/ack", ("/rwkv/style",))
        session.wait_status(lambda s: s["style"] == "default" and s["model_id"] == first["model_id"], 15.0,
                            "the way back")
        session.osc("mode", "off")
        status = session.wait_status(lambda s: s["answers_active"] == 0, 15.0, "the answers to end")
    finally:
        session.close()
    ons, problems = note_pairs(session.recorder.timed_messages)
    assert problems == [] and status["failed"] == 0  # no stuck note, nothing failed
    assert len(ons) >= 6


def test_score_compares_checkpoints_on_a_midi_folder_by_position(state_style, base_checkpoint, style_folder,
                                                                 capsys):
    import json

    from tools.cli import main

    out, report = state_style
    assert main(["score", str(style_folder), str(base_checkpoint), str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pieces"] == 10 and result["skipped"] == 1  # broken.mid is counted, not fatal
    base, tuned = result["scores"]
    assert base["model_id"] == report.base_model_id and tuned["model_id"] != base["model_id"]
    assert set(base["bands"]) == {"0-512", "512-2048", "2048+"}
    assert base["bands"]["0-512"] > 0 and tuned["nll_per_note"] > 0
    assert main(["score", str(style_folder), str(base_checkpoint), "--pieces", "2"]) == 0
    assert "2 pieces" in capsys.readouterr().out
