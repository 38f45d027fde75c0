"""The fused CPU single-token step: build kernels/cpu/rwkv7_step.c on first use, load, call.

`CpuStepKernel.for_model(model, weights)` returns a kernel that runs one token of an RWKV7 for
B streams in one C call (`kernel.step(idx, shift, wkv) -> logits`), or None with one warning
line when it cannot be used here (no C compiler, a failed build, a model that is not float32
on the CPU); the caller then keeps the PyTorch step. `cpu_step_kernel(model, weights)` does the
same once per model and weight format and remembers the answer, for `RWKV7.step` to route
through.

`weights` is how the matrices (r, k, v, output, the LoRA, FFN, head: 99.7 % of the float32 bytes a
token reads) are stored for the kernel: "fp32" reads the model's own parameters in place by address;
"bf16" and "int8" (one float32 scale per row) read packed copies made from them, a half or a
quarter of the bytes. Everything else stays float32 and every sum accumulates in float32.
The address table (and the packed copies) are rebuilt when a parameter's storage moves, and
for packed formats also when a packed matrix is changed in place (its version counter):
checked on every call, so the kernel always runs the model's current weights. The recurrent
state tensors are updated in place.

The library is compiled with the system C compiler (`cc`, or $RWKV_MUSIC_CC) and cached:

    $RWKV_MUSIC_CACHE/cpu/rwkv7_step-<key>.so   (default ~/.cache/rwkv-music, or $XDG_CACHE_HOME/rwkv-music)
    key = hash of the C source, the compiler command, the flags and the CPU's feature flags

Flags: -O3 -march=native (the vector units of this CPU: AVX-512, AVX2+FMA, else portable
code) and -pthread. Threads: the caller plus helpers, at most torch.get_num_threads(); by
default each call runs on one thread or on all of them, whichever has been faster lately
(`ThreadTimes`: on a machine whose other cores are busy, helpers that get descheduled make
two threads slower than one). The result is bitwise the same either way. Never
-ffast-math: the step must agree with the PyTorch step to 1e-5. RWKV_MUSIC_NO_CPU_STEP=1 makes
`cpu_step_kernel` answer None (the PyTorch step).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kernels import huge_pages
from kernels.errors import KernelError
from kernels.weight_formats import WEIGHT_FORMATS, PackedMatrix, check_format, pack

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "cpu" / "rwkv7_step.c"
COMPILER_ENV = "RWKV_MUSIC_CC"
CACHE_ENV = "RWKV_MUSIC_CACHE"
DISABLE_ENV = "RWKV_MUSIC_NO_CPU_STEP"
FALLBACK = "the PyTorch step is used instead"
# Tried in order, the first that compiles wins: a compiler without -march=native (or without
# -pthread) still gives a working, slower library.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-pthread"),
    ("-O3", "-pthread"),
    ("-O3",),
)
COMPILE_TIMEOUT_S = 120
READ_CHUNK_FLOATS = 16384  # ROW_CHUNK_FLOATS in rwkv7_step.c: chunk of rwkv7_read_pass


class CpuStepUnavailableError(KernelError):
    """The CPU step kernel cannot be used: no compiler, a failed build, an unsupported model."""

    def __init__(self, reason: str):
        super().__init__(f"CPU step kernel unavailable: {reason}")
        self.reason = reason


class CpuStepInputError(KernelError, ValueError):
    """`CpuStepKernel.step` got token ids or state tensors that do not fit the model."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"CPU step: {what}: {reason}")
        self.what = what
        self.reason = reason


# ------------------------------------------------------------------------------- the library


@dataclass(frozen=True)
class CpuStepLibrary:
    """A loaded build of rwkv7_step.c and what it was built with."""

    path: Path
    cdll: ctypes.CDLL
    flags: tuple[str, ...]
    simd: str  # "avx512", "avx2" or "scalar": the vector code compiled in
    threads: bool  # helper threads compiled in (POSIX threads)
    global_params: tuple[tuple[str, tuple[str, ...]], ...]  # (name, shape symbols)
    layer_params: tuple[tuple[str, tuple[str, ...]], ...]  # names after "blocks.<i>."
    dim_names: tuple[str, ...]
    packable: frozenset[str]  # parameter names (as in the two tables) that may be stored packed
    transposed: frozenset[str]  # those of them packed as their transposes (the LoRA matrices)
    bf16_pair: int  # the pairing packed bf16 weights need (the vector width)
    tile: int  # rows of an output tile (rwkv7_tile: 2 * bf16_pair)
    phase_names: tuple[str, ...]  # the kinds of phase a token runs (rwkv7_phase_names)
    profiling: bool  # built with -DRWKV7_PROFILE: `phase_times` answers

    def describe(self) -> str:
        threads = "threads" if self.threads else "one thread"
        return f"{self.simd}, {threads}, {' '.join(self.flags)}"

    def round_trip_ns(self, trips: int = 2000) -> float | None:
        """Mean nanoseconds a cache line takes from this thread to a new one and back, both
        spinning (up to `trips` times, at most about 50 ms): how far apart two cores are now.
        None for a build without threads."""
        ns = self.cdll.rwkv7_round_trip_ns(trips)
        return ns if ns > 0 else None

    def phase_times(self) -> dict[str, tuple[float, float]]:
        """Per kind of phase, (wall seconds, busy seconds summed over threads) of every step
        since the last call, which resets them. Needs a `load_library(profile=True)` build."""
        if not self.profiling:
            raise CpuStepUnavailableError("this build does not profile its phases (load_library(profile=True))")
        n = len(self.phase_names)
        out = (ctypes.c_double * (2 * n))()
        self.cdll.rwkv7_profile(out)
        return {name: (out[k], out[n + k]) for k, name in enumerate(self.phase_names)}


_library_lock = threading.Lock()
_libraries: dict[str, CpuStepLibrary | CpuStepUnavailableError] = {}


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """$RWKV_MUSIC_CACHE, else $XDG_CACHE_HOME/rwkv-music, else ~/.cache/rwkv-music."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    base = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "rwkv-music"


def compiler_command(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The C compiler to run: $RWKV_MUSIC_CC (may carry arguments), else `cc`."""
    return shlex.split(environ.get(COMPILER_ENV, "") or "cc")


def cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        fields = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in lines}
        if fields:
            return " | ".join(f"{k}: {v}" for k, v in sorted(fields.items()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {platform.system()}"


def library_key(compiler: list[str]) -> str:
    """The cache key: a hash of the source, the compiler command, the flag sets and the CPU."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(compiler).encode(), repr(FLAG_SETS).encode(),
                 cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


PROFILE_DEFINE = "-DRWKV7_PROFILE"


def load_library(profile: bool = False) -> CpuStepLibrary:
    """The compiled kernel library for this source, compiler and CPU: cached on disk and per
    process. Raises CpuStepUnavailableError (remembered for the process) when it cannot be built.
    `profile`: a separate build that times its phases (`CpuStepLibrary.phase_times`), slower
    by two clock reads a chunk; `rwkv-music bench phases` uses it."""
    compiler = compiler_command() + ([PROFILE_DEFINE] if profile else [])
    key = library_key(compiler)
    with _library_lock:
        outcome = _libraries.get(key)
        if outcome is None:
            try:
                outcome = _build_and_load(compiler, key)
            except CpuStepUnavailableError as err:
                outcome = err
            _libraries[key] = outcome
    if isinstance(outcome, CpuStepUnavailableError):
        raise outcome
    return outcome


def _build_and_load(compiler: list[str], key: str) -> CpuStepLibrary:
    directory = cache_root() / "cpu"
    path = directory / f"rwkv7_step-{key}.so"
    flags_path = path.with_suffix(".flags")
    if path.exists() and flags_path.exists():
        flags = tuple(flags_path.read_text().split())
        log.debug("CPU step kernel: cached build %s", path)
    else:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CpuStepUnavailableError(f"cannot create the build folder {directory} ({err})") from err
        flags = _compile(compiler, directory, path)
        tmp = flags_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(" ".join(flags))
        os.replace(tmp, flags_path)
    try:
        cdll = ctypes.CDLL(str(path))
    except OSError as err:
        raise CpuStepUnavailableError(f"cannot load {path} ({err})") from err
    return _describe(path, cdll, flags)


def _compile(compiler: list[str], directory: Path, path: Path) -> tuple[str, ...]:
    """Compile with the first flag set that works into `path` (atomically); the flags used."""
    failures = []
    for flags in FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        cmd = [*compiler, *flags, "-fPIC", "-shared", str(SOURCE), "-o", tmp, "-lm"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            os.unlink(tmp)
            # No compiler at all: the other flag sets cannot do better.
            raise CpuStepUnavailableError(f"cannot run the C compiler {shlex.join(compiler)!r} ({err})") from err
        if result.returncode == 0:
            os.replace(tmp, path)
            log.info("CPU step kernel built with %s %s", shlex.join(compiler), " ".join(flags))
            return flags
        os.unlink(tmp)
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        failures.append(f"{' '.join(flags)}: {last}")
        log.debug("CPU step kernel: %s failed:\n%s", shlex.join(cmd), result.stderr)
    raise CpuStepUnavailableError(f"{shlex.join(compiler)} could not build {SOURCE.name} ({'; '.join(failures)})")


def _describe(path: Path, cdll: ctypes.CDLL, flags: tuple[str, ...]) -> CpuStepLibrary:
    for name in ("rwkv7_layout", "rwkv7_dim_names", "rwkv7_simd"):
        getattr(cdll, name).restype = ctypes.c_char_p
        getattr(cdll, name).argtypes = []
    cdll.rwkv7_threads.restype = ctypes.c_int
    cdll.rwkv7_bf16_pair.restype = ctypes.c_int
    cdll.rwkv7_phase_names.restype = ctypes.c_char_p
    cdll.rwkv7_profile.restype = ctypes.c_int
    cdll.rwkv7_profile.argtypes = [ctypes.c_void_p]
    cdll.rwkv7_scratch_floats.restype = ctypes.c_int64
    cdll.rwkv7_scratch_floats.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    cdll.rwkv7_read_pass.restype = ctypes.c_int
    cdll.rwkv7_read_pass.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                                     ctypes.c_void_p]
    cdll.rwkv7_step.restype = ctypes.c_int
    cdll.rwkv7_step.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int32] * 2 + [ctypes.c_void_p] * 5
                                + [ctypes.c_int32, ctypes.c_void_p])
    cdll.rwkv7_thread_times_bytes.restype = ctypes.c_int64
    cdll.rwkv7_choose_threads.restype = ctypes.c_int32
    cdll.rwkv7_choose_threads.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    cdll.rwkv7_record_threads.restype = None
    cdll.rwkv7_record_threads.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_double]
    cdll.rwkv7_thread_policy.restype = None
    cdll.rwkv7_thread_policy.argtypes = [ctypes.c_void_p]
    cdll.rwkv7_tile.restype = ctypes.c_int
    cdll.rwkv7_round_trip_ns.restype = ctypes.c_double
    cdll.rwkv7_round_trip_ns.argtypes = [ctypes.c_int32]
    packable, transposed = set(), set()

    def parse(section: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        entries = []
        for item in section.split():
            if item.endswith(("*", "^")):
                item, marker = item[:-1], item[-1]
                packable.add(item.split("[")[0])
                if marker == "^":
                    transposed.add(item.split("[")[0])
            name, shape = item.rstrip("]").split("[")
            entries.append((name, tuple(shape.split(","))))
        return tuple(entries)

    global_part, layer_part = cdll.rwkv7_layout().decode().split("|")
    phase_names = tuple(cdll.rwkv7_phase_names().decode().split())
    return CpuStepLibrary(
        path=path, cdll=cdll, flags=flags, simd=cdll.rwkv7_simd().decode(),
        threads=bool(cdll.rwkv7_threads()), global_params=parse(global_part),
        layer_params=parse(layer_part), dim_names=tuple(cdll.rwkv7_dim_names().decode().split()),
        packable=frozenset(packable), transposed=frozenset(transposed),
        bf16_pair=int(cdll.rwkv7_bf16_pair()), tile=int(cdll.rwkv7_tile()),
        phase_names=phase_names, profiling=cdll.rwkv7_profile((ctypes.c_double * (2 * len(phase_names)))()) > 0,
    )


def pack_for_kernel(library: CpuStepLibrary, name: str, matrix: Tensor, weights: str) -> PackedMatrix:
    """Parameter `name` (as in the layout table) stored as the kernel reads it in format
    `weights`: in output tiles, the LoRA matrices ([in, out]) first transposed to nn.Linear form."""
    if weights == "fp32":
        return pack(matrix, weights)
    if name in library.transposed:
        matrix = matrix.t().contiguous()
    return pack(matrix, weights, library.bf16_pair, library.tile)


# ------------------------------------------------------------------------------- threads


class ThreadTimes:
    """The wall times of one kind of call (a kernel and batch size, or the read pass) with one
    thread and with all of them, from which each call chooses 1 or `most` threads.

    The choice and the times live in C (`rwkv7_choose_threads` in rwkv7_step.c says how it
    chooses): the step reads and updates them itself, so choosing costs a token no Python.
    `choose` and `record` call the same C functions, for tests and callers that time work of
    their own."""

    def __init__(self, library: CpuStepLibrary) -> None:
        self._cdll = library.cdll
        policy = (ctypes.c_int32 * 4)()
        library.cdll.rwkv7_thread_policy(policy)
        # times kept per option, times of each option before choosing, and how often the
        # other option is tried: every `explore_every`-th call, `explore_far_every`-th when far slower
        self.window, self.warmup, self.explore_every, self.explore_far_every = list(policy)
        self.buffer = ctypes.create_string_buffer(library.cdll.rwkv7_thread_times_bytes())  # zeroed
        self.address = ctypes.addressof(self.buffer)

    def choose(self, most: int) -> int:
        return int(self._cdll.rwkv7_choose_threads(self.address, most))

    def record(self, threads: int, seconds: float) -> None:
        self._cdll.rwkv7_record_threads(self.address, threads, seconds)


# ------------------------------------------------------------------------------- the kernel


@dataclass
class _Binding:
    """The model's parameters as the C side sees them, valid while `ptrs` are current."""

    dims: dict[str, int]
    tensors: list[Tensor]  # the parameters bound: kept alive while the kernel may read them
    dims_c: ctypes.Array
    eps_c: ctypes.Array
    ptrs: list[int]  # data_ptr of every parameter in the table (the model's own)
    versions: list[int]  # version counters of the packed parameters (empty for fp32)
    ptrs_c: ctypes.Array  # what the kernel reads: the parameters, packed matrices in their place
    scales_c: ctypes.Array  # per-row scales of int8 matrices, parallel to ptrs_c (else NULL)
    packed: list[PackedMatrix]  # keeps the packed copies alive
    stored_bytes: dict[str, int]  # weight bytes a token reads at batch 1, per table name (layers summed)
    _state_shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(shift shape, wkv shape) of a State of `batch` streams: [L, 2, B, C], [L, B, H, N, N]."""
        shapes = self._state_shapes.get(batch)
        if shapes is None:
            d = self.dims
            shapes = self._state_shapes[batch] = ((d["L"], 2, batch, d["C"]), (d["L"], batch, d["H"], d["N"], d["N"]))
        return shapes


class CpuStepKernel:
    """One token of an RWKV7 for B streams on the CPU in one call (see the module docstring)."""

    def __init__(self, library: CpuStepLibrary, model: nn.Module, weights: str = "fp32"):
        self.library = library
        self.weights = check_format(weights)
        # A weak reference: `cpu_step_kernel` keeps kernels in a dict keyed weakly by model.
        self._model = weakref.ref(model)
        self._slots = self._parameter_slots(model)
        self._slot_dicts = [params for params, _ in self._slots]
        self._slot_keys = [attr for _, attr in self._slots]
        self._packed_slots = [i for i, name in enumerate(self._table_names()) if name in library.packable
                              ] if weights != "fp32" else []
        self._binding = self._bind(model)
        self._scratch: dict[int, Tensor] = {}  # per batch size
        self._read_sums: dict[int, Tensor] = {}  # read_pass's per-chunk sums, per buffer length
        self._thread_times: dict[int, ThreadTimes] = {}  # per batch size, -1 for the read pass
        self._lock = threading.Lock()  # the scratch memory is shared by calls
        self._fixed = threading.local()  # depth of weights_fixed blocks, per thread

    @classmethod
    def for_model(cls, model: nn.Module, weights: str = "fp32") -> CpuStepKernel | None:
        """A kernel for `model` with its large matrices stored as `weights` ("fp32", "bf16",
        "int8"), or None (with one warning line) when it cannot be used."""
        try:
            return cls(load_library(), model, weights)
        except CpuStepUnavailableError as err:
            log.warning("%s; %s", err, FALLBACK)
            return None

    # ---------------------------------------------------------------- binding to the model

    def _table_names(self) -> list[str]:
        """The parameter table's names as the C layout gives them (per-layer ones repeated)."""
        lib = self.library
        return [n for n, _ in lib.global_params] + [n for n, _ in lib.layer_params] * self._n_layer

    def _parameter_slots(self, model: nn.Module) -> list[tuple[dict, str]]:
        """(the owning module's _parameters dict, key) for every parameter in the table, so a
        step can see a replaced parameter with one dict lookup and one data_ptr each."""
        lib = self.library
        self._n_layer = n_layer = len(model.blocks) if hasattr(model, "blocks") else 0
        names = [name for name, _ in lib.global_params]
        names += [f"blocks.{i}.{name}" for i in range(n_layer) for name, _ in lib.layer_params]
        slots = []
        for name in names:
            owner, _, attr = name.rpartition(".")
            try:
                module = model.get_submodule(owner)
            except AttributeError as err:
                raise CpuStepUnavailableError(f"the model has no {name}") from err
            if attr not in module._parameters or module._parameters[attr] is None:
                raise CpuStepUnavailableError(f"the model has no parameter {name}")
            slots.append((module._parameters, attr))
        return slots

    def _bind(self, model: nn.Module) -> _Binding:
        """Check every parameter (float32, CPU, contiguous, expected shape) and take addresses."""
        lib = self.library
        tensors = [params[attr] for params, attr in self._slots]
        by_name = dict(zip([n for n, _ in lib.global_params] + [n for n, _ in lib.layer_params],
                           tensors, strict=False))
        emb, r_k = by_name["emb.weight"], by_name["att.r_k"]
        dims = {
            "L": len(model.blocks), "V": emb.shape[0], "C": emb.shape[1], "H": r_k.shape[0],
            "N": r_k.shape[1], "F": by_name["ffn.key.weight"].shape[0],
            "Dw": by_name["att.w1"].shape[1], "Da": by_name["att.a1"].shape[1],
            "Dv": by_name["att.v1"].shape[1], "Dg": by_name["att.g1"].shape[1],
        }
        if dims["H"] * dims["N"] != dims["C"]:
            raise CpuStepUnavailableError(f"n_embd {dims['C']} is not n_head x head_size {dims['H']}x{dims['N']}")
        entries = list(lib.global_params) + list(lib.layer_params) * dims["L"]
        for (name, shape), tensor, (_, attr) in zip(entries, tensors, self._slots, strict=True):
            expected = tuple(dims[s] for s in shape)
            if tensor.device.type != "cpu" or tensor.dtype != torch.float32:
                raise CpuStepUnavailableError(
                    f"the model is {tensor.dtype} on {tensor.device}; the kernel runs float32 on the CPU")
            if tuple(tensor.shape) != expected:
                raise CpuStepUnavailableError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
            if not tensor.is_contiguous():
                raise CpuStepUnavailableError(f"{name} ({attr}) is not contiguous")
        eps = self._norm_eps(model)
        ptrs = [t.data_ptr() for t in tensors]
        names = self._table_names()
        read_ptrs, scale_ptrs = list(ptrs), [None] * len(ptrs)
        packed = []
        for i in self._packed_slots:
            packed.append(pack_for_kernel(lib, names[i], tensors[i].detach(), self.weights))
        if self.weights != "fp32":  # copies of our own: one buffer on 2 MB pages (kernels/huge_pages.py)
            placed = huge_pages.gather([m.data for m in packed])
            packed = [replace(m, data=data) for m, data in zip(packed, placed, strict=True)]
        for i, matrix in zip(self._packed_slots, packed, strict=True):
            read_ptrs[i] = matrix.data.data_ptr()
            if matrix.scale is not None:
                scale_ptrs[i] = matrix.scale.data_ptr()
        return _Binding(
            dims=dims,
            tensors=tensors,
            dims_c=(ctypes.c_int32 * len(lib.dim_names))(*(dims[n] for n in lib.dim_names)),
            eps_c=(ctypes.c_float * 2)(*eps),
            ptrs=ptrs,
            versions=[tensors[i]._version for i in self._packed_slots],
            ptrs_c=(ctypes.c_void_p * len(ptrs))(*read_ptrs),
            scales_c=(ctypes.c_void_p * len(ptrs))(*scale_ptrs),
            packed=packed,
            stored_bytes=self._stored_bytes(names, tensors, packed),
        )

    def _stored_bytes(self, names: list[str], tensors: list[Tensor], packed: list[PackedMatrix]) -> dict[str, int]:
        """Weight bytes a token reads at batch 1 per parameter name: packed matrices at their
        packed size, the rest as they are, and of the embedding (slot 0) one row."""
        sizes = {i: m.nbytes for i, m in zip(self._packed_slots, packed, strict=True)}
        stored: dict[str, int] = {}
        for i, (name, t) in enumerate(zip(names, tensors, strict=True)):
            size = sizes.get(i, t.shape[1] * t.element_size() if i == 0 else t.numel() * t.element_size())
            stored[name] = stored.get(name, 0) + size
        return stored

    @staticmethod
    def _norm_eps(model: nn.Module) -> tuple[float, float]:
        """(LayerNorm eps, GroupNorm eps); the kernel takes one of each for the whole model."""
        layer_norms = [model.ln_out, model.blocks[0].ln0]
        layer_norms += [ln for block in model.blocks for ln in (block.ln1, block.ln2)]
        group_norms = [block.att.ln_x for block in model.blocks]
        ln_eps = {ln.eps for ln in layer_norms}
        gn_eps = {gn.eps for gn in group_norms}
        if len(ln_eps) != 1 or len(gn_eps) != 1:
            raise CpuStepUnavailableError("the layer norms (or the group norms) differ in eps")
        return ln_eps.pop(), gn_eps.pop()

    def _current_binding(self) -> _Binding:
        # map() over the slots: a per-token cost (400 parameters at 12 layers), twice as fast
        # as the same comprehension
        tensors = list(map(dict.__getitem__, self._slot_dicts, self._slot_keys))
        changed = list(map(Tensor.data_ptr, tensors)) != self._binding.ptrs
        if not changed and self._packed_slots:
            versions = [tensors[i]._version for i in self._packed_slots]
            changed = versions != self._binding.versions
        if changed:
            model = self._model()
            if model is None:
                raise CpuStepUnavailableError("the model was deleted")
            log.debug("CPU step kernel: parameters moved or changed, rebuilding the table")
            self._binding = self._bind(model)
        return self._binding

    @contextlib.contextmanager
    def weights_fixed(self) -> Iterator[CpuStepKernel]:
        """A block of steps in which the caller does not change the model's parameters (no
        assignment, no in-place write, no `.to()`): the parameters are checked once on entry,
        and `step` skips its per-call check inside. That check touches every parameter object,
        which the previous token's weights have pushed out of the cache: about 0.25 ms a token
        at L12-D512 (`bench phases`). Per thread; blocks nest. The engine wraps each answer in
        one (RWKV7.weights_fixed)."""
        self._current_binding()
        depth = getattr(self._fixed, "depth", 0)
        self._fixed.depth = depth + 1
        try:
            yield self
        finally:
            self._fixed.depth = depth

    # ---------------------------------------------------------------- the step

    @property
    def dims(self) -> dict[str, int]:
        """Sizes of the bound model: L, C, H, N, V, F, Dw, Da, Dv, Dg."""
        return dict(self._binding.dims)

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes one token reads at batch 1 in this kernel's format (the packed matrices,
        the float32 rest, one embedding row): the numerator of the memory-bandwidth floor."""
        return sum(self._binding.stored_bytes.values())

    @property
    def stored_bytes(self) -> dict[str, int]:
        """`bytes_per_token` per parameter name of the layout table (a per-layer name summed
        over the layers): where a token's bytes are."""
        return dict(self._binding.stored_bytes)

    def step(self, idx: Tensor, shift: Tensor, wkv: Tensor, threads: int | None = None) -> Tensor:
        """One token per stream: idx LongTensor [B] -> logits [B, V] (float32, a new tensor).

        The recurrent state, shift [L, 2, B, C] and wkv [L, B, H, N, N] (float32, contiguous,
        CPU: a State's two tensors), is updated in place, as `RWKV7.step` does. `threads` (the
        calling one included) fixes the thread count; by default it is 1 or
        torch.get_num_threads(), whichever has been faster lately (`ThreadTimes`). Raises
        CpuStepInputError for ids out of range or state tensors of the wrong shape,
        CpuStepUnavailableError when the model stopped being float32 on the CPU.
        """
        # Every line here runs with its objects out of the caches (the weights have just streamed
        # through them), so the checks use the cheapest forms: .is_cpu, not .device (a new
        # object), dtype by identity, state shapes compared with tuples made once per batch size.
        binding = self._binding if getattr(self._fixed, "depth", 0) else self._current_binding()
        if idx.ndim != 1 or not idx.is_cpu:
            raise CpuStepInputError("idx", f"expected a 1-D CPU tensor, got shape {tuple(idx.shape)} on {idx.device}")
        batch = idx.shape[0]
        if idx.dtype is not torch.int64 or not idx.is_contiguous():
            idx = idx.to(torch.int64).contiguous()
        if (shift.shape, wkv.shape) != binding.state_shapes(batch):
            raise CpuStepInputError(
                "state", f"shapes {tuple(shift.shape)} and {tuple(wkv.shape)} do not fit {batch} streams")
        if not (shift.dtype is wkv.dtype is torch.float32 and shift.is_cpu and wkv.is_cpu
                and shift.is_contiguous() and wkv.is_contiguous()):
            for name, t in (("state.shift", shift), ("state.wkv", wkv)):
                if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
                    raise CpuStepInputError(name, f"must be float32, contiguous, on the CPU ({t.dtype}, {t.device})")
        logits = torch.empty(batch, binding.dims["V"])
        if batch == 0:
            return logits
        lib = self.library.cdll
        with self._lock:
            threads, times = self._threads(threads, batch)
            scratch = self._scratch.get(batch)
            if scratch is None:
                scratch = self._scratch[batch] = torch.empty(lib.rwkv7_scratch_floats(binding.dims_c, batch))
            status = lib.rwkv7_step(
                binding.dims_c, binding.eps_c, binding.ptrs_c, binding.scales_c, WEIGHT_FORMATS[self.weights],
                batch, idx.data_ptr(),
                shift.data_ptr(), wkv.data_ptr(), logits.data_ptr(), scratch.data_ptr(), threads, times,
            )
        if status == -2:
            raise CpuStepUnavailableError(f"the library does not know weight format {self.weights!r}")
        if status < 0:
            raise CpuStepUnavailableError(
                f"{binding.dims['L']} layers at {batch} streams is more than the kernel schedules "
                "(at most 584 layers and 65,535 chunks a phase)")
        if status:
            bad = int(idx[status - 1])
            raise CpuStepInputError("idx", f"token id {bad} is out of range [0, {binding.dims['V']})")
        return logits


    def _threads(self, threads: int | None, key: int) -> tuple[int, int | None]:
        """(thread count, address of the ThreadTimes that chooses or None) for a call: 1 for a
        library built without threads; the caller's number; else torch.get_num_threads() and
        the times kept for `key` (a batch size, -1 for the read pass), from which the library
        picks 1 or that many threads."""
        if not self.library.threads:
            return 1, None
        if threads is not None:
            return max(1, threads), None
        times = self._thread_times.get(key)
        if times is None:
            times = self._thread_times[key] = ThreadTimes(self.library)
        return max(1, torch.get_num_threads()), times.address

    def read_pass(self, buffer: Tensor, threads: int | None = None) -> None:
        """Read `buffer` (float32, contiguous, CPU) once, cut into the step's chunks and run by
        its threads and scheduler: the memory-bandwidth floor of a step reading as many bytes
        (`bench step` passes a buffer of `bytes_per_token` bytes). Threads as in `step`, with
        ThreadTimes of its own. Its per-chunk sums are kept between calls, as the step's scratch
        memory is, so that the floor pays for no allocation the step does not pay for."""
        if buffer.dtype is not torch.float32 or not buffer.is_cpu or not buffer.is_contiguous():
            raise CpuStepInputError("buffer", "must be float32, contiguous, on the CPU")
        n = buffer.numel()
        with self._lock:
            sums = self._read_sums.get(n)
            if sums is None:
                sums = self._read_sums[n] = torch.empty(-(-n // READ_CHUNK_FLOATS))
            threads, times = self._threads(threads, -1)
            status = self.library.cdll.rwkv7_read_pass(buffer.data_ptr(), n, sums.data_ptr(), threads, times)
        if status:
            raise CpuStepInputError("buffer", f"{n} floats is more than the scheduler's chunk counter holds")


# ------------------------------------------------------------------------------- routing

_kernels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_kernels_lock = threading.Lock()


def cpu_step_kernel(model: nn.Module, weights: str = "fp32") -> CpuStepKernel | None:
    """The kernel for `model` with its large matrices stored as `weights`, made on first use
    and remembered per model and format (None is remembered too, so the warning appears once);
    None whenever $RWKV_MUSIC_NO_CPU_STEP is set to 1.

    The caller checks that the model is float32 on the CPU before asking (RWKV7.step does).
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    with _kernels_lock:
        per_format = _kernels.setdefault(model, {})
        if weights not in per_format:
            per_format[weights] = CpuStepKernel.for_model(model, weights)
        return per_format[weights]
