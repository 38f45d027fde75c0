"""The RWKV-7 network, its recurrent state, checkpoints, the REMI vocabulary and sampling.

    from model import RWKV7, ModelConfig, State, load, save, CheckpointMeta

Names are imported on first use, so `import model.settings` (the command line's start-up)
does not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "RWKV7": "model.rwkv7", "ModelConfig": "model.rwkv7", "State": "model.rwkv7",
    "CheckpointMeta": "model.checkpoint", "load": "model.checkpoint", "save": "model.checkpoint",
    "read_meta": "model.checkpoint", "CheckpointError": "model.errors", "ModelError": "model.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
