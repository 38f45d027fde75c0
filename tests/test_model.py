"""RWKV7: the three ways to run it agree; State; checkpoints; initialisation."""

from pathlib import Path

import pytest
import torch

from model import RWKV7, CheckpointError, CheckpointMeta, ModelConfig, State, load, read_meta, save
from model.rwkv7 import lora_rank
from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
from tests.model_factory import random_model


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def meta_for(model):
    return CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(build_tokenizer()))


def test_lora_ranks_follow_published_formula():
    cfg = ModelConfig(n_embd=256)
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (32, 32, 32, 64)
    cfg = ModelConfig(n_embd=2048, n_layer=24)
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (96, 96, 64, 256)
    assert lora_rank(768, 1.8, 0.5) == 64


def test_model_config_rejects_bad_head_size():
    with pytest.raises(ValueError, match="multiple of head_size"):
        ModelConfig(n_embd=100)


def test_forward_prefill_and_step_agree():
    model = random_model(n_layer=3, n_embd=128, seed=4)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(idx)
    state = model.init_state(2)
    stepped = torch.stack([model.step(idx[:, t], state)[0] for t in range(45)], dim=1)
    assert rel_err(stepped, logits) <= 1e-5

    pre = model.init_state(2)
    _, pre = model.prefill(idx[:, :20], pre)
    last, pre = model.prefill(idx[:, 20:], pre)
    assert rel_err(last, logits[:, -1]) <= 1e-5
    assert rel_err(pre.wkv, state.wkv) <= 1e-5
    assert rel_err(pre.shift, state.shift) <= 1e-5


def test_state_clone_index_cat_repeat():
    model = random_model(n_layer=2, n_embd=64, seed=5)
    state = model.init_state(3)
    for t in range(5):
        model.step(torch.tensor([1 + t, 7, 40 + t]), state)
    copy = state.clone()
    model.step(torch.tensor([2, 2, 2]), copy)
    assert not torch.equal(copy.wkv, state.wkv)  # clone is independent

    one = state[1]
    assert one.batch_size == 1 and torch.equal(one.wkv[:, 0], state.wkv[:, 1])
    fanned = one.repeat(4)
    assert fanned.batch_size == 4
    logits, _ = model.step(torch.tensor([9, 9, 9, 9]), fanned)
    assert torch.allclose(logits[0], logits[3])

    both = State.cat([state[0], state[2]])
    assert torch.equal(both.shift[:, :, 1], state.shift[:, :, 2])


def test_checkpoint_roundtrip_and_model_id(tmp_path: Path):
    model = random_model(n_layer=2, n_embd=64, seed=6)
    path = tmp_path / "ck.safetensors"
    saved = save(model, path, meta_for(model))
    loaded, meta = load(path)
    assert meta.model_id == saved.model_id and len(meta.model_id) == 12
    assert meta.model_config == model.cfg
    idx = torch.randint(0, model.cfg.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert len(meta.tokenizer()) == model.cfg.vocab_size
    assert read_meta(path).model_id == saved.model_id
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_checkpoint_refuses_truncated_and_garbage(tmp_path: Path):
    model = random_model(n_layer=1, n_embd=64, seed=7)
    path = tmp_path / "ck.safetensors"
    save(model, path, meta_for(model))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 50)
    for bad in (truncated, garbage, tmp_path / "missing.safetensors"):
        with pytest.raises(CheckpointError):
            load(bad)


def test_checkpoint_refuses_nan_and_tampered_weights(tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = random_model(n_layer=1, n_embd=64, seed=8)
    path = tmp_path / "ck.safetensors"
    save(model, path, meta_for(model))
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors["head.weight"][0, 0] = float("nan")
    nan_path = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_path), metadata=metadata)
    with pytest.raises(CheckpointError, match="differs|non-finite"):
        load(nan_path)


def test_init_matches_rwkv_lm_schedules():
    model = RWKV7(ModelConfig(n_layer=4, n_embd=128, vocab_size=380))
    att0, att3 = model.blocks[0].att, model.blocks[3].att
    assert torch.all(model.blocks[1].att.output.weight == 0)
    assert torch.all(model.blocks[1].ffn.value.weight == 0)
    assert torch.all(att0.w1 == 0) and att0.w2.abs().max() > 0
    assert float(model.emb.weight.detach().abs().max()) <= 1e-4
    # decay bias: -6 + 0.5 + zigzag*2.5 at channel 0 of every head start
    assert att0.w0[0].item() == pytest.approx(-6 + 0.5 - 2.5, abs=1e-5)
    assert att0.x_r[0].item() == pytest.approx(1.0) and att3.x_r[-1].item() < att0.x_r[-1].item()
    assert att3.ln_x.weight[0].item() == pytest.approx(1.0)
    assert att0.ln_x.weight[0].item() == pytest.approx(0.25 ** 0.7)
