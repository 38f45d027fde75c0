"""Reliability of checkpoints: bad files offered to a playing daemon, a file rewritten in place
while the daemon reads it, and a trainer killed (SIGKILL) while it writes its checkpoints.

The daemon is a real `rwkv-music daemon` process (a crash is an exit status, not a lost test
session) on the test JACK server, watched by a real broker's subscriber; the trainer is a real
`rwkv-music train` process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from daemon.errors import DaemonError
from model.checkpoint import CheckpointMeta, load, read_meta, save
from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
from tests.model_factory import random_model
from tests.test_daemon_jack import save_random_checkpoint
from tests.test_reliability_midi import DaemonProcess
from train.resume import load_resume

# Autopilot at 240 BPM: answers bar after bar, so "still playing" is a counter that grows.
PLAYING = ["clock.tempo=240.0", "daemon.mode=autopilot", "daemon.length_bars=1"]


def write_renamed(path: Path, data: bytes) -> None:
    """Put `data` at `path` the way a trainer does: a temporary file renamed onto it."""
    tmp = path.with_name(f".{path.name}.incoming")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def nan_checkpoint_bytes(tmp: Path) -> bytes:
    """A complete, well-formed checkpoint whose weights hold NaN (the hash matches them)."""
    tokenizer = build_tokenizer(DEFAULT_TOKENIZER_PARAMS)
    model = random_model(n_layer=1, n_embd=64, vocab_size=len(tokenizer), seed=11)
    with torch.no_grad():
        model.head.weight[0, :5] = float("nan")
    path = tmp / "nan.safetensors"
    save(model, path, CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(tokenizer), step=11))
    return path.read_bytes()


class EventLog:
    """mosquitto_sub on the daemon's events topic, one JSON event per line in a file."""

    def __init__(self, broker, path: Path):
        self.path = path
        with open(path, "w") as out:
            self.process = subprocess.Popen(
                ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", "rwkv-music/+/events"],
                stdout=out, stderr=subprocess.STDOUT,
            )

    def errors(self) -> list[dict]:
        events = []
        for line in self.path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "error":
                events.append(event)
        return events

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients is not installed")
def test_bad_checkpoints_are_refused_with_an_event_while_the_old_model_plays_on(jack_server, mosquitto, tmp_path):
    run = tmp_path / "run"
    watched = run / "latest.safetensors"
    playing = save_random_checkpoint(watched, seed=1)
    good = tmp_path / "good.safetensors"
    save_random_checkpoint(good, seed=2)
    whole = good.read_bytes()
    other_vocab = tmp_path / "other-vocab.safetensors"
    save_random_checkpoint(other_vocab, seed=3, tokenizer_params={**DEFAULT_TOKENIZER_PARAMS, "num_velocities": 8})
    bad = [
        ("truncated", whole[: len(whole) // 2], "not a readable safetensors file"),
        ("random bytes", random.Random(4).randbytes(len(whole)), "not a readable safetensors file"),
        ("wrong vocabulary", other_vocab.read_bytes(), "its tokenizer differs"),
        ("NaN weights", nan_checkpoint_bytes(tmp_path), "non-finite values"),
    ]
    daemon = DaemonProcess(
        watched, tmp_path, *PLAYING, "daemon.watch=true", "daemon.watch_interval_s=0.1",
        "mqtt.enabled=true", f'mqtt.host="{mosquitto.host}"', f"mqtt.port={mosquitto.port}",
    )
    events = EventLog(mosquitto, tmp_path / "events.jsonl")
    try:
        daemon.wait_status(lambda s: s["mqtt_connected"] and s["notes_played"] > 0, 20.0, "music and the broker")
        time.sleep(0.5)  # mosquitto_sub has subscribed by now
        for count, (kind, data, reason) in enumerate(bad, start=1):
            before = daemon.status()
            write_renamed(watched, data)
            status = daemon.wait_status(lambda s, n=count: s["reload_errors"] == n, 15.0, f"the refusal of {kind}")
            assert reason in (status["last_reload_error"] or ""), (kind, status["last_reload_error"])
            assert status["model_id"] == playing, kind
            # Refused with an event that says why, on the broker.
            deadline = time.monotonic() + 10.0
            while len(events.errors()) < count and time.monotonic() < deadline:
                time.sleep(0.05)
            event = events.errors()[count - 1]
            assert reason in event["reason"] and event["path"] == str(watched), (kind, event)
            # The old model goes on answering.
            daemon.wait_status(lambda s, b=before: s["notes_played"] > b["notes_played"] + 3, 15.0,
                               f"notes after the {kind} checkpoint")
        # A good file in the same place is taken at the next bar line.
        write_renamed(watched, whole)
        status = daemon.wait_status(lambda s: s["reloads"] == 1, 15.0, "the good checkpoint")
        assert status["model_id"] == read_meta(good).model_id and status["last_reload_error"] is None
        assert status["failed"] == 0
        assert daemon.stop() == 0
    finally:
        events.close()
        daemon.kill()
    assert "Traceback" not in daemon.log_text()


def rewrite_in_place(path: Path, versions: list[bytes], stop: threading.Event, chunk: int = 1 << 18) -> int:
    """Overwrite `path` in place (same inode: truncate, then write in chunks), alternating the
    versions, until `stop`; then once more with versions[-1], which the file holds at the end.
    Returns the rewrites done."""

    def write(data: bytes) -> None:
        with open(path, "r+b") as f:
            f.truncate(0)
            for offset in range(0, len(data), chunk):
                f.write(data[offset : offset + chunk])
                f.flush()
                time.sleep(0.001)

    rewrites = 0
    while not stop.is_set():
        write(versions[rewrites % len(versions)])
        rewrites += 1
        time.sleep(random.random() * 0.02)
    write(versions[-1])
    return rewrites + 1


def test_a_checkpoint_rewritten_in_place_while_it_is_read_never_kills_the_daemon(jack_server, tmp_path):
    """`cp other.safetensors latest.safetensors` onto the file the daemon plays, again and again,
    while it reloads: a mapped file truncated under the reader is a SIGBUS; the daemon reads a
    private copy instead, refuses the torn ones, and keeps playing."""
    tokenizer = build_tokenizer(DEFAULT_TOKENIZER_PARAMS)
    versions = []
    for seed in (21, 22):  # big enough that reading one takes a while
        model = random_model(n_layer=2, n_embd=256, vocab_size=len(tokenizer), seed=seed)
        path = tmp_path / f"v{seed}.safetensors"
        save(model, path, CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(tokenizer), step=seed))
        versions.append(path.read_bytes())
    watched = tmp_path / "run" / "latest.safetensors"
    watched.parent.mkdir()
    watched.write_bytes(versions[0])
    daemon = DaemonProcess(watched, tmp_path, *PLAYING, "daemon.watch=true", "daemon.watch_interval_s=0.05")
    stop = threading.Event()
    try:
        daemon.wait_status(lambda s: s["notes_played"] > 0, 20.0, "music")
        rewrites = [0]
        writer = threading.Thread(
            target=lambda: rewrites.__setitem__(0, rewrite_in_place(watched, versions, stop)), daemon=True
        )
        writer.start()
        deadline = time.monotonic() + 4.0
        replies = []
        while time.monotonic() < deadline and daemon.alive:
            try:
                replies.append(daemon.osc("reload", timeout=10.0)[0])  # the watched file, as it is now
            except DaemonError:  # no reply: dead (checked below)
                break
            time.sleep(0.1)
        stop.set()
        writer.join(timeout=30)
        assert daemon.alive, f"the daemon died (exit status {daemon.process.returncode}):\n{daemon.log_text()[-3000:]}"
        assert len(replies) >= 12 and set(replies) <= {"/rwkv/ack", "/rwkv/error"}, replies
        final = read_meta(tmp_path / "v22.safetensors").model_id
        status = daemon.wait_status(lambda s: s["model_id"] == final, 20.0, "the last version, once it held still")
        print(f"\nin-place rewrites: {rewrites[0]}, reload requests {len(replies)} "
              f"({replies.count('/rwkv/error')} refused), swaps {status['reloads']}, "
              f"refusals {status['reload_errors']}, generations failed {status['failed']}")
        before = status["notes_played"]
        daemon.wait_status(lambda s: s["notes_played"] > before + 3, 15.0, "music after the rewrites")
        assert daemon.stop() == 0
    finally:
        stop.set()
        daemon.kill()


# A small model whose checkpoint writes take most of each step's time, so a kill at a random
# moment lands inside a write more often than not.
TRAIN_SETTINGS = [
    "--set", "model.n_layer=2", "--set", "model.n_embd=256", "--set", "train.batch_size=1",
    "--set", "train.ctx_len=16", "--set", "train.eval_every=100000", "--set", "train.save_every=1",
    "--set", "train.keep_last=2", "--set", "train.warmup_steps=1", "--set", "train.num_threads=1",
    "--set", "train.log_every=1", "--no-progress",
]


def train_command(prepared: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tools", "train", "--data", str(prepared), "--out", str(run),
            "--max-steps", str(steps), *TRAIN_SETTINGS, *extra]


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_latest_and_resume_works(small_corpus_dir, tmp_path):
    from tools.cli import main as cli_main

    prepared = tmp_path / "prepared"
    assert cli_main(["prepare", str(small_corpus_dir), str(prepared), "--no-progress"]) == 0
    run = tmp_path / "run"
    rng = random.Random(7)
    kills, inside_a_write = 0, 0
    resume_steps = []
    while kills < 2 or (inside_a_write == 0 and kills < 6):
        # Kills alternate: at a random moment, then the moment a temporary file shows (mid-write).
        mid_write = kills % 2 == 1
        command = train_command(prepared, run, 100_000, *(["--resume"] if kills else []))
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            resume_file = run / "resume.safetensors"
            first = resume_file.stat().st_mtime_ns if resume_file.exists() else 0
            deadline = time.monotonic() + 60.0
            # Wait for this run's first save, then kill it at a random moment of the next ones.
            while not (resume_file.exists() and resume_file.stat().st_mtime_ns != first
                       and (run / "latest.safetensors").exists()):
                assert process.poll() is None and time.monotonic() < deadline, "the trainer did not save"
                time.sleep(0.02)
            time.sleep(rng.uniform(1.0, 1.5))  # past the first save's plot (matplotlib's import)
            while mid_write and not list(run.glob(".*.tmp")):
                assert process.poll() is None and time.monotonic() < deadline, "no write seen"
                time.sleep(0.001)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        kills += 1
        inside_a_write += bool(list(run.glob(".*.tmp")))  # a temporary file: it died mid-write
        model, meta = load(run / "latest.safetensors")  # never torn: written aside, renamed
        assert model.cfg.n_embd == 256 and meta.step >= 1
        resume_steps.append(meta.step)
    assert inside_a_write >= 1, f"no kill out of {kills} landed inside a checkpoint write"
    # Resume from whatever the last kill left: it continues, finishes, and tidies the folder.
    _, state = load_resume(run / "resume.safetensors")
    target = state["step"] + 2
    result = subprocess.run(train_command(prepared, run, target, "--resume"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    model, meta = load(run / "latest.safetensors")
    assert meta.step == target
    assert not list(run.glob(".*.tmp")), "the stale temporary files were not removed"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "loss" in r) == target


LOAD_WHILE_REWRITTEN = r"""
import sys, threading, time
from pathlib import Path
from model.checkpoint import load
from model.errors import CheckpointError
from tests.test_reliability_checkpoints import rewrite_in_place
path, versions = Path(sys.argv[1]), [Path(p).read_bytes() for p in sys.argv[2:]]
stop = threading.Event()
writer = threading.Thread(target=rewrite_in_place, args=(path, versions, stop), daemon=True)
writer.start()
loads = refused = 0
deadline = time.monotonic() + 4.0
while time.monotonic() < deadline:
    try:
        load(path)
    except CheckpointError:
        refused += 1
    loads += 1
stop.set()
writer.join()
print(loads, refused)
"""


def test_model_load_of_a_file_rewritten_in_place_refuses_instead_of_crashing(tmp_path):
    tokenizer = build_tokenizer(DEFAULT_TOKENIZER_PARAMS)
    paths = []
    for seed in (31, 32):
        model = random_model(n_layer=2, n_embd=256, vocab_size=len(tokenizer), seed=seed)
        paths.append(tmp_path / f"v{seed}.safetensors")
        save(model, paths[-1], CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(tokenizer)))
    target = tmp_path / "latest.safetensors"
    target.write_bytes(paths[0].read_bytes())
    result = subprocess.run([sys.executable, "-c", LOAD_WHILE_REWRITTEN, str(target), *map(str, paths)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-1000:]}"


class _Trap:
    """Unpickling this creates the file `path`: proof that a loader ran pickled code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the trap's pickle
def test_checkpoints_are_never_unpickled(tmp_path, capsys):
    import pickle

    from model.errors import CheckpointError
    from tools.cli import main as cli_main

    marker = tmp_path / "code-ran"
    for name in ("trap.safetensors", "trap.pth"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"emb.weight": _Trap(marker)}, f)
    with pytest.raises(CheckpointError):
        load(tmp_path / "trap.safetensors")
    # BlinkDL's .pth format is a pickle: read with torch's weights-only loader, which refuses it.
    assert cli_main(["import", str(tmp_path / "trap.pth"), str(tmp_path / "out.safetensors")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("rwkv-music: error:") and "weights" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # one line, not torch's paragraph of advice
    assert not marker.exists()
