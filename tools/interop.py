"""`rwkv-music export` / `rwkv-music import`: BlinkDL's RWKV-7 .pth layout <-> our checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint in BlinkDL's RWKV-7 .pth layout",
        description="Write CKPT's weights as a BlinkDL RWKV-7 (x070) .pth state dict, loadable by "
        "the `rwkv` PyPI package with RWKV_V7_ON=1 (same logits).",
        epilog="example:\n  rwkv-music export checkpoints/default.safetensors default.pth\n"
        "  RWKV_V7_ON=1 python -c \"from rwkv.model import RWKV; RWKV('default', 'cpu fp32')\"",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint")
    p.add_argument("out", type=Path, help="output .pth path")
    p.set_defaults(run=run_export)

    p = sub.add_parser(
        "import",
        help="turn a BlinkDL RWKV-7 .pth into a checkpoint",
        description="Read a BlinkDL RWKV-7 (x070) .pth (weights only, never unpickling code) and "
        "write a .safetensors checkpoint. The .pth holds no tokenizer: the default REMI "
        "vocabulary is assumed unless --tokenizer-config names a JSON file of miditok parameters.",
        epilog="example:\n  rwkv-music import default.pth checkpoints/imported.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pth", type=Path, help="input .pth")
    p.add_argument("out", type=Path, help="output .safetensors path")
    p.add_argument("--tokenizer-config", type=Path, help="JSON file with miditok parameters")
    p.set_defaults(run=run_import)


def run_export(args: argparse.Namespace) -> int:
    from model import load
    from model.interop import export_pth

    model, meta = load(args.checkpoint)
    export_pth(model, args.out)
    print(f"wrote {args.out} (model {meta.model_id}, {model.num_params():,} parameters)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from model import CheckpointMeta, save
    from model.interop import import_pth
    from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
    from tools.cli import UserError

    params = DEFAULT_TOKENIZER_PARAMS
    if args.tokenizer_config:
        params = json.loads(args.tokenizer_config.read_text())
    tokenizer = build_tokenizer(params)
    model = import_pth(args.pth)
    if len(tokenizer) != model.cfg.vocab_size:
        raise UserError(
            f"{args.pth}: the model has {model.cfg.vocab_size} tokens, the tokenizer {len(tokenizer)}; "
            "pass the right --tokenizer-config"
        )
    meta = save(model, args.out, CheckpointMeta(model.cfg, params, vocab_hash(tokenizer),
                                                extra={"imported_from": args.pth.name}))
    print(f"wrote {args.out} (model {meta.model_id})")
    return 0
