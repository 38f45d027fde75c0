"""Hot reload in a running daemon (real JACK ports, real UDP, a real trainer, a real broker):
new checkpoints are swapped in, bad ones refused while the old model keeps playing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.reload import ReloadError, resolve_reload_path
from model.checkpoint import read_meta
from model.vocab import DEFAULT_TOKENIZER_PARAMS
from tests.test_daemon_jack import DaemonSession, daemon_settings, note_pairs, save_random_checkpoint

# Four beats a second: bar lines (where swaps happen) come every second.
FAST = ["clock.tempo=240.0", "daemon.mode=manual", "daemon.length_bars=1"]
WATCH = ["daemon.watch=true", "daemon.watch_interval_s=0.1"]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder whose latest.safetensors the daemon plays (a random model, seed 1)."""
    folder = tmp_path / "run"
    save_random_checkpoint(folder / "latest.safetensors", seed=1)
    return folder


@pytest.fixture
def session(jack_server, run_dir):
    s = DaemonSession(jack_server, daemon_settings(run_dir / "latest.safetensors", *FAST, *WATCH))
    yield s
    s.close()


def test_resolve_reload_path_stays_inside_the_allowed_folders(tmp_path):
    checkpoint = tmp_path / "run" / "latest.safetensors"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "step-1.safetensors").touch()
    assert resolve_reload_path("step-1.safetensors", checkpoint) == (tmp_path / "run" / "step-1.safetensors").resolve()
    assert resolve_reload_path(tmp_path / "run" / "x.safetensors", checkpoint).parent == (tmp_path / "run").resolve()
    for outside in ["../secret.safetensors", str(tmp_path / "other" / "a.safetensors"), "/etc/passwd"]:
        with pytest.raises(ReloadError, match="outside"):
            resolve_reload_path(outside, checkpoint)
    (tmp_path / "extra").mkdir()
    extra = resolve_reload_path(tmp_path / "extra" / "a.safetensors", checkpoint, [tmp_path / "extra"])
    assert extra.parent == (tmp_path / "extra").resolve()


def test_new_checkpoints_are_swapped_in_and_bad_ones_refused(session, run_dir, tmp_path):
    first = session.status()
    assert first["model_step"] == 1 and first["reloads"] == 0

    # The trainer's way: written to a temporary file and renamed onto the watched path.
    second = save_random_checkpoint(run_dir / "latest.safetensors", seed=2)
    status = session.wait_status(lambda s: s["model_id"] == second, 10.0, "the new model")
    assert status["reloads"] == 1 and status["model_step"] == 2 and status["last_reload_error"] is None
    # Swapped at a bar line: the first tick after it (4/4), give or take a loaded machine.
    assert status["last_swap_beat"] % 4.0 < 0.25, status["last_swap_beat"]

    # A truncated file (a copy cut short, not renamed into place) is refused; the model stays.
    good = tmp_path / "whole.safetensors"
    save_random_checkpoint(good, seed=3)
    data = good.read_bytes()
    (run_dir / "latest.safetensors").write_bytes(data[: len(data) // 2])
    status = session.wait_status(lambda s: s["reload_errors"] == 1, 10.0, "the refusal")
    assert status["model_id"] == second and "latest.safetensors" in status["last_reload_error"]

    # The old model keeps answering.
    assert session.osc("trigger") == ("/rwkv/ack", ("/rwkv/trigger",))
    status = session.wait_status(lambda s: s["answers"] == 1 and s["answers_active"] == 0, 10.0, "the answer")
    ons, problems = note_pairs(session.recorder.timed_messages)
    assert status["failed"] == 0 and problems == []
    assert len(ons) == status["notes_played"] >= 1

    # Another vocabulary: refused with the reason in the OSC reply.
    other_vocab = {**DEFAULT_TOKENIZER_PARAMS, "num_velocities": 8}
    save_random_checkpoint(run_dir / "other-vocab.safetensors", seed=4, tokenizer_params=other_vocab)
    reply, args = session.osc("reload", "other-vocab.safetensors")
    assert reply == "/rwkv/error" and "tokenizer differs" in args[1]
    # Outside the checkpoint's folder: refused without being opened.
    reply, args = session.osc("reload", str(good))
    assert reply == "/rwkv/error" and "outside" in args[1]
    assert session.status()["model_id"] == second

    # By name, beside the checkpoint: accepted, swapped at the next bar line.
    fifth = save_random_checkpoint(run_dir / "step-5.safetensors", seed=5)
    assert session.osc("reload", "step-5.safetensors") == ("/rwkv/ack", ("/rwkv/reload",))
    status = session.wait_status(lambda s: s["model_id"] == fifth, 10.0, "the requested model")
    assert status["checkpoint"].endswith("step-5.safetensors") and status["reload_errors"] == 3


def test_a_training_run_into_the_watched_folder_is_picked_up(session, run_dir, small_corpus_dir, tmp_path):
    from tools.cli import main as cli_main

    prepared = tmp_path / "prepared"
    assert cli_main(["prepare", str(small_corpus_dir), str(prepared), "--no-progress"]) == 0
    command = [
        sys.executable, "-m", "tools", "train", "--data", str(prepared), "--out", str(run_dir),
        "--max-steps", "3", "--no-progress",
        "--set", "model.n_layer=1", "--set", "model.n_embd=64", "--set", "train.batch_size=2",
        "--set", "train.ctx_len=32", "--set", "train.eval_every=3", "--set", "train.save_every=3",
        "--set", "train.eval_windows=2", "--set", "train.warmup_steps=1", "--set", "train.num_threads=1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    trained = read_meta(run_dir / "latest.safetensors")
    assert trained.step == 3
    status = session.wait_status(lambda s: s["model_id"] == trained.model_id, 15.0, "the trained model")
    assert status["model_step"] == 3 and status["reload_errors"] == 0


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients is not installed")
def test_a_checkpoint_announced_over_mqtt_is_loaded(jack_server, run_dir, mosquitto):
    settings = daemon_settings(
        run_dir / "latest.safetensors", *FAST, "daemon.watch=false", "mqtt.enabled=true",
        f'mqtt.host="{mosquitto.host}"', f"mqtt.port={mosquitto.port}",
    )
    s = DaemonSession(jack_server, settings)
    try:
        assert s.daemon.mqtt is not None
        deadline = time.monotonic() + 10
        while not s.daemon.mqtt.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.daemon.mqtt.connected
        announced = save_random_checkpoint(run_dir / "step-9.safetensors", seed=9)
        payload = json.dumps({"path": str(run_dir / "step-9.safetensors"), "model_id": announced})
        subprocess.run(
            ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-t", "rwkv-music/checkpoints",
             "-m", payload, "-q", "1"],
            check=True, timeout=10, env={**os.environ},
        )
        status = s.wait_status(lambda st: st["model_id"] == announced, 10.0, "the announced model")
        assert status["model_step"] == 9
    finally:
        s.close()
