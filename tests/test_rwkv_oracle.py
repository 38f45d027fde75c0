"""Our RWKV-7 against an outside oracle: BlinkDL's `rwkv` PyPI package (x070, CPU fp32).

The package is run in a subprocess (it sets global TorchScript switches at import) on the .pth
that `rwkv-music export` writes; it sees the 64 tokens as two calls of 32 with its state carried.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import CheckpointMeta, save
from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
from tests.model_factory import random_model
from tools.cli import main as cli_main

ORACLE_SCRIPT = """
import os, sys, json
import numpy as np
import torch
os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "0"
from rwkv.model import RWKV
pth, tokens_json, out = sys.argv[1:4]
tokens = json.loads(tokens_json)
model = RWKV(pth[:-len(".pth")], "cpu fp32")
first, state = model.forward(tokens[:32], None, full_output=True)
second, state = model.forward(tokens[32:], state, full_output=True)
np.save(out, torch.cat([first, second]).float().numpy())
"""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oracle")
    model = random_model(n_layer=3, n_embd=128, seed=1)
    tok = build_tokenizer()
    ckpt = tmp / "random.safetensors"
    save(model, ckpt, CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(tok)))
    pth = tmp / "random.pth"
    assert cli_main(["export", str(ckpt), str(pth)]) == 0
    tokens = torch.randint(0, model.cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(3))
    out = tmp / "oracle_logits.npy"
    env = {**os.environ, "RWKV_V7_ON": "1"}
    subprocess.run([sys.executable, "-c", ORACLE_SCRIPT, str(pth), json.dumps(tokens.tolist()), str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    return model, tokens, torch.from_numpy(np.load(out))


def test_oracle_forward_matches_rwkv_package(exported):
    model, tokens, oracle = exported
    with torch.no_grad():
        ours = model(tokens[None])[0]
    assert ours.shape == oracle.shape == (64, model.cfg.vocab_size)
    assert rel_err(ours, oracle) <= 1e-4


def test_oracle_step_matches_rwkv_package(exported):
    model, tokens, oracle = exported
    state = model.init_state(1)
    ours = torch.stack([model.step(t[None], state)[0][0] for t in tokens])
    assert rel_err(ours, oracle) <= 1e-4


def test_oracle_import_roundtrip(exported, tmp_path: Path):
    model, tokens, oracle = exported
    pth = tmp_path / "m.pth"
    from model.interop import export_pth
    export_pth(model, pth)
    out = tmp_path / "imported.safetensors"
    assert cli_main(["import", str(pth), str(out)]) == 0
    from model import load
    imported, meta = load(out)
    with torch.no_grad():
        assert rel_err(imported(tokens[None])[0], oracle) <= 1e-4
    assert meta.model_config.n_layer == 3
