"""Errors of the model package."""


class ModelError(Exception):
    """Base of every error the model package raises on purpose."""


class CheckpointError(ModelError):
    """A checkpoint file is missing, corrupt, or incompatible; `path` names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
