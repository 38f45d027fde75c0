"""Build the WKV-7 CUDA extension on first use, cache it on disk, or say why it cannot be used.

`load_extension()` returns the compiled module, or None when the kernels cannot be used here:
torch without CUDA, no GPU, no nvcc, no ninja, no C++ compiler (on Windows the MSVC environment
is set up automatically, see kernels.msvc_env), or a failed compile. A None comes with one
warning line that says why and that the PyTorch reference path is used instead; the outcome is
kept for the rest of the process, so the warning appears once and a failed build is not retried.

The compiled library lives in a cache folder keyed by everything that changes the binary:

    $RWKV_MUSIC_CACHE/kernels/<key>        (default ~/.cache/rwkv-music, or $XDG_CACHE_HOME/rwkv-music)
    key = rwkv_music_wkv7-torch<version>-cuda<version>-py<version>-<arches>-<source hash>

so a new torch, another GPU or an edited kernel source builds afresh and an unchanged setup
loads the cached build in well under a second. The GPU architectures come from the visible
GPUs (torch.cuda.get_device_capability) unless TORCH_CUDA_ARCH_LIST is set. Setting
RWKV_MUSIC_NO_CUDA_KERNELS=1 turns the kernels off (the reference path runs).

`cuda_status()` explains the outcome in words, for `rwkv-music bench` and troubleshooting.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

EXTENSION_NAME = "rwkv_music_wkv7"
CUDA_DIR = Path(__file__).resolve().parent / "cuda"
SOURCES = ("wkv7_op.cpp", "wkv7_train.cu", "wkv7_step.cu")
HEADERS = ("wkv7.h", "wkv7_device.h")
CACHE_ENV = "RWKV_MUSIC_CACHE"
DISABLE_ENV = "RWKV_MUSIC_NO_CUDA_KERNELS"
ARCH_ENV = "TORCH_CUDA_ARCH_LIST"
FALLBACK = "the PyTorch reference WKV-7 path is used instead"


@dataclass(frozen=True)
class BuildOutcome:
    """What happened when the extension was asked for (once per process)."""

    module: ModuleType | None
    reason: str  # why the kernels are unavailable, or how they were obtained
    build_dir: Path | None = None
    arch_list: str | None = None
    seconds: float = 0.0

    @property
    def available(self) -> bool:
        return self.module is not None


_lock = threading.Lock()
_outcome: BuildOutcome | None = None


def load_extension() -> ModuleType | None:
    """The compiled WKV-7 extension, built on first use; None (with one warning) when unusable."""
    return build_outcome().module


def build_outcome() -> BuildOutcome:
    """The process's one build attempt, made now if it has not been made yet."""
    global _outcome
    with _lock:
        if _outcome is None:
            _outcome = _obtain_extension()
            if _outcome.module is None:
                log.warning("WKV-7 CUDA kernels unavailable: %s; %s", _outcome.reason, FALLBACK)
            else:
                log.info("WKV-7 CUDA kernels ready (%s, arch %s, %.1f s)",
                         _outcome.reason, _outcome.arch_list, _outcome.seconds)
        return _outcome


def cached_outcome() -> BuildOutcome | None:
    """The outcome if the extension was already asked for in this process, else None."""
    return _outcome


def reset() -> None:
    """Forget the outcome, so the next use tries again (after installing a toolkit; tests)."""
    global _outcome
    with _lock:
        _outcome = None


def cuda_status(build: bool = True) -> str:
    """One paragraph on whether the WKV-7 CUDA kernels are in use here, and if not, why.

    With build=False nothing is compiled: an untried process says so.
    """
    outcome = build_outcome() if build else cached_outcome()
    if outcome is None:
        return "WKV-7 CUDA kernels: not requested yet in this process (they are built on first CUDA use)."
    if outcome.module is None:
        return f"WKV-7 CUDA kernels: not in use, {FALLBACK}. Reason: {outcome.reason}."
    head_sizes = ", ".join(str(n) for n in outcome.module.HEAD_SIZES)
    return (f"WKV-7 CUDA kernels: in use ({outcome.reason}; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, arch {outcome.arch_list}; head sizes {head_sizes}; "
            f"cache {outcome.build_dir}).")


# ------------------------------------------------------------------------------------------------
# Pure helpers (tested on any machine)


def parse_torch_arch_list(names: Iterable[str]) -> list[tuple[int, int]]:
    """Compute capabilities from torch.cuda.get_arch_list() names ("sm_86", "sm_90a", "sm_120")."""
    caps = []
    for name in names:
        match = re.fullmatch(r"sm_(\d+)(\d)[a-z]?", name)
        if match:
            caps.append((int(match.group(1)), int(match.group(2))))
    return sorted(set(caps))


def arch_list_for_devices(
    capabilities: Sequence[tuple[int, int]], torch_arches: Sequence[tuple[int, int]]
) -> str:
    """TORCH_CUDA_ARCH_LIST for the given GPUs, e.g. [(8, 6), (8, 9)] -> "8.6;8.9+PTX".

    A GPU newer than anything the installed torch was built for is built for torch's newest
    architecture instead (as torch itself does); "+PTX" on the last entry lets the driver
    compile it for the newer GPU.
    """
    if not capabilities:
        raise ValueError("no GPU capabilities given")
    newest = max(torch_arches) if torch_arches else None
    arches = sorted({min(cap, newest) if newest else tuple(cap) for cap in capabilities})
    names = [f"{major}.{minor}" for major, minor in arches]
    names[-1] += "+PTX"
    return ";".join(names)


def resolve_arch_list(
    env_value: str | None, capabilities: Sequence[tuple[int, int]], torch_arches: Sequence[tuple[int, int]]
) -> str:
    """TORCH_CUDA_ARCH_LIST when the user set it (anything but "" or "native"), else the GPUs'."""
    if env_value and env_value.strip() and env_value.strip() != "native":
        return env_value.strip()
    return arch_list_for_devices(capabilities, torch_arches)


def cache_root(environ: Mapping[str, str]) -> Path:
    """$RWKV_MUSIC_CACHE, else $XDG_CACHE_HOME/rwkv-music, else ~/.cache/rwkv-music."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    base = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "rwkv-music"


def source_digest(paths: Iterable[Path]) -> str:
    """A short hash of the kernel sources' names and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_directory(
    root: Path, arch_list: str, digest: str, torch_version: str, cuda_version: str, python_version: str
) -> Path:
    """The cache folder for one combination of torch, CUDA, Python, architectures and sources."""
    arches = "-".join(
        "sm" + part.replace(".", "").replace("+PTX", "ptx").lower()
        for part in re.split(r"[;\s]+", arch_list.strip()) if part
    )
    key = f"{EXTENSION_NAME}-torch{torch_version}-cuda{cuda_version}-py{python_version}-{arches}-{digest}"
    return root / "kernels" / re.sub(r"[^A-Za-z0-9._-]", "_", key)


def summarize_build_error(text: str, limit: int = 240) -> str:
    """One line out of a compiler log: the first compiler error, else the first non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no error output"
    error_lines = [line for line in lines if re.search(r"\berror\b\s*(\w+\s*)?:", line, re.IGNORECASE)
                   and not line.startswith("Error building extension")]
    line = error_lines[0] if error_lines else lines[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# The build


def _unavailable(reason: str, build_dir: Path | None = None, arch_list: str | None = None) -> BuildOutcome:
    return BuildOutcome(module=None, reason=reason, build_dir=build_dir, arch_list=arch_list)


def _obtain_extension() -> BuildOutcome:
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return _unavailable(f"turned off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}")
    if torch.version.cuda is None:
        return _unavailable(f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
    if not torch.cuda.is_available():
        return _unavailable(f"torch {torch.__version__} finds no usable CUDA GPU or driver")

    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home or "") / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
    if not cuda_home or not nvcc.exists():
        return _unavailable(
            "nvcc (the CUDA toolkit compiler) was not found; install the CUDA toolkit matching "
            f"torch's CUDA {torch.version.cuda} and set CUDA_HOME or put nvcc on PATH")
    if not cpp_extension.is_ninja_available():
        return _unavailable("ninja is not installed (pip install ninja)")
    if sys.platform == "win32" and shutil.which("cl") is None:
        from kernels.errors import MsvcNotFoundError
        from kernels.msvc_env import activate_msvc

        try:
            activate_msvc()
        except MsvcNotFoundError as err:
            return _unavailable(f"no C++ compiler: {err.reason}")

    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    try:
        arch_list = resolve_arch_list(os.environ.get(ARCH_ENV), capabilities,
                                      parse_torch_arch_list(torch.cuda.get_arch_list()))
    except ValueError as err:
        return _unavailable(f"cannot choose GPU architectures ({err})")
    sources = [CUDA_DIR / name for name in SOURCES]
    build_dir = build_directory(
        cache_root(os.environ), arch_list, source_digest(sources + [CUDA_DIR / name for name in HEADERS]),
        torch.__version__, str(torch.version.cuda), f"{sys.version_info.major}{sys.version_info.minor}")
    return compile_extension(sources, build_dir, arch_list)


def compile_extension(sources: Sequence[Path], build_dir: Path, arch_list: str) -> BuildOutcome:
    """Runs torch's extension builder (ninja) on `sources` in build_dir, or loads its earlier
    result; a failure becomes an outcome whose reason is one line, with the full log kept in
    build_dir/build-error.log."""
    from torch.utils import cpp_extension

    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return _unavailable(f"cannot create the kernel cache folder {build_dir} ({err}); set {CACHE_ENV}")
    cached = any(build_dir.glob(f"{EXTENSION_NAME}*.so")) or any(build_dir.glob(f"{EXTENSION_NAME}*.pyd"))
    host_flags = ["/O2"] if sys.platform == "win32" else ["-O3"]
    started = time.monotonic()
    previous_arch_env = os.environ.get(ARCH_ENV)
    os.environ[ARCH_ENV] = arch_list  # torch's builder reads the architectures from here
    try:
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(path) for path in sources],
            extra_include_paths=[str(CUDA_DIR)],
            extra_cflags=host_flags,
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as err:  # the builder raises RuntimeError, OSError, ValueError, ImportError...
        log_path = build_dir / "build-error.log"
        try:
            log_path.write_text(f"{type(err).__name__}: {err}\n", encoding="utf-8")
        except OSError:
            log_path = None
        log.debug("WKV-7 extension build failed", exc_info=True)
        where = f" (full log: {log_path})" if log_path else ""
        return _unavailable(f"compiling the extension failed: {summarize_build_error(str(err))}{where}",
                            build_dir=build_dir, arch_list=arch_list)
    finally:
        if previous_arch_env is None:
            os.environ.pop(ARCH_ENV, None)
        else:
            os.environ[ARCH_ENV] = previous_arch_env
    seconds = time.monotonic() - started
    how = "loaded the cached build" if cached else "compiled"
    return BuildOutcome(module=module, reason=how, build_dir=build_dir, arch_list=arch_list, seconds=seconds)
