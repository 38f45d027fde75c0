"""Checkpoints: one .safetensors file whose header metadata holds JSON about the model.

The JSON (under the metadata key "rwkv_music") carries the model config, the full miditok
tokenizer parameters and their vocabulary hash, the training step, validation loss, creation
time and the weights' own hash (`model_id`). Files are written to a temporary name, fsynced
and renamed, so a reader (the daemon's watcher) never sees half a file. Loading never
unpickles: safetensors is plain tensors plus a JSON header.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from model.errors import CheckpointError
from model.rwkv7 import RWKV7, ModelConfig

FORMAT = "rwkv-music/1"
META_KEY = "rwkv_music"


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself, besides its weights."""

    model_config: ModelConfig
    tokenizer_params: dict[str, Any]
    vocab_hash: str
    step: int = 0
    val_loss: float | None = None
    created: str = ""
    model_id: str = ""  # filled on save and load: a hash of the weights
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the resolved training config

    def tokenizer(self):
        """Rebuild the miditok tokenizer this model was trained with (checks the vocab hash)."""
        from model.vocab import build_tokenizer, vocab_hash

        tok = build_tokenizer(self.tokenizer_params)
        if vocab_hash(tok) != self.vocab_hash:
            raise CheckpointError(
                "<meta>", "tokenizer parameters do not rebuild the recorded vocabulary "
                "(miditok version mismatch?)"
            )
        return tok

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.tokenizer_params,
            "vocab_hash": self.vocab_hash,
            "step": self.step,
            "val_loss": self.val_loss,
            "created": self.created,
            "model_id": self.model_id,
            "extra": self.extra,
        })

    @classmethod
    def from_json(cls, text: str, path: str = "<meta>") -> CheckpointMeta:
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise CheckpointError(path, f"unknown checkpoint format {d.get('format')!r}")
            return cls(
                model_config=ModelConfig.from_dict(d["model_config"]),
                tokenizer_params=d["tokenizer"],
                vocab_hash=d["vocab_hash"],
                step=int(d.get("step", 0)),
                val_loss=d.get("val_loss"),
                created=d.get("created", ""),
                model_id=d.get("model_id", ""),
                extra=d.get("extra", {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(path, f"bad metadata: {err}") from err


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A short stable hash of named tensors (names, dtypes, shapes and bytes), 12 hex digits."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


def atomic_write(path: str | Path, write: Any) -> None:
    """Call write(tmp_path), fsync the result and rename it onto `path` (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(model: RWKV7, path: str | Path, meta: CheckpointMeta,
         state_dict: dict[str, torch.Tensor] | None = None) -> CheckpointMeta:
    """Write `model`'s weights (float32, unwrapped names) and `meta` atomically; returns the meta
    with `model_id` and `created` filled in. `state_dict` replaces the model's own (e.g. the
    gathered full weights of a sharded model)."""
    weights = state_dict if state_dict is not None else unwrap(model).state_dict()
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    meta.model_config = unwrap(model).cfg
    meta.model_id = weights_hash(tensors)
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: meta.to_json()}))
    return meta


def unwrap(model: torch.nn.Module) -> RWKV7:
    """The plain RWKV7 inside DDP/FSDP/compile wrappers (their key prefixes never reach disk)."""
    while not isinstance(model, RWKV7):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not an RWKV7 model: {type(model).__name__}")
        model = inner
    return model


# A safetensors file: 8 bytes of little-endian header length, the JSON header, then the data.
_MAX_HEADER_BYTES = 100_000_000


def _meta_from_header(header: bytes, path: str) -> CheckpointMeta:
    try:
        raw = (json.loads(header).get("__metadata__") or {}).get(META_KEY)
    except (ValueError, AttributeError) as err:  # not JSON, or not an object
        raise CheckpointError(path, f"not a readable safetensors file (bad header: {err})") from err
    if raw is None:
        raise CheckpointError(path, "no rwkv-music metadata in the file header")
    return CheckpointMeta.from_json(raw, path)


def _header_length(prefix: bytes, path: str) -> int:
    if len(prefix) < 8:
        raise CheckpointError(path, "not a readable safetensors file (shorter than its header)")
    n = int.from_bytes(prefix[:8], "little")
    if n > _MAX_HEADER_BYTES:
        raise CheckpointError(path, f"not a readable safetensors file (header of {n} bytes)")
    return n


def read_meta(path: str | Path) -> CheckpointMeta:
    """Only the metadata of a checkpoint (cheap: reads the header)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            n = _header_length(f.read(8), path)
            header = f.read(n)
    except FileNotFoundError as err:
        raise CheckpointError(path, "no such file") from err
    except OSError as err:
        raise CheckpointError(path, f"cannot read it ({err})") from err
    if len(header) < n:
        raise CheckpointError(path, "not a readable safetensors file (truncated header)")
    return _meta_from_header(header, path)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[RWKV7, CheckpointMeta]:
    """Load a checkpoint: (RWKV7 in eval mode on `device`, its CheckpointMeta).

    Refuses (CheckpointError) a missing, truncated or foreign file, weights whose hash differs
    from the one recorded, shapes that do not match the config, and non-finite weights.

    The file is read into memory in one go, not mapped: a file rewritten in place while it is
    mapped (`cp` over it) makes the reader die of SIGBUS, and one read gives header and
    weights of the same version.
    """
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise CheckpointError(path, "no such file") from err
    except OSError as err:
        raise CheckpointError(path, f"cannot read it ({err})") from err
    n = _header_length(data[:8], path)
    if len(data) < 8 + n:
        raise CheckpointError(path, "not a readable safetensors file (truncated header)")
    meta = _meta_from_header(data[8: 8 + n], path)
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(path, f"not a readable safetensors file ({err})") from err
    model_id = weights_hash(tensors)
    if meta.model_id and meta.model_id != model_id:
        raise CheckpointError(path, f"weights hash {model_id} differs from the recorded {meta.model_id}")
    meta.model_id = model_id
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(path, f"non-finite values in {name}")
    cfg = config_from_shapes(tensors, meta.model_config)
    if cfg.vocab_size != meta.model_config.vocab_size:
        raise CheckpointError(path, f"embedding has {cfg.vocab_size} rows, the config says "
                              f"{meta.model_config.vocab_size}")
    meta.model_config = cfg
    model = RWKV7(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(path, f"weights do not fit the model config: {err}") from err
    return model.to(device).eval(), meta


def config_from_shapes(tensors: dict[str, torch.Tensor], base: ModelConfig | None = None) -> ModelConfig:
    """The architecture implied by the tensors: sizes and LoRA ranks are read from shapes."""
    try:
        vocab, C = tensors["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
        H, N = tensors["blocks.0.att.r_k"].shape
        return ModelConfig(
            n_layer=n_layer, n_embd=C, vocab_size=vocab, head_size=N,
            d_decay=tensors["blocks.0.att.w1"].shape[-1], d_aaa=tensors["blocks.0.att.a1"].shape[-1],
            d_mv=tensors["blocks.0.att.v1"].shape[-1], d_gate=tensors["blocks.0.att.g1"].shape[-1],
            ffn_mult=tensors["blocks.0.ffn.key.weight"].shape[0] // C,
            learned_state="state0.wkv" in tensors,
        )
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError("<tensors>", f"not an RWKV-7 tensor set (missing {err})") from err
