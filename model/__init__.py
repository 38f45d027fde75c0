"""The RWKV-7 network, its recurrent state, checkpoints, the REMI vocabulary and sampling.

    from model import RWKV7, ModelConfig, State, load, save, CheckpointMeta
"""

from model.checkpoint import CheckpointMeta, load, read_meta, save
from model.errors import CheckpointError, ModelError
from model.rwkv7 import RWKV7, ModelConfig, State

__all__ = ["RWKV7", "ModelConfig", "State", "CheckpointMeta", "load", "save", "read_meta",
           "CheckpointError", "ModelError"]
