"""`rwkv-music bench weights CKPT DATA_DIR`: what reduced-precision weights cost in accuracy.

The compiled CPU step can store its large matrices as fp32, bf16 or int8 (kernels/
weight_formats.py). This feeds held-out real music (a split of a prepared directory, pieces
from BOS, state carried) through the step once per format, token by token as the daemon does,
and reports per format:

  NLL/token       mean negative log-likelihood of the next token (nats)
  dNLL            its change against fp32, in percent, with a 95% interval over tokens
                  (the formats see the same tokens, so the difference is paired)
  logits error    relative error of the logits against fp32 at each token,
                  max |l - l_fp32| / max |l_fp32|: median and worst over tokens

A format may be the default of `[daemon] weights` only if |dNLL| < 0.5 % (ELIGIBLE_NLL_CHANGE).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from kernels.weight_formats import WEIGHT_FORMATS

ELIGIBLE_NLL_CHANGE = 0.005  # |NLL(format) / NLL(fp32) - 1| below this: may be the default
DEFAULT_MAX_TOKENS = 20000

EPILOG = """examples:
  rwkv-music bench weights checkpoints/default.safetensors data/prepared-piano
  rwkv-music bench weights CKPT DATA --split val --max-tokens 50000 --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="accuracy of the CPU step's weight formats (fp32, bf16, int8) on held-out music",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint")
    p.add_argument("data", type=Path, help="a prepared directory (rwkv-music prepare)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="held-out split (default test)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"score whole pieces until this many tokens (default {DEFAULT_MAX_TOKENS}; 0 = all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


@dataclass
class FormatAccuracy:
    weights: str
    bytes_per_token: int
    nll_per_token: float
    nll_change: float  # NLL / NLL(fp32) - 1
    nll_change_ci95: float  # half-width of the 95% interval of nll_change (paired over tokens)
    logits_rel_err_median: float
    logits_rel_err_max: float
    eligible: bool  # |nll_change| < ELIGIBLE_NLL_CHANGE


def score(kernels: dict, pieces: list, progress=None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per format, the NLL of every predicted token and the logits' error against the first
    format's (fp32) at every token. pieces: BOS-prefixed int64 arrays."""
    import torch
    import torch.nn.functional as F

    nll: dict[str, list[float]] = {w: [] for w in kernels}
    err: dict[str, list[float]] = {w: [] for w in kernels}
    reference = next(iter(kernels))
    for piece in pieces:
        ids = torch.as_tensor(piece, dtype=torch.long)
        states = {w: _zero_state(k) for w, k in kernels.items()}
        for t in range(len(piece) - 1):
            target = ids[t + 1: t + 2]
            logits = {}
            for w, kernel in kernels.items():
                shift, wkv = states[w]
                logits[w] = kernel.step(ids[t: t + 1], shift, wkv)
                nll[w].append(float(F.cross_entropy(logits[w], target)))
            ref = logits[reference]
            scale = float(ref.abs().max())
            for w in kernels:
                err[w].append(float((logits[w] - ref).abs().max()) / scale)
        if progress:
            progress(len(nll[reference]))
    return nll, err


def _zero_state(kernel):
    import torch

    d = kernel.dims
    return torch.zeros(d["L"], 2, 1, d["C"]), torch.zeros(d["L"], 1, d["H"], d["N"], d["N"])


def summarise(kernels: dict, nll: dict[str, list[float]], err: dict[str, list[float]]) -> list[FormatAccuracy]:
    reference = next(iter(kernels))
    base = statistics.fmean(nll[reference])
    rows = []
    for w, kernel in kernels.items():
        diffs = [a - b for a, b in zip(nll[w], nll[reference], strict=True)]
        change = statistics.fmean(diffs) / base
        ci = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs)) / base if len(diffs) > 1 else 0.0
        rows.append(FormatAccuracy(
            weights=w, bytes_per_token=kernel.bytes_per_token, nll_per_token=statistics.fmean(nll[w]),
            nll_change=change, nll_change_ci95=ci, logits_rel_err_median=statistics.median(err[w]),
            logits_rel_err_max=max(err[w]), eligible=abs(change) < ELIGIBLE_NLL_CHANGE,
        ))
    return rows


def run(args: argparse.Namespace) -> int:
    from kernels.cpu_step import CpuStepKernel
    from model import load
    from tools.bench import machine_description
    from tools.cli import UserError
    from tools.evaluate import checked_split, pieces_of
    from train.windows import TokenTable

    if args.max_tokens < 0:
        raise UserError("--max-tokens must be >= 0")
    model, meta = load(args.checkpoint)
    shards = checked_split(args.data, args.split, args.checkpoint, meta)
    pieces = pieces_of(shards, args.max_tokens, TokenTable.from_vocab(meta.tokenizer().vocab).bos_id)
    kernels = {w: CpuStepKernel.for_model(model, w) for w in WEIGHT_FORMATS}  # fp32 first: the reference
    if any(k is None for k in kernels.values()):
        raise UserError("the CPU step kernel cannot be built here (see the warning above)")
    nll, err = score(kernels, pieces)
    rows = summarise(kernels, nll, err)
    report = {"machine": machine_description(), "checkpoint": str(args.checkpoint), "model": meta.model_id,
              "split": args.split, "pieces": len(pieces), "tokens": len(nll["fp32"]),
              "eligible_below": ELIGIBLE_NLL_CHANGE, "formats": [asdict(r) for r in rows]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{meta.model_id}: {report['tokens']} tokens of {report['pieces']} pieces, {args.split} split, "
          "fed one token at a time through the CPU step")
    head = (f"{'weights':<8} {'MB/token':>8} {'NLL/token':>10} {'dNLL %':>8} {'(95%)':>8} "
            f"{'logits err median':>17} {'max':>8}  default?")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.weights:<8} {r.bytes_per_token / 1e6:8.2f} {r.nll_per_token:10.5f} {100 * r.nll_change:+8.3f} "
              f"{100 * r.nll_change_ci95:8.3f} {r.logits_rel_err_median:17.1e} {r.logits_rel_err_max:8.1e}  "
              f"{'eligible' if r.eligible else 'no'}")
    print(f"dNLL = NLL / NLL(fp32) - 1; a format may be the default if |dNLL| < {100 * ELIGIBLE_NLL_CHANGE:g} %")
    return 0
