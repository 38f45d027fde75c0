"""`rwkv-music bench train`: tokens/s of one training step (forward, backward, AdamW).

Random token windows, the trainer's own loss module and optimizer grouping, bf16 autocast on
CUDA and fp32 on CPU; warm-up steps are excluded and the device is synchronised around the
timed steps.
"""

from __future__ import annotations

import argparse
import json
import time

EPILOG = """examples:
  rwkv-music bench train
  rwkv-music bench train --configs L6-D256,L12-D768 --batch 8 --ctx 512 --device cuda --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="tokens/s of a training step", description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="L6-D256", help="comma-separated LAYERS-DIM sizes (default L6-D256)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default 3, after 1 warm-up)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_bench_train)


def time_training_step(n_layer: int, n_embd: int, *, device: str, batch: int, ctx: int, steps: int,
                       grad_checkpointing: bool = False, vocab_size: int = 318) -> dict:
    """Build a model of the given size and time `steps` optimizer steps after one warm-up."""
    import torch

    from model.rwkv7 import RWKV7, ModelConfig
    from train.loop import UNUSED_PARAMS, WindowLoss, param_groups

    torch.manual_seed(0)
    model = RWKV7(ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size)).to(device)
    model.grad_checkpointing = grad_checkpointing
    for name, p in model.named_parameters():
        p.requires_grad_(name not in UNUSED_PARAMS)
    loss_module = WindowLoss(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=device == "cuda")
    idx = torch.randint(0, vocab_size, (batch, ctx + 1), device=device)
    use_bf16 = device == "cuda"

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
            loss, _, _ = loss_module(idx[:, :-1], idx[:, 1:], None, None)
        (loss / idx[:, 1:].numel()).backward()
        opt.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    one_step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    result = {"config": f"L{n_layer}-D{n_embd}", "params_M": round(model.num_params() / 1e6, 2),
              "device": device, "precision": "bf16" if use_bf16 else "fp32", "batch": batch, "ctx": ctx,
              "seconds_per_step": round(seconds, 4), "tokens_per_s": round(batch * ctx / seconds, 1)}
    if device == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def run_bench_train(args: argparse.Namespace) -> int:
    import torch

    from tools.bench import machine_description
    from tools.bench_step import parse_configs
    from tools.cli import UserError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
    results = [time_training_step(n_layer, n_embd, device=args.device, batch=args.batch, ctx=args.ctx,
                                  steps=args.steps, grad_checkpointing=args.grad_checkpointing)
               for _, n_layer, n_embd in parse_configs(args.configs)]
    machine = machine_description()
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=1))
        return 0
    print(f"training step, {machine}")
    print(f"{'config':<10} {'params':>8} {'device':>6} {'prec':>5} {'s/step':>8} {'tokens/s':>10}")
    for r in results:
        print(f"{r['config']:<10} {r['params_M']:>7.2f}M {r['device']:>6} {r['precision']:>5} "
              f"{r['seconds_per_step']:>8.3f} {r['tokens_per_s']:>10,.0f}")
    return 0
