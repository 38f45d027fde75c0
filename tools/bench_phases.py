"""`rwkv-music bench phases`: where one token's time goes in the compiled CPU step, phase by phase.

A token is a fixed list of phases (kernels/cpu/rwkv7_step.c): per layer ln1 (with the six
token-shift mixes), proj (r, k, v and the four LoRAs, each whole on one thread with its
activations), heads (value residual, kk, the WKV-7 update, GroupNorm, bonus, gate), out (the
output projection), ln2 (with its mix), ffn_key, ffn_value; then ln_out and the head. This
builds the kernel once more with -DRWKV7_PROFILE (its own cached library: two clock reads a
chunk), steps a random model of each size with K streams at a time, and prints per kind of
phase, summed over the layers:

  ms/token  wall time of those phases in one token (each from the end of the phase before,
            so handing a phase over between threads is counted in it)
  share     of the whole call; "outside the phases" is the rest (the Python side of the
            call, starting the helpers). The tokens run inside `kernel.weights_fixed()`, as
            the engine runs an answer; --check-every-token checks the parameters on each
  busy      time spent inside its chunks, summed over threads (2 x wall: both always busy)
  MB        weight bytes it reads per token in this format
  GB/s      MB / wall, to hold against the read pass printed below the table (the floor)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field

from kernels.weight_formats import DEFAULT_WEIGHTS, WEIGHT_FORMATS

DEFAULT_CONFIGS = "L12-D512"
WARMUP_TOKENS = 20
# The matrices each kind of phase reads (names of the kernel's layout table).
PHASE_MATRICES = {
    "proj": ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.w1", "att.a1", "att.v1", "att.g1",
             "att.w2", "att.a2", "att.v2", "att.g2"),
    "out": ("att.output.weight",),
    "ffn_key": ("ffn.key.weight",),
    "ffn_value": ("ffn.value.weight",),
    "head": ("head.weight",),
}

EPILOG = """examples:
  rwkv-music bench phases
  rwkv-music bench phases --configs L6-D256,L12-D512 --streams 1,4
  rwkv-music bench phases --weights fp32 --threads 1
  rwkv-music bench phases --check-every-token    # what the per-token parameter check costs
  rwkv-music bench phases --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phases",
        help="where a token's time goes in the CPU step, phase by phase",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated LAYERS-DIM sizes such as L6-D256 (default {DEFAULT_CONFIGS})")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, choices=tuple(WEIGHT_FORMATS),
                   help=f"storage of the matrices (default {DEFAULT_WEIGHTS}, as [daemon] weights)")
    p.add_argument("--streams", default="1,4", help="comma-separated stream counts K per step (default 1,4)")
    p.add_argument("--tokens", type=int, default=300, help="tokens timed per configuration (default 300)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads of the step, the calling one included (default torch's thread count)")
    p.add_argument("--check-every-token", dest="fixed", action="store_false",
                   help="check the parameters on every token, as a bare kernel.step does (default: "
                        "once, inside weights_fixed, as the engine samples an answer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=run)


@dataclass
class PhaseRow:
    phase: str
    ms: float  # wall per token
    share: float  # of the whole call
    busy_ms: float  # summed over threads, per token
    mb: float  # weight bytes read per token
    gb_per_s: float | None


@dataclass
class PhaseReport:
    config: str
    weights: str
    streams: int
    threads: int
    call_ms: float  # the whole kernel.step call per token
    read_ms: float  # a read pass over the same bytes (the floor)
    mb_per_token: float
    rows: list[PhaseRow] = field(default_factory=list)


def phase_megabytes(stored_bytes: dict[str, int]) -> dict[str, float]:
    """Weight bytes each kind of phase reads per token (MB), from the kernel's own account of
    its parameters (`CpuStepKernel.stored_bytes`)."""
    return {phase: sum(stored_bytes[name] for name in names) / 1e6 for phase, names in PHASE_MATRICES.items()}


def measure(name: str, n_layer: int, n_embd: int, streams: int, args: argparse.Namespace) -> PhaseReport:
    import torch

    from kernels.cpu_step import CpuStepKernel, load_library
    from kernels.huge_pages import huge_page_floats
    from tools.bench_step import random_model

    model = random_model(n_layer, n_embd, args.seed)
    kernel = CpuStepKernel(load_library(profile=True), model, args.weights)
    threads = args.threads or max(1, torch.get_num_threads())
    dims = kernel.dims
    state = model.init_state(streams)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, dims["V"], (WARMUP_TOKENS + args.tokens, streams), generator=gen)
    for t in range(WARMUP_TOKENS):
        kernel.step(ids[t], state.shift, state.wkv, threads=threads)
    kernel.library.phase_times()  # start from zero
    start = time.perf_counter()
    with kernel.weights_fixed() if args.fixed else contextlib.nullcontext():
        for t in range(WARMUP_TOKENS, WARMUP_TOKENS + args.tokens):
            kernel.step(ids[t], state.shift, state.wkv, threads=threads)
    call_s = (time.perf_counter() - start) / args.tokens
    phases = kernel.library.phase_times()
    buffer = huge_page_floats(kernel.bytes_per_token // 4)  # on 2 MB pages, as the packed weights are
    kernel.read_pass(buffer, threads=threads)
    start = time.perf_counter()
    for _ in range(args.tokens):
        kernel.read_pass(buffer, threads=threads)
    read_s = (time.perf_counter() - start) / args.tokens

    report = PhaseReport(name, args.weights, streams, threads, call_s * 1e3, read_s * 1e3,
                         kernel.bytes_per_token / 1e6)
    megabytes = phase_megabytes(kernel.stored_bytes)
    inside = 0.0
    for phase, (wall, busy) in phases.items():
        ms = wall / args.tokens * 1e3
        inside += ms
        mb = megabytes.get(phase, 0.0)
        report.rows.append(PhaseRow(phase, ms, ms / report.call_ms, busy / args.tokens * 1e3, mb,
                                    mb / ms if mb and ms else None))
    outside = report.call_ms - inside
    report.rows.append(PhaseRow("outside the phases", outside, outside / report.call_ms, 0.0, 0.0, None))
    return report


def print_report(report: PhaseReport) -> None:
    print(f"\n{report.config} {report.weights}, K = {report.streams} stream(s), {report.threads} thread(s): "
          f"{report.call_ms:.3f} ms a token, {report.mb_per_token:.1f} MB; read pass {report.read_ms:.3f} ms "
          f"({report.mb_per_token / report.read_ms:.1f} GB/s)")
    print(f"{'phase':<20} {'ms/token':>9} {'share':>6} {'busy ms':>8} {'MB':>7} {'GB/s':>6}")
    print("-" * 61)
    for row in report.rows:
        gbs = f"{row.gb_per_s:6.1f}" if row.gb_per_s else f"{'':>6}"
        mb = f"{row.mb:7.1f}" if row.mb else f"{'':>7}"
        busy = f"{row.busy_ms:8.3f}" if row.busy_ms else f"{'':>8}"
        print(f"{row.phase:<20} {row.ms:9.3f} {row.share:6.1%} {busy} {mb} {gbs}")


def run(args: argparse.Namespace) -> int:
    from kernels.cpu_step import CpuStepUnavailableError
    from tools.bench import machine_description
    from tools.bench_step import parse_configs
    from tools.cli import UserError

    if args.tokens < 1 or args.threads < 0:
        raise UserError("--tokens must be >= 1 and --threads >= 0")
    configs = parse_configs(args.configs)
    try:
        streams = sorted({int(k) for k in args.streams.split(",") if k.strip()})
    except ValueError as err:
        raise UserError(f"--streams: {args.streams!r} is not a list of stream counts such as 1,4") from err
    if not streams or streams[0] < 1 or streams[-1] > 64:
        raise UserError("--streams: counts must be 1..64")
    try:
        reports = [measure(name, n_layer, n_embd, k, args) for name, n_layer, n_embd in configs for k in streams]
    except CpuStepUnavailableError as err:
        raise UserError(str(err)) from err
    if args.json:
        print(json.dumps({"machine": machine_description(), "reports": [asdict(r) for r in reports]}, indent=2))
        return 0
    print(f"machine: {machine_description()}")
    for report in reports:
        print_report(report)
    return 0
