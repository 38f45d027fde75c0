"""Conversion to and from BlinkDL's RWKV-7 (x070) `.pth` layout, as read by the `rwkv` package.

The only differences from our state dict are shapes: BlinkDL keeps per-channel vectors as
[1, 1, C]; we keep them as [C]. Names are identical. Import uses torch.load(weights_only=True),
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import atomic_write, config_from_shapes
from model.errors import CheckpointError
from model.rwkv7 import RWKV7

# Per-channel parameters that BlinkDL stores as [1, 1, C].
_CHANNEL_VECTORS = ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
                    "att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "ffn.x_k")


def _is_channel_vector(name: str) -> bool:
    return name.startswith("blocks.") and name.split(".", 2)[2] in _CHANNEL_VECTORS


def to_blinkdl(model: RWKV7) -> dict[str, torch.Tensor]:
    """Our state dict in BlinkDL's x070 layout (float32, contiguous)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("state0."):  # a learned initial state has no place in that layout
            continue
        t = t.detach().float().cpu().contiguous()
        out[name] = t.view(1, 1, -1) if _is_channel_vector(name) else t
    return out


def from_blinkdl(tensors: dict[str, torch.Tensor]) -> RWKV7:
    """An RWKV7 holding the weights of a BlinkDL x070 state dict (config read from shapes)."""
    cfg = config_from_shapes(tensors)
    model = RWKV7(cfg)
    ours = {}
    for name, t in tensors.items():
        ours[name] = t.float().reshape(-1) if _is_channel_vector(name) else t.float()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    # BlinkDL checkpoints may omit layer 0's value-residual LoRA (it is never used there).
    missing = [m for m in missing if not m.startswith("blocks.0.att.v")]
    if missing or unexpected:
        raise CheckpointError("<pth>", f"not an x070 state dict: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def export_pth(model: RWKV7, path: str | Path) -> None:
    """Write a `.pth` that `rwkv.model.RWKV(path_without_suffix, 'cpu fp32')` loads (RWKV_V7_ON=1)."""
    tensors = to_blinkdl(model)
    atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def import_pth(path: str | Path) -> RWKV7:
    """Read a BlinkDL x070 `.pth` safely (weights only) into an RWKV7."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many types for a bad or unsafe pickle
        # torch's message is several lines of advice about weights_only: keep its first line.
        first_line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CheckpointError(str(path), f"cannot read as a weights-only .pth ({first_line})") from err
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(str(path), "expected a dict of tensors")
    return from_blinkdl(tensors)
