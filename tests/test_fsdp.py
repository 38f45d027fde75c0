"""FSDP2 on two CPU processes (gloo) against one process on the same global batch: the same
gradients and the same weights after a few AdamW steps."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.fixtures.torchrun import TORCHRUN, run_to_end

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
GLOBAL_BATCH, CTX, VOCAB = 4, 32, 64

# Run by torchrun (2 ranks, FSDP) and by plain python (1 rank, no wrapping): the same model,
# the same global batch, the loss of each rank scaled so that the ranks' gradients add up to the
# single process's; FSDP averages them over the ranks, hence the factor world_size.
SCRIPT = f"""
import os, sys, torch
import torch.distributed as dist
import torch.nn.functional as F
from model.rwkv7 import RWKV7, ModelConfig
from train.loop import UNUSED_PARAMS, WindowLoss, leave_process_group, param_groups, shard_fully

torch.set_num_threads(1)
out = sys.argv[1]
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = RWKV7(ModelConfig(n_layer=2, n_embd=64, vocab_size={VOCAB}))
for name, p in model.named_parameters():
    p.requires_grad_(name not in UNUSED_PARAMS)
module = WindowLoss(model)
if world > 1:
    module = shard_fully(model, module)
opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
data = torch.randint(0, {VOCAB}, ({STEPS}, {GLOBAL_BATCH}, {CTX} + 1), generator=torch.Generator().manual_seed(1))
per_rank = {GLOBAL_BATCH} // world

def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t

grads = {{}}
for step in range(data.shape[0]):
    batch = data[step, rank * per_rank:(rank + 1) * per_rank]
    opt.zero_grad(set_to_none=True)
    loss_sum, _, _ = module(batch[:, :-1], batch[:, 1:], None, None)
    (loss_sum / ({GLOBAL_BATCH} * {CTX}) * world).backward()
    if step == 0:
        grads = {{n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}}
    opt.step()
weights = {{n: full(p.detach()).clone() for n, p in model.named_parameters()}}
if rank == 0:
    torch.save({{"grads": grads, "weights": weights}}, out)
leave_process_group()  # as `train` does: no rank tears gloo down while another still uses it
"""


def run(args: list[str], out: Path) -> None:
    output = run_to_end([*args, str(out)], out.parent, {"PYTHONPATH": str(ROOT)})
    assert "view" not in output.lower(), output[-3000:]  # FSDP's warning about outputs that are views


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_fsdp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "fsdp_vs_single.py"
    script.write_text(SCRIPT)
    run([sys.executable, str(script)], tmp_path / "single.pt")
    run([*TORCHRUN, str(script)], tmp_path / "fsdp.pt")
    single = torch.load(tmp_path / "single.pt")
    sharded = torch.load(tmp_path / "fsdp.pt")
    assert single["grads"].keys() == sharded["grads"].keys() and len(single["grads"]) > 20
    for name, grad in single["grads"].items():
        assert relative_difference(sharded["grads"][name], grad) <= 1e-5, name
    for name, weight in single["weights"].items():
        assert relative_difference(sharded["weights"][name], weight) <= 1e-5, name
