"""Errors of the train package: corpus building, data preparation, shards and training."""

from __future__ import annotations

from pathlib import Path


class TrainError(Exception):
    """Base of every error the train package raises on purpose."""


class MissingExtraError(TrainError):
    """An optional dependency is not installed; `package` names it, `extra` the pip extra."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed: pip install 'rwkv-music[{extra}]'")
        self.package = package
        self.extra = extra


class CorpusError(TrainError):
    """The corpus cannot be built at all (no source corpus, unknown collection); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class PrepareError(TrainError):
    """`rwkv-music prepare` cannot run (no input folder, bad tokenizer config, bad fractions)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ShardError(TrainError):
    """A prepared directory is missing a file or is inconsistent; `path` names what is wrong."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
