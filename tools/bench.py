"""`rwkv-music bench ...`: benchmarks. Each target lives in its own module with `register(sub)`.

Figures are reported as ratios measured side by side in one run; absolute times come with the
machine they were taken on (`machine_description()`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform

BENCH_MODULES = ["tools.bench_step", "tools.bench_phases", "tools.bench_weights", "tools.bench_train",
                 "tools.bench_daemon", "tools.soak"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (step latency, its phases, weight formats, training throughput, daemon timing, soak)",
        description="Benchmarks. Speed targets live here, not in unit tests.",
        epilog="examples:\n  rwkv-music bench step\n  rwkv-music bench step --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    targets = p.add_subparsers(title="targets", metavar="TARGET")
    for module in BENCH_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(targets)
    p.set_defaults(run=lambda args: p.print_help() or 2)


def machine_description() -> str:
    """A one-line description of this machine for reports (CPU model, cores, torch threads)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # no /proc (not Linux): keep the platform's name for the CPU
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"
