"""Set up the Microsoft C++ compiler environment on Windows, so nvcc and the torch extension
builder find cl.exe without the user opening a "Developer Command Prompt".

The route: vswhere.exe (shipped with the Visual Studio Installer, at a fixed place) lists the
installations that have the x64 C++ tools -> pick the newest release one that has
VC\\Auxiliary\\Build\\vcvars64.bat -> run it under cmd.exe followed by `set` -> merge the variables
it changed (PATH, INCLUDE, LIB, ...) into os.environ.

Everything that reads tool output is a pure function (parse_vswhere_output, choose_installation,
parse_set_output, environment_changes), tested on any OS with recorded output; only
activate_msvc runs programs.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import subprocess
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import PureWindowsPath

from kernels.errors import MsvcNotFoundError

log = logging.getLogger(__name__)

# Installations must have the x64 C++ compiler (the "Desktop development with C++" workload,
# or the Build Tools' "C++ build tools").
VC_TOOLS_COMPONENT = "Microsoft.VisualStudio.Component.VC.Tools.x86.x64"
# Printed between vcvars64.bat's own output and `set`'s, so the parser knows where the
# environment listing starts.
ENV_MARKER = "__RWKV_MUSIC_MSVC_ENV__"


@dataclass(frozen=True)
class VsInstallation:
    """One Visual Studio (or Build Tools) installation as vswhere reports it."""

    path: PureWindowsPath  # installationPath
    version: str  # installationVersion, e.g. "17.8.34330.188"
    display_name: str = ""
    prerelease: bool = False

    @property
    def version_key(self) -> tuple[int, ...]:
        """The version as numbers, for sorting ("17.10" after "17.9")."""
        parts = []
        for part in self.version.split("."):
            digits = "".join(ch for ch in part if ch.isdigit())
            parts.append(int(digits) if digits else 0)
        return tuple(parts)

    @property
    def vcvars64(self) -> PureWindowsPath:
        return vcvars64_path(self.path)


def vswhere_path(environ: Mapping[str, str]) -> PureWindowsPath:
    """Where the Visual Studio Installer puts vswhere.exe (a location Microsoft keeps fixed)."""
    program_files_x86 = _lookup(environ, "ProgramFiles(x86)") or r"C:\Program Files (x86)"
    return PureWindowsPath(program_files_x86) / "Microsoft Visual Studio" / "Installer" / "vswhere.exe"


def vswhere_command(vswhere: PureWindowsPath) -> list[str]:
    """vswhere arguments: every product (Build Tools too), previews included, JSON in UTF-8."""
    return [str(vswhere), "-products", "*", "-prerelease", "-requires", VC_TOOLS_COMPONENT,
            "-format", "json", "-utf8", "-nologo"]


def vcvars64_path(installation_path: PureWindowsPath) -> PureWindowsPath:
    return PureWindowsPath(installation_path) / "VC" / "Auxiliary" / "Build" / "vcvars64.bat"


def _as_bool(value: object) -> bool:
    # JSON output has true/false; the text format prints 1/0.
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes")


def _installation(fields: Mapping[str, object]) -> VsInstallation | None:
    path = fields.get("installationPath")
    if not path:
        return None
    return VsInstallation(
        path=PureWindowsPath(str(path)),
        version=str(fields.get("installationVersion", "")),
        display_name=str(fields.get("displayName", "")),
        prerelease=_as_bool(fields.get("isPrerelease", False)),
    )


def parse_vswhere_json(text: str) -> list[VsInstallation]:
    """Installations from `vswhere -format json` output (a JSON array of objects)."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise MsvcNotFoundError(f"vswhere printed something that is not JSON ({err})") from err
    if not isinstance(entries, list):
        raise MsvcNotFoundError("vswhere's JSON output is not a list of installations")
    found = (_installation(entry) for entry in entries if isinstance(entry, dict))
    return [inst for inst in found if inst is not None]


def parse_vswhere_text(text: str) -> list[VsInstallation]:
    """Installations from vswhere's default text output: "key: value" lines, one block per
    installation, each block starting with instanceId. A logo header, if any, is skipped."""
    blocks: list[dict[str, str]] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or " " in key.strip() or not key.strip():
            continue  # logo lines, blank lines
        key = key.strip()
        if key == "instanceId" or not blocks:
            blocks.append({})
        blocks[-1][key] = value.strip()
    found = (_installation(block) for block in blocks)
    return [inst for inst in found if inst is not None]


def parse_vswhere_output(text: str) -> list[VsInstallation]:
    """Installations from vswhere output in either format."""
    if text.lstrip().startswith("["):
        return parse_vswhere_json(text)
    return parse_vswhere_text(text)


def choose_installation(
    installations: list[VsInstallation], has_vcvars: Callable[[PureWindowsPath], bool]
) -> VsInstallation | None:
    """The newest release installation with vcvars64.bat; a preview only if nothing else has one."""
    ranked = sorted(installations, key=lambda inst: (not inst.prerelease, inst.version_key), reverse=True)
    for inst in ranked:
        if has_vcvars(inst.vcvars64):
            return inst
    return None


def parse_set_output(text: str, marker: str = ENV_MARKER) -> dict[str, str]:
    """Variables from cmd.exe's `set` listing ("NAME=value" lines).

    When `marker` appears on a line of its own, only what follows it is read (what came before
    is vcvars64.bat's banner). Lines without a name (no "=", or cmd's hidden "=C:=C:\\" kind)
    are skipped; a value keeps any "=" it contains.
    """
    lines = text.splitlines()
    stripped = [line.strip() for line in lines]
    if marker in stripped:
        lines = lines[stripped.index(marker) + 1:]
    env: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name and not name.startswith(" "):
            env[name] = value
    return env


def environment_changes(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, str]:
    """Variables that `after` adds or changes relative to `before`.

    Windows variable names are case-insensitive ("Path" and "PATH" are one variable), so names
    are compared upper-cased; the result uses the spelling from `after`.
    """
    old = {name.upper(): value for name, value in before.items()}
    return {name: value for name, value in after.items() if old.get(name.upper()) != value}


def _console_encoding() -> str:
    # cmd.exe writes `set` in the OEM code page; the "oem" codec exists on Windows only.
    try:
        codecs.lookup("oem")
    except LookupError:
        return "utf-8"
    return "oem"


def _run(command: list[str] | str, encoding: str = "utf-8") -> str:
    """Runs a program and returns its standard output; a failure raises MsvcNotFoundError."""
    program = command if isinstance(command, str) else command[0]
    try:
        done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MsvcNotFoundError(f"running {program} failed: {err}") from err
    out = done.stdout.decode(encoding, errors="replace")
    if done.returncode != 0:
        err_text = done.stderr.decode(encoding, errors="replace")
        lines = out.strip().splitlines() or err_text.strip().splitlines() or ["no output"]
        raise MsvcNotFoundError(f"{program} exited with {done.returncode}: {lines[-1]}")
    return out


def vcvars_command(vcvars: PureWindowsPath) -> str:
    """The cmd.exe command line that runs vcvars64.bat, prints the marker, then the environment.

    /s makes cmd strip exactly the outer quotes, so the quoted .bat path (with spaces) survives.
    """
    return f'cmd.exe /d /s /c ""{vcvars}" && echo {ENV_MARKER} && set"'


def activate_msvc(
    environ: MutableMapping[str, str] | None = None,
    run: Callable[[list[str] | str, str], str] = _run,
    exists: Callable[[PureWindowsPath], bool] = lambda path: os.path.exists(str(path)),
) -> dict[str, str]:
    """Finds Visual Studio's x64 C++ tools and merges their environment into `environ`
    (os.environ by default). Returns the variables it set.

    Raises MsvcNotFoundError, whose reason says what is missing and what to install.
    """
    environ = os.environ if environ is None else environ
    vswhere = vswhere_path(environ)
    if not exists(vswhere):
        raise MsvcNotFoundError(
            f"cl.exe is not on PATH and the Visual Studio Installer's vswhere.exe is not at {vswhere}; "
            "install Visual Studio 2022 or its Build Tools with the 'Desktop development with C++' workload")
    installations = parse_vswhere_output(run(vswhere_command(vswhere), "utf-8"))
    chosen = choose_installation(installations, exists)
    if chosen is None:
        raise MsvcNotFoundError(
            "no Visual Studio installation with the x64 C++ tools (vcvars64.bat) was found; add the "
            "'Desktop development with C++' workload in the Visual Studio Installer")
    log.info("setting up the C++ compiler from %s (%s)", chosen.display_name or chosen.path, chosen.version)

    output = run(vcvars_command(chosen.vcvars64), _console_encoding())
    if ENV_MARKER not in output:
        last = (output.strip().splitlines() or ["no output"])[-1]
        raise MsvcNotFoundError(f"{chosen.vcvars64} did not finish: {last}")
    changes = environment_changes(environ, parse_set_output(output))
    environ.update(changes)
    if find_on_path("cl.exe", _lookup(environ, "PATH"), exists) is None:
        raise MsvcNotFoundError(f"{chosen.vcvars64} ran but cl.exe is still not on PATH")
    return changes


def find_on_path(
    program: str, path: str, exists: Callable[[PureWindowsPath], bool]
) -> PureWindowsPath | None:
    """The first `program` in a Windows PATH value (";"-separated), or None."""
    for entry in path.split(";"):
        if entry.strip():
            candidate = PureWindowsPath(entry.strip().strip('"')) / program
            if exists(candidate):
                return candidate
    return None


def _lookup(environ: Mapping[str, str], name: str) -> str:
    # Windows variable names are case-insensitive; a plain dict (tests) is not.
    return next((value for key, value in environ.items() if key.upper() == name.upper()), "")
