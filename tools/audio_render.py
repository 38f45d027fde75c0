"""MIDI -> WAV with the fluidsynth program and a General MIDI soundfont.

Nothing here is needed to make music with the model; it only lets a completion be heard
without a DAW. `FluidsynthRenderer.locate()` finds both pieces up front (so a command can
refuse before it spends time generating) and says exactly what is missing and how to get it.

Soundfont search order: an explicit path (the --soundfont option), the RWKV_MUSIC_SOUNDFONT
environment variable, then the usual system folders (Debian's fluid-soundfont-gm and
timgm6mb-soundfont packages install into /usr/share/sounds/sf2). An explicit path or the
variable that names a missing file is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tools.cli import UserError

log = logging.getLogger(__name__)

SOUNDFONT_ENV = "RWKV_MUSIC_SOUNDFONT"
SOUNDFONT_DIRS = (Path("/usr/share/sounds/sf2"), Path("/usr/share/soundfonts"), Path("/usr/share/sounds/sf3"))
# Preferred files in those folders (the distributions' default GM link first); any other
# .sf2/.sf3 file there is taken after these, in name order.
PREFERRED_SOUNDFONTS = ("default-GM.sf2", "default-GM.sf3", "FluidR3_GM.sf2", "FluidR3_GM.sf3", "TimGM6mb.sf2")
SOUNDFONT_SUFFIXES = (".sf2", ".sf3")
# fluidsynth renders far faster than real time; this only stops a wedged process.
RENDER_TIMEOUT_S = 300.0
INSTALL_HINT = "install it (Debian/Ubuntu: apt install fluidsynth; macOS: brew install fluid-synth)"
SOUNDFONT_HINT = (f"pass --soundfont FILE.sf2, set {SOUNDFONT_ENV}, or install one "
                  "(Debian/Ubuntu: apt install fluid-soundfont-gm)")


class AudioRenderError(UserError):
    """WAV rendering is impossible or failed; the message says why and what to do."""


class FluidsynthNotFoundError(AudioRenderError):
    """No fluidsynth program on the search path (`search_path`, as PATH spells it)."""

    def __init__(self, search_path: str):
        super().__init__(f"--wav needs the fluidsynth program, which is not on PATH: {INSTALL_HINT}")
        self.search_path = search_path


class SoundfontNotFoundError(AudioRenderError):
    """No usable soundfont: `requested` names the file asked for (None: searched `searched`)."""

    def __init__(self, requested: Path | None, source: str, searched: tuple[Path, ...] = ()):
        if requested is not None:
            message = f"soundfont {requested} (from {source}) does not exist or is not a file"
        else:
            folders = ", ".join(str(d) for d in searched)
            message = f"--wav needs a General MIDI soundfont and none was found in {folders}: {SOUNDFONT_HINT}"
        super().__init__(message)
        self.requested = requested
        self.source = source
        self.searched = searched


class RenderFailedError(AudioRenderError):
    """fluidsynth ran but produced no audio; `detail` is the end of what it printed."""

    def __init__(self, wav_path: Path, detail: str):
        super().__init__(f"fluidsynth did not write {wav_path}: {detail or 'no output'}")
        self.wav_path = wav_path
        self.detail = detail


def find_fluidsynth(search_path: str | None = None) -> Path:
    """The fluidsynth program on `search_path` (default: PATH); FluidsynthNotFoundError if none."""
    search_path = os.environ.get("PATH", os.defpath) if search_path is None else search_path
    found = shutil.which("fluidsynth", path=search_path)
    if found is None:
        raise FluidsynthNotFoundError(search_path)
    return Path(found)


def find_soundfont(explicit: Path | str | None = None, *, environ: Mapping[str, str] | None = None,
                   folders: tuple[Path, ...] = SOUNDFONT_DIRS) -> Path:
    """The soundfont to use: `explicit`, else $RWKV_MUSIC_SOUNDFONT, else the first in `folders`."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        return _existing_soundfont(Path(explicit), "--soundfont")
    if environ.get(SOUNDFONT_ENV):
        return _existing_soundfont(Path(environ[SOUNDFONT_ENV]), SOUNDFONT_ENV)
    for folder in folders:
        if not folder.is_dir():
            continue
        for name in PREFERRED_SOUNDFONTS:
            if (folder / name).is_file():  # follows the alternatives symlink; a dangling one is skipped
                return folder / name
        others = sorted(p for p in folder.iterdir() if p.suffix.lower() in SOUNDFONT_SUFFIXES and p.is_file())
        if others:
            return others[0]
    raise SoundfontNotFoundError(None, "search", folders)


def _existing_soundfont(path: Path, source: str) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise SoundfontNotFoundError(path, source)
    return path


@dataclass(frozen=True)
class FluidsynthRenderer:
    """A fluidsynth program and a soundfont that were found; renders MIDI files offline."""

    program: Path
    soundfont: Path
    sample_rate: int = 44100
    gain: float = 0.5  # fluidsynth's default 0.2 is quiet; 0.5 leaves room for dense chords

    @classmethod
    def locate(cls, soundfont: Path | str | None = None, *, search_path: str | None = None,
               environ: Mapping[str, str] | None = None) -> FluidsynthRenderer:
        """Find the program and a soundfont now; AudioRenderError (one clear line) if either is missing."""
        return cls(find_fluidsynth(search_path), find_soundfont(soundfont, environ=environ))

    def render(self, midi_path: Path | str, wav_path: Path | str) -> Path:
        """Render a MIDI file to a 16-bit WAV at `sample_rate`; returns `wav_path`."""
        midi_path, wav_path = Path(midi_path), Path(wav_path)
        wav_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = wav_path.with_name(f".{wav_path.name}.{os.getpid()}.tmp.wav")
        command = [str(self.program), "-n", "-i", "-q", "-T", "wav", "-O", "s16",
                   "-r", str(self.sample_rate), "-g", str(self.gain), "-F", str(tmp),
                   str(self.soundfont), str(midi_path)]
        log.debug("render: %s", " ".join(command))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as err:
            tmp.unlink(missing_ok=True)
            raise RenderFailedError(wav_path, f"no result after {RENDER_TIMEOUT_S:.0f} s") from err
        except OSError as err:
            raise RenderFailedError(wav_path, str(err)) from err
        detail = " ".join((done.stderr + done.stdout).split())[-300:]
        if done.returncode != 0 or not _is_wav_with_audio(tmp):
            tmp.unlink(missing_ok=True)
            raise RenderFailedError(wav_path, detail)
        os.replace(tmp, wav_path)
        return wav_path

    def render_score(self, score, wav_path: Path | str) -> Path:
        """Render a symusic Score (written to a temporary MIDI file first); returns `wav_path`."""
        with tempfile.TemporaryDirectory(prefix="rwkv-music-render-") as folder:
            midi_path = Path(folder) / "render.mid"
            score.dump_midi(str(midi_path))
            return self.render(midi_path, wav_path)


def _is_wav_with_audio(path: Path) -> bool:
    try:
        with wave.open(str(path), "rb") as wav:
            return wav.getnframes() > 0
    except (OSError, EOFError, wave.Error):
        return False
