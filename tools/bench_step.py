"""`rwkv-music bench step`: per-token latency of our RWKV7 step against the `rwkv` package.

For each configuration a random model (every weight perturbed, so no block is the identity)
is exported with `model.interop.export_pth` and loaded into BlinkDL's `rwkv` package in this
same process ('cpu fp32', RWKV_V7_ON=1). First the three implementations must agree on the
logits of the first tokens; then they are timed one token at a time at batch size 1,
interleaved in rounds so that load from other work hits all of them alike. The ratio is the
median over rounds of (our fused CPU kernel's time / the package's time in the same round).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# ours / package per token, from the product's targets; other configurations show no target.
TARGETS = {"L6-D256": 0.25, "L12-D512": 0.5}
DEFAULT_CONFIGS = "L6-D256,L12-D512"
AGREEMENT_TOKENS = 8
AGREEMENT_TOLERANCE = 1e-4  # relative, max |ours - package| / max |package|
WARMUP_TOKENS = 10

EPILOG = """examples:
  rwkv-music bench step
  rwkv-music bench step --json --tokens 300 --rounds 7
  rwkv-music bench step --configs L6-D256,L12-D512,L24-D1024
  rwkv-music bench step --threads 1              # everything on one core
  rwkv-music bench step --device cuda
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "step",
        help="per-token step latency, ours against the rwkv package",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: ours against the package; cuda: RWKV7.step on the GPU (default cpu)")
    p.add_argument("--tokens", type=int, default=200, help="tokens per implementation per round (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated LAYERS-DIM sizes such as L6-D256 (default {DEFAULT_CONFIGS})")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads for every implementation (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    p.set_defaults(run=run)


@dataclass
class ConfigResult:
    config: str
    n_layer: int
    n_embd: int
    weights_mb: float
    ms_per_token: dict[str, float] = field(default_factory=dict)  # median over rounds
    rounds_ms: dict[str, list[float]] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # rel. error against the package
    agrees: bool | None = None
    ratio: float | None = None  # kernel / package, median over rounds
    target: float | None = None
    passed: bool | None = None
    note: str = ""


def parse_configs(text: str) -> list[tuple[str, int, int]]:
    """'L6-D256,L12-D512' -> [('L6-D256', 6, 256), ('L12-D512', 12, 512)]."""
    from tools.cli import UserError

    configs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        match = re.fullmatch(r"L(\d+)-D(\d+)", item, flags=re.IGNORECASE)
        if not match or int(match[1]) < 1 or int(match[2]) < 64 or int(match[2]) % 64:
            raise UserError(f"--configs: {item!r} is not LAYERS-DIM like L6-D256 (DIM a multiple of 64)")
        configs.append((f"L{int(match[1])}-D{int(match[2])}", int(match[1]), int(match[2])))
    if not configs:
        raise UserError("--configs: no configuration given")
    return configs


def random_model(n_layer: int, n_embd: int, seed: int):
    """An RWKV7 whose every weight is perturbed (RWKV-LM's init makes blocks identities)."""
    import torch

    from model import RWKV7, ModelConfig

    torch.manual_seed(seed)
    model = RWKV7(ModelConfig(n_layer=n_layer, n_embd=n_embd))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "emb.weight":
                p.normal_(0, 1.0)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    from tools.cli import UserError

    if args.tokens < 1 or args.rounds < 1 or args.threads < 0:
        raise UserError("--tokens and --rounds must be >= 1, --threads >= 0")
    configs = parse_configs(args.configs)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        return run_cuda(args, configs)
    return run_cpu(args, configs)


# ------------------------------------------------------------------------------- CPU


def load_package_model(pth: Path):
    """BlinkDL's `rwkv` model for a .pth, in this process; its chatter goes to stderr."""
    from tools.cli import UserError

    os.environ["RWKV_V7_ON"] = "1"  # read at import: selects the x070 (RWKV-7) code
    with contextlib.redirect_stdout(sys.stderr):
        try:
            from rwkv.model import RWKV
        except ImportError as err:
            raise UserError("the `rwkv` package is needed for this comparison: pip install rwkv==0.8.32") from err
        return RWKV(str(pth.with_suffix("")), "cpu fp32")


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def run_cpu(args: argparse.Namespace, configs: list[tuple[str, int, int]]) -> int:
    from tools.bench import machine_description

    results, kernel_description = [], "unavailable"
    for name, n_layer, n_embd in configs:
        res, description = measure_cpu_config(name, n_layer, n_embd, args)
        results.append(res)
        kernel_description = description or kernel_description
    report = {
        "machine": machine_description(),
        "device": "cpu",
        "kernel": kernel_description,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "batch_size": 1,
        "configs": [asdict(r) for r in results],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_cpu_table(report, results)
    ok = all(r.agrees for r in results) and all(r.passed is not False for r in results)
    return 0 if ok else 1


def measure_cpu_config(name: str, n_layer: int, n_embd: int,
                       args: argparse.Namespace) -> tuple[ConfigResult, str | None]:
    """Agreement, then interleaved timing, of kernel / PyTorch step / package for one size."""
    import torch

    from kernels.cpu_step import DISABLE_ENV, CpuStepKernel
    from model.interop import export_pth

    model = random_model(n_layer, n_embd, args.seed)
    res = ConfigResult(name, n_layer, n_embd, weights_mb=sum(p.numel() for p in model.parameters()) * 4 / 1e6,
                       target=TARGETS.get(name))
    kernel = CpuStepKernel.for_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "bench.pth"
        export_pth(model, pth)
        package = load_package_model(pth)

    gen = torch.Generator().manual_seed(args.seed + 1)
    n_total = AGREEMENT_TOKENS + WARMUP_TOKENS + args.tokens * args.rounds
    tokens = torch.randint(0, model.cfg.vocab_size, (n_total,), generator=gen).tolist()
    idx = [torch.tensor([t]) for t in tokens]
    # Each implementation carries its own state through every round.
    kernel_state, torch_state, package_state = model.init_state(1), model.init_state(1), [None]

    def step_kernel(i: int) -> torch.Tensor:
        return kernel.step(idx[i], kernel_state)[0]

    def step_torch(i: int) -> torch.Tensor:
        return model.step(idx[i], torch_state)[0][0]

    def step_package(i: int) -> torch.Tensor:
        logits, package_state[0] = package.forward([tokens[i]], package_state[0])
        return logits

    impls: dict[str, Callable[[int], torch.Tensor]] = {"torch_step": step_torch, "package": step_package}
    if kernel is not None:
        impls = {"kernel": step_kernel, **impls}
    else:
        res.note = "CPU step kernel unavailable: 'ours' is the PyTorch step"

    with torch_step_forced(DISABLE_ENV):
        outs: dict[str, list[torch.Tensor]] = {key: [] for key in impls}
        for i in range(AGREEMENT_TOKENS):
            for key, fn in impls.items():
                outs[key].append(fn(i).clone())
        reference = torch.stack(outs["package"])
        res.agreement = {key: rel_err(torch.stack(v), reference) for key, v in outs.items() if key != "package"}
        res.agrees = all(e <= AGREEMENT_TOLERANCE for e in res.agreement.values())

        pos = AGREEMENT_TOKENS
        for fn in impls.values():
            for i in range(pos, pos + WARMUP_TOKENS):
                fn(i)
        pos += WARMUP_TOKENS
        res.rounds_ms = {key: [] for key in impls}
        for r in range(args.rounds):
            # Rotate the order so no implementation always runs right after another one.
            keys = list(impls)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in keys:
                fn = impls[key]
                start = time.perf_counter()
                for i in range(pos, pos + args.tokens):
                    fn(i)
                res.rounds_ms[key].append((time.perf_counter() - start) * 1e3 / args.tokens)
            pos += args.tokens

    res.ms_per_token = {key: statistics.median(v) for key, v in res.rounds_ms.items()}
    ours = "kernel" if kernel is not None else "torch_step"
    res.ratio = statistics.median(o / p for o, p in zip(res.rounds_ms[ours], res.rounds_ms["package"], strict=True))
    if res.target is not None:
        res.passed = res.ratio <= res.target
    return res, kernel.library.describe() if kernel is not None else None


@contextlib.contextmanager
def torch_step_forced(env_name: str):
    """While timing, RWKV7.step itself must stay the PyTorch step even if it routes to the kernel."""
    old = os.environ.get(env_name)
    os.environ[env_name] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(env_name, None)
        else:
            os.environ[env_name] = old


def print_cpu_table(report: dict, results: list[ConfigResult]) -> None:
    print(f"machine: {report['machine']}")
    print(f"kernel:  {report['kernel']}")
    print(f"batch 1, {report['tokens']} tokens x {report['rounds']} interleaved rounds; "
          "ms/token is the median over rounds")
    print()
    head = f"{'config':<10} {'MB':>6} {'kernel':>8} {'torch':>8} {'package':>8} {'ratio':>7} {'target':>7}  result"
    print(head)
    print("-" * len(head))
    for r in results:
        ms = r.ms_per_token
        kernel = f"{ms['kernel']:8.3f}" if "kernel" in ms else f"{'-':>8}"
        target = f"{r.target:7.2f}" if r.target is not None else f"{'-':>7}"
        verdict = "-" if r.passed is None else ("PASS" if r.passed else "FAIL")
        print(f"{r.config:<10} {r.weights_mb:6.1f} {kernel} {ms['torch_step']:8.3f} {ms['package']:8.3f} "
              f"{r.ratio:7.3f} {target}  {verdict}")
    print()
    for r in results:
        agreement = ", ".join(f"{k} {v:.1e}" for k, v in r.agreement.items())
        status = "ok" if r.agrees else f"DISAGREE (> {AGREEMENT_TOLERANCE:g})"
        print(f"{r.config}: logits of the first {AGREEMENT_TOKENS} tokens against the package: {agreement} -> {status}"
              + (f"; {r.note}" if r.note else ""))
    print("ratio = kernel ms / package ms per token (median over rounds); target: ratio <= target")


# ------------------------------------------------------------------------------- CUDA


def run_cuda(args: argparse.Namespace, configs: list[tuple[str, int, int]]) -> int:
    import torch

    from tools.bench import machine_description

    if not torch.cuda.is_available():
        message = "no CUDA GPU here: the cuda step benchmark is skipped"
        print(json.dumps({"machine": machine_description(), "device": "cuda", "skipped": message})
              if args.json else message)
        return 0
    rows = []
    for name, n_layer, n_embd in configs:
        model = random_model(n_layer, n_embd, args.seed).cuda()
        state = model.init_state(1)
        gen = torch.Generator().manual_seed(args.seed + 1)
        n_total = WARMUP_TOKENS + args.tokens * args.rounds
        idx = torch.randint(0, model.cfg.vocab_size, (n_total, 1), generator=gen).cuda()
        for i in range(WARMUP_TOKENS):
            model.step(idx[i], state)
        torch.cuda.synchronize()
        per_round = []
        pos = WARMUP_TOKENS
        for _ in range(args.rounds):
            start = time.perf_counter()
            for i in range(pos, pos + args.tokens):
                logits, _ = model.step(idx[i], state)
                logits.cpu()  # a live player needs each token's logits on the host
            per_round.append((time.perf_counter() - start) * 1e3 / args.tokens)
            pos += args.tokens
        rows.append({"config": name, "n_layer": n_layer, "n_embd": n_embd,
                     "ms_per_token": statistics.median(per_round), "rounds_ms": per_round})
        del model, state
        torch.cuda.empty_cache()
    report = {"machine": machine_description(), "device": "cuda", "tokens": args.tokens,
              "rounds": args.rounds, "batch_size": 1, "configs": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"machine: {report['machine']}")
        print(f"RWKV7.step on {torch.cuda.get_device_name()}, batch 1, logits copied to the host each token")
        for row in rows:
            print(f"{row['config']:<10} {row['ms_per_token']:8.3f} ms/token")
    return 0
