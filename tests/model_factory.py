"""Small RWKV-7 models with every weight non-trivial, for tests.

RWKV-LM's initialisation zeroes the output projections, so a freshly initialised block is the
identity; tests that compare implementations perturb every tensor so each path is exercised.
"""

import torch

from model import RWKV7, ModelConfig


def random_model(n_layer: int = 2, n_embd: int = 128, vocab_size: int | None = None, seed: int = 0,
                 scale: float = 0.1) -> RWKV7:
    """vocab_size defaults to the default REMI vocabulary's size."""
    if vocab_size is None:
        from model.vocab import build_tokenizer

        vocab_size = len(build_tokenizer())
    torch.manual_seed(seed)
    model = RWKV7(ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "emb.weight":
                p.normal_(0, 1.0)
            else:
                p.add_(torch.randn_like(p) * scale)
    return model.eval()
