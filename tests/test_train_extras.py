"""Trainer extras: MQTT checkpoint announcement (real mosquitto), gradient checkpointing,
and the training-step benchmark command."""

import json
import subprocess

import pytest
import torch

from model import CheckpointMeta
from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
from tests.model_factory import random_model
from tools.cli import main as cli_main
from train.announce import announce_checkpoint


def test_announce_checkpoint_reaches_a_real_broker(mosquitto, tmp_path):
    sub = subprocess.Popen(["mosquitto_sub", "-h", mosquitto.host, "-p", str(mosquitto.port),
                            "-t", "studio/checkpoints", "-C", "1", "-W", "20"],
                           stdout=subprocess.PIPE, text=True)
    model = random_model(n_layer=1, n_embd=64)
    meta = CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(build_tokenizer()), step=7,
                          val_loss=1.5, model_id="abc123def456")
    path = tmp_path / "latest.safetensors"
    mqtt = {"enabled": True, "host": mosquitto.host, "port": mosquitto.port, "prefix": "studio"}
    # mosquitto_sub needs a moment to subscribe; announce until it has received the message
    for _ in range(50):
        assert announce_checkpoint(mqtt, path, meta)
        try:
            out, _ = sub.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            continue
    message = json.loads(out)
    assert message == {"path": str(path.resolve()), "model_id": "abc123def456", "step": 7, "val_loss": 1.5}


def test_announce_checkpoint_without_broker_only_warns(tmp_path, caplog):
    from tests.fixtures.mosquitto import free_port

    model = random_model(n_layer=1, n_embd=64)
    meta = CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(build_tokenizer()))
    mqtt = {"enabled": True, "host": "127.0.0.1", "port": free_port(), "prefix": "studio"}
    assert announce_checkpoint(mqtt, tmp_path / "x.safetensors", meta) is False
    assert "could not announce" in caplog.text


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model(n_layer=2, n_embd=64, seed=3).train()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        model(idx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


def test_bench_train_reports_tokens_per_second(capsys):
    assert cli_main(["bench", "train", "--configs", "L1-D64", "--batch", "2", "--ctx", "32",
                     "--steps", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["results"]
    assert row["config"] == "L1-D64" and row["precision"] == "fp32" and row["tokens_per_s"] > 0
    assert "cores" in report["machine"]


@pytest.mark.parametrize("bad", ["--configs=L0-D64", "--configs=banana"])
def test_bench_train_rejects_bad_configs(bad, capsys):
    assert cli_main(["bench", "train", bad]) == 2
    assert "error" in capsys.readouterr().err
