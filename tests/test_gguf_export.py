"""Our RWKV7 written as GGUF and run by llama.cpp's rwkv7 step (the optional peers extra).

Skipped unless `llama-cpp-python` and `gguf` are installed (pip install -e '.[peers]'); where
they are, llama.cpp must compute the same logits as RWKV7.step from the same float32 weights.
"""

import numpy as np
import pytest
import torch

from model.gguf_export import export_gguf
from tests.model_factory import random_model

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")


def test_gguf_export_runs_in_llama_cpp_like_our_step(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_MUSIC_NO_CPU_STEP", "1")  # the reference is the PyTorch step
    model = random_model(n_layer=2, n_embd=128, seed=0)
    vocab = model.cfg.vocab_size
    path = tmp_path / "model.gguf"
    export_gguf(model, path, [f"t{i}" for i in range(vocab)], "f32")
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=1, n_threads=1, verbose=False)
    token = (llama_cpp.llama_token * 1)()
    state = model.init_state(1)
    for t in (5, 17, 100, 3, 42, 7):
        ref, _ = model.step(torch.tensor([t]), state)
        token[0] = t
        assert llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(token, 1)) == 0
        got = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                                     shape=(vocab,)).copy())
        assert float((got - ref[0]).abs().max() / ref.abs().max()) <= 1e-5
