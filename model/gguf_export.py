"""Write an RWKV7 as a GGUF file that llama.cpp's `rwkv7` architecture loads.

For timing llama.cpp's step beside ours (`rwkv-music bench step`); needs the optional `gguf`
package. The mapping (checked against llama.cpp's rwkv7 graph, which computes the same x070
block as RWKV7.step):

    emb.weight -> token_embd; blocks.0.ln0 -> token_embd_norm; ln_out -> output_norm;
    head -> output; ln1 / ln2 -> attn_norm / attn_norm_2; att.x_r..x_g stacked [6, 1, 1, C]
    -> time_mix_lerp_fused; LoRA w1/a1/v1/g1 [C, D] and w2/a2/v2/g2 [D, C] are stored
    transposed (llama.cpp multiplies like nn.Linear, [out, in]); att.r_k [H, N] flattened;
    att.ln_x -> time_mix_ln (its GroupNorm eps, 64e-5, is fixed in llama.cpp too);
    ffn.x_k -> channel_mix_lerp_k [1, 1, C]; the rest by name.

GGUF shapes are written in torch order; the writer reverses them into ggml's order. The
vocabulary is the tokenizer's token names under llama.cpp's "rwkv" tokenizer: the benchmark
feeds token ids, so no text is ever tokenised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from model.rwkv7 import LN_X_EPS, RWKV7

# Our per-layer names -> llama.cpp's (blk.<i>.<name>.weight), for tensors copied as they are.
_SAME_LAYOUT = {
    "ln1.weight": "attn_norm.weight", "ln1.bias": "attn_norm.bias",
    "ln2.weight": "attn_norm_2.weight", "ln2.bias": "attn_norm_2.bias",
    "att.w0": "time_mix_w0.weight", "att.a0": "time_mix_a0.weight", "att.v0": "time_mix_v0.weight",
    "att.k_k": "time_mix_k_k.weight", "att.k_a": "time_mix_k_a.weight",
    "att.receptance.weight": "time_mix_receptance.weight", "att.key.weight": "time_mix_key.weight",
    "att.value.weight": "time_mix_value.weight", "att.output.weight": "time_mix_output.weight",
    "att.ln_x.weight": "time_mix_ln.weight", "att.ln_x.bias": "time_mix_ln.bias",
    "ffn.key.weight": "channel_mix_key.weight", "ffn.value.weight": "channel_mix_value.weight",
}
_TRANSPOSED = {f"att.{m}{i}": f"time_mix_{m}{i}.weight" for m in "wavg" for i in (1, 2)}
_LERPS = ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g")
# Matrix storage types, by the names `bench step` uses; values are gguf.GGMLQuantizationType names.
GGUF_MATRIX_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


def gguf_tensors(model: RWKV7) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor name -> float32 tensor in torch order, for every tensor it loads."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["emb.weight"],
        "token_embd_norm.weight": sd["blocks.0.ln0.weight"],
        "token_embd_norm.bias": sd["blocks.0.ln0.bias"],
        "output_norm.weight": sd["ln_out.weight"],
        "output_norm.bias": sd["ln_out.bias"],
        "output.weight": sd["head.weight"],
    }
    for i in range(model.cfg.n_layer):
        p = f"blocks.{i}."
        for ours, theirs in _SAME_LAYOUT.items():
            out[f"blk.{i}.{theirs}"] = sd[p + ours]
        for ours, theirs in _TRANSPOSED.items():
            out[f"blk.{i}.{theirs}"] = sd[p + ours].t()
        out[f"blk.{i}.time_mix_r_k.weight"] = sd[p + "att.r_k"].reshape(-1)
        out[f"blk.{i}.time_mix_lerp_fused.weight"] = torch.stack([sd[p + n] for n in _LERPS]).view(6, 1, 1, -1)
        out[f"blk.{i}.channel_mix_lerp_k.weight"] = sd[p + "ffn.x_k"].view(1, 1, -1)
    return {k: v.contiguous() for k, v in out.items()}


def export_gguf(model: RWKV7, path: str | Path, token_names: Sequence[str], dtype: str = "f32") -> None:
    """Write `model` to `path` as GGUF with its matrices in `dtype` (a GGUF_MATRIX_TYPES key;
    q8_0 is llama.cpp's int8 with one scale per 32 weights); vectors and the embedding stay
    float32. token_names: one name per token id (the tokenizer's vocabulary)."""
    import gguf
    import numpy as np

    cfg = model.cfg
    if cfg.learned_state:  # llama.cpp starts every sequence from zeros
        raise ValueError("a state-tuned model's learned initial state has no place in GGUF")
    if abs(model.blocks[0].att.ln_x.eps - LN_X_EPS) > 1e-12:
        raise ValueError("llama.cpp's rwkv7 fixes the GroupNorm eps at 64e-5")
    if len(token_names) != cfg.vocab_size:
        raise ValueError(f"{len(token_names)} token names for a vocabulary of {cfg.vocab_size}")
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_name("rwkv-music")
    writer.add_context_length(1 << 20)  # a recurrent model has no context limit
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_layer_norm_eps(model.ln_out.eps)
    writer.add_wkv_head_size(cfg.head_size)
    writer.add_decay_lora_rank(model.blocks[0].att.w1.shape[1])
    writer.add_iclr_lora_rank(model.blocks[0].att.a1.shape[1])
    writer.add_value_residual_mix_lora_rank(model.blocks[0].att.v1.shape[1])
    writer.add_gate_lora_rank(model.blocks[0].att.g1.shape[1])
    writer.add_feed_forward_length(model.blocks[0].ffn.key.weight.shape[0])
    writer.add_token_shift_count(2)
    writer.add_head_count(0)  # required by llama.cpp's loader, unused by rwkv7
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list([name.encode() for name in token_names])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(token_names))
    qtype = gguf.GGMLQuantizationType[GGUF_MATRIX_TYPES[dtype]]
    for name, tensor in gguf_tensors(model).items():
        array = tensor.numpy().astype(np.float32)
        if tensor.dim() != 2 or dtype == "f32" or name == "token_embd.weight":
            writer.add_tensor(name, array)  # vectors, the lerps, the embedding (one row a token)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
