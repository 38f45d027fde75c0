"""The learned CC bindings: a small JSON file of the user's, read at start, written on each change.

MIDI learn (`/rwkv/learn`) and `/rwkv/unlearn` change the daemon's CC map live; this file keeps
those changes so a learned map survives a restart. It holds only what was learned or unlearned,
over `[cc]` in config.toml: a target bound here wins over the config, a target set to null here
stays unmapped although the config maps it.

    {"version": 1, "bindings": {"top_p": {"cc": 21, "channel": 1}, "temperature": null}}

Written to a temporary file beside it and renamed into place, so a crash never leaves half a
file. A file that is not this format is an error at start that names the file (it is the
user's: the daemon does not overwrite what it cannot read).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from daemon.cc_map import CcBinding
from daemon.controls import CC_TARGETS
from model.settings import ConfigError

FORMAT_VERSION = 1


def learned_path(setting: str) -> Path | None:
    """`[cc] learn_file` as a path (~ expanded); None when learning is not kept."""
    return Path(setting).expanduser() if setting else None


def read_learned(path: Path | None) -> dict[str, CcBinding | None]:
    """Target -> binding (None: unmapped on purpose) from `path`; {} when there is no such file.

    Raises ConfigError naming the file when it cannot be read as a learned map."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"expected a JSON object with version {FORMAT_VERSION}")
        bindings = data.get("bindings", {})
        if not isinstance(bindings, dict):
            raise ValueError('"bindings" must be an object')
        learned: dict[str, CcBinding | None] = {}
        for target, value in bindings.items():
            if target not in CC_TARGETS:
                raise ValueError(f"unknown target {target!r}")
            learned[target] = None if value is None else CcBinding.from_json(value)
        return learned
    except (OSError, ValueError) as err:
        raise ConfigError(f"cc.learn_file {path}: {err} (fix or remove the file)") from err


def write_learned(path: Path, learned: dict[str, CcBinding | None]) -> None:
    """Write the learned map atomically (temporary file, then rename). Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "version": FORMAT_VERSION,
        "bindings": {t: None if b is None else b.to_json() for t, b in learned.items()},
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
