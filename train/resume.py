"""Exact-resume files: model, optimizer, RNG, data position and carried states in one
safetensors file (no pickle), written atomically next to the run's checkpoints.

Layout: tensors `model.<name>`, `opt.<param index>.<key>`, `rng.torch`, `rng.cuda`,
`carry.shift`, `carry.wkv`; header metadata "resume" = JSON with the step, the optimizer's
param groups, the window sampler's state and the trainer's counters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.checkpoint import atomic_write
from train.errors import TrainError


def optimizer_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer state dict into named tensors and JSON-able param groups.

    Works for both key styles: parameter indices (plain optimizers) and parameter names
    (torch.distributed's full state dicts under FSDP)."""
    tensors = {}
    for param, per_param in sd["state"].items():
        for key, value in per_param.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"opt.{param}.{key}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    """The inverse of optimizer_to_tensors: an optimizer state dict."""
    state: dict = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            param, key = name[4:].rsplit(".", 1)
            state.setdefault(int(param) if param.isdigit() else param, {})[key] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_resume(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"resume": json.dumps(info)}))


def load_resume(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})["resume"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as err:
        raise TrainError(f"{path}: no resume file; start without --resume") from err
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise TrainError(f"{path}: unreadable resume file ({err})") from err
    return tensors, info
