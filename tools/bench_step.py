"""`rwkv-music bench step`: per-token latency of our RWKV7 step against the `rwkv` package.

For each configuration a random model (every weight perturbed, so no block is the identity)
is exported with `model.interop.export_pth` and loaded into BlinkDL's `rwkv` package in this
same process ('cpu fp32', RWKV_V7_ON=1). First the implementations must agree on the logits
of the first tokens; then they are timed one token at a time at batch size 1, interleaved in
rounds so that load from other work hits all of them alike:

- our fused CPU kernel with the large matrices stored as each of `--weights` (fp32, bf16, int8),
  timed as the engine runs it: each round's tokens in one `weights_fixed` block (the parameters
  checked once on entry, not on every token);
- a plain read pass over as many bytes as that kernel reads per token (a vectorised sum over a
  buffer of that size, cut into the step's chunks and run by its scheduler), once on one
  thread and once on torch's threads: the faster of the two in each round is the
  memory-bandwidth floor of the step, measured beside it;
- the PyTorch step (RWKV7.step_torch) and the package;
- llama.cpp's rwkv7 step on the same weights written as GGUF (f32, bf16, q8_0 for our fp32,
  bf16, int8), when the optional `llama-cpp-python` and `gguf` packages are installed
  (`pip install -e '.[peers]'`); it runs with torch's thread count, as the package does;
- the kernel at the chosen format with K = `--streams` streams per step (one call, the weights
  read once for all K).

Every ratio is the median over rounds of two times taken in the same round: kernel / package,
kernel / read pass (x floor), K streams / one stream. Each round also times a cache line's
round trip between two threads: on a machine whose cores sit on several chiplets (or sockets)
a read on two threads far apart gets two memory links, and the floor drops with it.
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

from kernels.weight_formats import DEFAULT_WEIGHTS, WEIGHT_FORMATS

# Targets for the chosen weight format, from the product's goals; other sizes show none.
#   package: kernel / package per token; floor: kernel / read pass; streams4: 4 streams / 1.
TARGETS: dict[str, dict[str, float]] = {
    "L6-D256": {"package": 0.15},
    "L12-D512": {"package": 0.25, "floor": 1.2, "streams4": 1.6},
}
DEFAULT_CONFIGS = "L6-D256,L12-D512"
DEFAULT_STREAMS = "1,2,4,8"
AGREEMENT_TOKENS = 8
AGREEMENT_TOLERANCE = 1e-4  # relative, max |ours - package| / max |package|, for float32 weights
WARMUP_TOKENS = 10

EPILOG = f"""examples:
  rwkv-music bench step
  rwkv-music bench step --json --tokens 300 --rounds 7
  rwkv-music bench step --weights bf16 --streams 1,4
  rwkv-music bench step --configs L6-D256,L12-D512,L24-D1024
  rwkv-music bench step --threads 1              # everything on one core
  rwkv-music bench step --device cuda

The targets apply to the chosen format: --target-weights, default {DEFAULT_WEIGHTS}
(the default of [daemon] weights).
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
    p.add_argument("--weights", default=",".join(WEIGHT_FORMATS),
                   help="comma-separated storage formats of the large matrices to time "
                        f"({', '.join(WEIGHT_FORMATS)}; default all)")
    p.add_argument("--target-weights", default=DEFAULT_WEIGHTS, choices=tuple(WEIGHT_FORMATS),
                   help=f"the format the targets and the streams apply to (default {DEFAULT_WEIGHTS})")
    p.add_argument("--streams", default=DEFAULT_STREAMS,
                   help=f"comma-separated stream counts K timed per step at the target format (default "
                        f"{DEFAULT_STREAMS}; '1' for none)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads for every implementation (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    p.set_defaults(run=run)


@dataclass
class ConfigResult:
    config: str
    n_layer: int
    n_embd: int
    weights_mb: float  # all parameters in float32
    bytes_per_token: dict[str, int] = field(default_factory=dict)  # per format, batch 1
    ms_per_token: dict[str, float] = field(default_factory=dict)  # median over rounds
    rounds_ms: dict[str, list[float]] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # rel. error against the package
    agrees: bool | None = None  # fp32 kernel and PyTorch step within AGREEMENT_TOLERANCE
    ratio: dict[str, float] = field(default_factory=dict)  # kernel / package per format
    read_gb_per_s: dict[str, float] = field(default_factory=dict)  # read pass, per format's bytes
    x_floor: dict[str, float] = field(default_factory=dict)  # kernel / read pass per format
    streams_ratio: dict[str, float] = field(default_factory=dict)  # "K" -> K streams / one stream
    llama_ratio: dict[str, float] = field(default_factory=dict)  # kernel / llama.cpp per format
    round_trip_ns: list[float] = field(default_factory=list)  # two threads' round trip, each round
    target_weights: str = DEFAULT_WEIGHTS
    targets: dict[str, dict] = field(default_factory=dict)  # name -> {value, target, passed}
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


def parse_weights(text: str) -> list[str]:
    """'fp32,bf16' -> ['fp32', 'bf16'] (each a known format, no repeats)."""
    from tools.cli import UserError

    formats = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in formats if w not in WEIGHT_FORMATS]
    if bad or not formats or len(set(formats)) != len(formats):
        raise UserError(f"--weights: {text!r} is not a list of distinct formats from {', '.join(WEIGHT_FORMATS)}")
    return formats


def parse_streams(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (1 always included: the other counts are compared with it)."""
    from tools.cli import UserError

    try:
        counts = sorted({int(k) for k in text.split(",") if k.strip()} | {1})
    except ValueError as err:
        raise UserError(f"--streams: {text!r} is not a list of stream counts such as 1,2,4,8") from err
    if counts[0] < 1 or counts[-1] > 64:
        raise UserError("--streams: counts must be 1..64")
    return counts


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
    args.weights_list = parse_weights(args.weights)
    args.streams_list = parse_streams(args.streams)
    if args.target_weights not in args.weights_list:
        args.weights_list.append(args.target_weights)
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
        "weights": args.weights_list,
        "target_weights": args.target_weights,
        "streams": args.streams_list,
        "configs": [asdict(r) for r in results],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_cpu_table(report, results)
    ok = all(r.agrees for r in results) and all(r.passed is not False for r in results)
    return 0 if ok else 1


# Our weight format -> the GGUF matrix type llama.cpp runs for it (q8_0: int8, a scale per 32).
LLAMA_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}


def llama_available() -> bool:
    """Whether the optional peer can run: llama-cpp-python and gguf importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gguf"))


def llama_step(model, folder: Path, weights: str, n_ctx: int, ids: list[int]) -> Callable[[int], object]:
    """llama.cpp's step on `model` written as GGUF: i -> logits [V] of token ids[i] (one
    llama_decode of one token, state carried by llama.cpp's recurrent memory)."""
    import llama_cpp
    import numpy as np
    import torch

    from model.gguf_export import export_gguf

    path = folder / f"bench-{LLAMA_TYPES[weights]}.gguf"
    export_gguf(model, path, [f"t{i}" for i in range(model.cfg.vocab_size)], LLAMA_TYPES[weights])
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(sys.stderr):
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=1, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
    ctx, vocab = llm._ctx.ctx, model.cfg.vocab_size
    token = (llama_cpp.llama_token * 1)()

    def step(i: int) -> torch.Tensor:
        token[0] = ids[i]
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(token, 1)) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        return torch.from_numpy(logits.copy())

    step.keep_alive = llm  # the context lives as long as the function
    return step


def read_passes(kernel, nbytes: int) -> list[Callable[[int], None]]:
    """Step-shaped functions that read `nbytes` once per call with the kernel's scheduler
    (`CpuStepKernel.read_pass`), one on a single thread and one on torch's threads (just one
    when that is 1): what a token that only read its weights would cost. Both counts are fixed,
    not left to the library's choice: a choice that settled on the slower count for a while
    (it retries the other one only every 16th or 256th call) would make the floor slow."""
    import torch

    from kernels.huge_pages import huge_page_floats

    buffer = huge_page_floats(max(1, nbytes // 4))  # on 2 MB pages, as the packed weights are
    counts = sorted({1, max(1, torch.get_num_threads())})
    return [lambda i, n=n: kernel.read_pass(buffer, threads=n) for n in counts]


def measure_cpu_config(name: str, n_layer: int, n_embd: int,
                       args: argparse.Namespace) -> tuple[ConfigResult, str | None]:
    """Agreement, then interleaved timing of every implementation, for one size."""
    import torch

    from kernels.cpu_step import DISABLE_ENV, CpuStepKernel
    from model.interop import export_pth

    model = random_model(n_layer, n_embd, args.seed)
    res = ConfigResult(name, n_layer, n_embd, weights_mb=sum(p.numel() for p in model.parameters()) * 4 / 1e6,
                       target_weights=args.target_weights)
    kernels = {w: CpuStepKernel.for_model(model, w) for w in args.weights_list}
    library = next((k.library for k in kernels.values() if k is not None), None)
    n_total = AGREEMENT_TOKENS + WARMUP_TOKENS + args.tokens * args.rounds
    gen = torch.Generator().manual_seed(args.seed + 1)
    streams = args.streams_list if kernels[args.target_weights] is not None else [1]
    tokens = torch.randint(0, model.cfg.vocab_size, (n_total, max(streams)), generator=gen)
    idx = [tokens[i, :1].clone() for i in range(n_total)]
    ids = tokens[:, 0].tolist()
    llama: dict[str, Callable[[int], object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "bench.pth"
        export_pth(model, pth)
        package = load_package_model(pth)
        if llama_available():
            llama = {w: llama_step(model, Path(tmp), w, n_total + 16, ids) for w in args.weights_list}
        else:
            res.note = "llama.cpp not timed: pip install -e '.[peers]' (llama-cpp-python, gguf)"

    def kernel_step(kernel: CpuStepKernel, batch: int) -> Callable[[int], torch.Tensor]:
        state = model.init_state(batch)  # each implementation carries its own state
        rows = [tokens[i, :batch].clone() for i in range(n_total)]
        return lambda i: kernel.step(rows[i], state.shift, state.wkv)  # [batch, V], as the engine takes it

    torch_state, package_state = model.init_state(1), [None]

    def step_torch(i: int) -> torch.Tensor:
        return model.step(idx[i], torch_state)[0]  # logits [1, V]

    def step_package(i: int) -> torch.Tensor:
        logits, package_state[0] = package.forward([ids[i]], package_state[0])
        return logits

    impls: dict[str, Callable[[int], object]] = {}
    fixed: dict[str, CpuStepKernel] = {}  # timed inside kernel.weights_fixed(), as the engine runs it
    for w, kernel in kernels.items():
        if kernel is None:
            res.note = "CPU step kernel unavailable: only the PyTorch step and the package are timed"
            continue
        res.bytes_per_token[w] = kernel.bytes_per_token
        impls[f"kernel_{w}"] = kernel_step(kernel, 1)
        fixed[f"kernel_{w}"] = kernel
    impls["torch_step"] = step_torch
    impls["package"] = step_package
    for w, fn in llama.items():
        impls[f"llama_{w}"] = fn
    checked = list(impls)  # the step implementations, compared on the first tokens
    reads: dict[str, list[str]] = {}  # format -> its read passes' keys
    for w, nbytes in res.bytes_per_token.items():
        for n, fn in enumerate(read_passes(kernels[w], nbytes)):
            impls[f"read{n}_{w}"] = fn
            reads.setdefault(w, []).append(f"read{n}_{w}")
    for k in streams[1:]:
        impls[f"streams_{k}"] = kernel_step(kernels[args.target_weights], k)
        fixed[f"streams_{k}"] = kernels[args.target_weights]

    with torch_step_forced(DISABLE_ENV):
        outs: dict[str, list[torch.Tensor]] = {key: [] for key in checked}
        for i in range(AGREEMENT_TOKENS):
            for key in checked:
                # one token's logits [V]: the steps give [1, V], the package and llama.cpp [V]
                outs[key].append(impls[key](i).reshape(-1).clone())
        reference = torch.stack(outs["package"])
        res.agreement = {key: rel_err(torch.stack(v), reference) for key, v in outs.items() if key != "package"}
        exact = [key for key in ("kernel_fp32", "torch_step", "llama_fp32") if key in res.agreement]
        res.agrees = all(res.agreement[key] <= AGREEMENT_TOLERANCE for key in exact)

        pos = AGREEMENT_TOKENS
        for fn in impls.values():
            for i in range(pos, pos + WARMUP_TOKENS):
                fn(i)
        pos += WARMUP_TOKENS
        res.rounds_ms = {key: [] for key in impls}
        for r in range(args.rounds):
            # Where the two threads run decides the floor (see print_cpu_table). Timed after a
            # pause, when the helper threads of the kernel and of torch have stopped spinning.
            time.sleep(0.05)
            trip = library.round_trip_ns() if library is not None else None
            if trip is not None:
                res.round_trip_ns.append(trip)
            # Rotate the order so no implementation always runs right after another one.
            keys = list(impls)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in keys:
                fn = impls[key]
                start = time.perf_counter()
                with fixed[key].weights_fixed() if key in fixed else contextlib.nullcontext():
                    for i in range(pos, pos + args.tokens):
                        fn(i)
                res.rounds_ms[key].append((time.perf_counter() - start) * 1e3 / args.tokens)
            pos += args.tokens

    for w, keys in reads.items():  # the floor of each round: its faster read pass
        res.rounds_ms[f"read_{w}"] = [min(times) for times in zip(*(res.rounds_ms.pop(k) for k in keys), strict=True)]
    res.ms_per_token = {key: statistics.median(v) for key, v in res.rounds_ms.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(res.rounds_ms[a], res.rounds_ms[b], strict=True))

    for w in llama:
        res.llama_ratio[w] = ratio(f"kernel_{w}", f"llama_{w}")
    for w, nbytes in res.bytes_per_token.items():
        res.ratio[w] = ratio(f"kernel_{w}", "package")
        res.x_floor[w] = ratio(f"kernel_{w}", f"read_{w}")
        res.read_gb_per_s[w] = nbytes / (res.ms_per_token[f"read_{w}"] * 1e6)
    for k in streams[1:]:
        res.streams_ratio[str(k)] = ratio(f"streams_{k}", f"kernel_{args.target_weights}")
    tw = args.target_weights
    values = {"package": res.ratio.get(tw), "floor": res.x_floor.get(tw), "streams4": res.streams_ratio.get("4")}
    for key, target in TARGETS.get(name, {}).items():
        value = values[key]
        res.targets[key] = {"value": value, "target": target, "passed": None if value is None else value <= target}
    if res.targets:
        res.passed = all(t["passed"] is not False for t in res.targets.values())
    return res, library.describe() if library is not None else None


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


TARGET_NAMES = {"package": "kernel / package", "floor": "kernel / read floor", "streams4": "4 streams / 1 stream"}


def print_cpu_table(report: dict, results: list[ConfigResult]) -> None:
    print(f"machine: {report['machine']}")
    print(f"kernel:  {report['kernel']}")
    print(f"batch 1, {report['tokens']} tokens x {report['rounds']} interleaved rounds; "
          "ms/token is the median over rounds, every ratio the median of same-round ratios")
    print()
    head = (f"{'config':<10} {'weights':<7} {'MB/token':>8} {'kernel':>8} {'read':>8} {'GB/s':>6} "
            f"{'x floor':>7} {'package':>8} {'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        ms = r.ms_per_token
        for w in r.bytes_per_token:
            print(f"{r.config:<10} {w:<7} {r.bytes_per_token[w] / 1e6:8.1f} {ms[f'kernel_{w}']:8.3f} "
                  f"{ms[f'read_{w}']:8.3f} {r.read_gb_per_s[w]:6.1f} {r.x_floor[w]:7.2f} "
                  f"{ms['package']:8.3f} {r.ratio[w]:7.3f}")
        print(f"{r.config:<10} {'torch':<7} {r.weights_mb:8.1f} {ms['torch_step']:8.3f} {'':>8} {'':>6} {'':>7} "
              f"{ms['package']:8.3f} {ms['torch_step'] / ms['package']:7.3f}")
        for w in r.llama_ratio:
            name = f"llama.cpp {LLAMA_TYPES[w]}"
            print(f"{r.config:<10} {name:<16} {ms[f'llama_{w}']:8.3f} {'':>22} {ms['package']:8.3f} "
                  f"{ms[f'llama_{w}'] / ms['package']:7.3f}   kernel {w} / llama.cpp {r.llama_ratio[w]:.3f}")
    print("read = a plain pass over the same bytes, the faster of 1 and all threads (the bandwidth floor);"
          " x floor = kernel / read;"
          " ratio = kernel (or the row's step) / package")
    for r in results:
        if r.round_trip_ns:
            trips = ", ".join(f"{t:.0f}" for t in r.round_trip_ns)
            print(f"{r.config}: two threads' round trip per round {trips} ns; several times the usual value means "
                  "they ran on two chiplets (or sockets), where the read gets two memory links "
                  "(docs/cpu-step.md, ninth run)")
    if any(r.streams_ratio for r in results):
        print()
        counts = sorted({int(k) for r in results for k in r.streams_ratio})
        head = f"{'config':<10} {'weights':<7} {'K=1 ms':>8} " + " ".join(f"{f'K={k} ms (x)':>16}" for k in counts)
        print(head)
        print("-" * len(head))
        for r in results:
            if not r.streams_ratio:
                continue
            one = r.ms_per_token[f"kernel_{r.target_weights}"]
            cells = [f"{r.ms_per_token[f'streams_{k}']:8.3f} ({r.streams_ratio[str(k)]:4.2f})" for k in counts]
            print(f"{r.config:<10} {r.target_weights:<7} {one:8.3f} " + " ".join(f"{c:>16}" for c in cells))
        print("K streams per step in one call (the weights read once for all K); (x) = K streams / one stream")
    print()
    for r in results:
        agreement = ", ".join(f"{k} {v:.1e}" for k, v in r.agreement.items())
        status = "ok" if r.agrees else f"DISAGREE (> {AGREEMENT_TOLERANCE:g})"
        print(f"{r.config}: logits of the first {AGREEMENT_TOKENS} tokens against the package: {agreement} -> "
              f"{status} (float32 weights must be <= {AGREEMENT_TOLERANCE:g})" + (f"; {r.note}" if r.note else ""))
    for r in results:
        for key, t in r.targets.items():
            verdict = "-" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
            value = "-" if t["value"] is None else f"{t['value']:.3f}"
            print(f"target {r.config} {r.target_weights}: {TARGET_NAMES[key]} {value} <= {t['target']:g}  {verdict}")


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
