"""Styles: tuned checkpoints (`rwkv-music tune`) that a performer switches to by name.

`[daemon] styles_dir` holds them, one `<name>.safetensors` per style; `/rwkv/style <name>` (MQTT
`set/style`) swaps to that file through the daemon's reload path, so a style is validated like
any reload, re-primed from the conversation's tokens and swapped in at the next bar line, and a
file that is refused leaves the current model playing. The name `default` always means the
daemon's configured checkpoint, the way back from any style.

Names are file names without a folder, so a controller on the network can only pick among the
files in styles_dir.
"""

from __future__ import annotations

from pathlib import Path

from daemon.controls import ControlError

SUFFIX = ".safetensors"
DEFAULT_STYLE = "default"  # the configured checkpoint


class StyleLibrary:
    """The styles in one folder, besides the configured checkpoint."""

    def __init__(self, styles_dir: str | Path, default_checkpoint: str | Path):
        self.folder = Path(styles_dir).expanduser()
        self.default_checkpoint = Path(default_checkpoint).expanduser()

    def names(self) -> list[str]:
        """`default` and every style file's name, sorted (read from the folder on each call, so a
        style tuned while the daemon runs is there at once)."""
        try:
            found = sorted(p.stem for p in self.folder.iterdir() if p.suffix == SUFFIX and p.is_file())
        except OSError:  # no folder (yet): only the default
            found = []
        return [DEFAULT_STYLE, *(name for name in found if name != DEFAULT_STYLE)]

    def path_of(self, name: str) -> Path:
        """The checkpoint of style `name`; ControlError naming the styles there are if none."""
        if name == DEFAULT_STYLE:
            return self.default_checkpoint
        path = self.folder / f"{name}{SUFFIX}"
        if not path.is_file():
            raise ControlError(f"no style {name!r} in {self.folder} (styles: {', '.join(self.names())})")
        return path

    def name_of(self, checkpoint: str | Path) -> str:
        """The style a playing checkpoint is: `default`, a style's name, or `custom` (a file
        loaded with /rwkv/reload or seen by the watcher)."""
        path = Path(checkpoint).expanduser().resolve()
        if path == self.default_checkpoint.resolve():
            return DEFAULT_STYLE
        if path.suffix == SUFFIX and path.parent == self.folder.resolve():
            return path.stem
        return "custom"


def check_style_name(value: object) -> str:
    """A style name as sent by a client: a file name without folder, suffix or leading dot."""
    if not isinstance(value, str) or not value:
        raise ControlError("style name must be a non-empty string")
    if len(value) > 128 or "/" in value or "\\" in value or "\x00" in value or value.startswith("."):
        raise ControlError(f"style name {value[:40]!r} must be a file name in styles_dir, without folders")
    return value.removesuffix(SUFFIX)
