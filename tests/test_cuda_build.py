"""The CUDA build logic on a machine without a GPU: the fallback to the reference path, the
architecture list, the cache folder, the build-failure summary (from a real failed build), the
kernel sources compiling under nvcc (when present), and the Windows MSVC finder on recorded
vswhere / vcvars64.bat output."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path, PureWindowsPath

import pytest
import torch
import torch.nn.functional as F

from kernels import cuda_build, dispatch, reference
from kernels.errors import MsvcNotFoundError
from kernels.msvc_env import (
    ENV_MARKER,
    VsInstallation,
    activate_msvc,
    choose_installation,
    environment_changes,
    find_on_path,
    parse_set_output,
    parse_vswhere_json,
    parse_vswhere_output,
    parse_vswhere_text,
    vcvars64_path,
    vswhere_path,
)

DATA = Path(__file__).parent / "data"
COMMUNITY_2022 = PureWindowsPath(r"C:\Program Files\Microsoft Visual Studio\2022\Community")
BUILD_TOOLS_2019 = PureWindowsPath(r"C:\Program Files (x86)\Microsoft Visual Studio\2019\BuildTools")
PREVIEW_2022 = PureWindowsPath(r"C:\Program Files\Microsoft Visual Studio\2022\Preview")
CL_2022 = COMMUNITY_2022 / r"VC\Tools\MSVC\14.39.33519\bin\HostX64\x64\cl.exe"

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="checks the fallback on a machine without CUDA")


@pytest.fixture
def fresh_build_state(monkeypatch):
    """Forget any earlier build outcome, before and after the test."""
    monkeypatch.delenv(cuda_build.DISABLE_ENV, raising=False)
    cuda_build.reset()
    yield
    cuda_build.reset()


def wkv_inputs(B, T, H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -F.softplus(-2 * torch.randn(B, T, H, N, generator=g)) - 0.5
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    gate = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    return [r, w, k, v, -kk, kk * gate], torch.randn(B, H, N, N, generator=g)


def warnings_from(caplog, logger_name):
    return [rec for rec in caplog.records if rec.name == logger_name and rec.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------------
# Fallback


@needs_no_gpu
def test_load_extension_without_cuda_returns_none_with_one_warning(fresh_build_state, caplog):
    caplog.set_level(logging.INFO, logger="kernels.cuda_build")
    assert cuda_build.load_extension() is None
    assert cuda_build.load_extension() is None  # cached: no second attempt, no second warning
    warnings = warnings_from(caplog, "kernels.cuda_build")
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert "reference" in message
    reason = cuda_build.cached_outcome().reason
    assert reason in message
    assert ("CPU-only build" in reason) or ("no usable CUDA GPU" in reason)


@needs_no_gpu
def test_cuda_status_explains_why_the_reference_runs(fresh_build_state, caplog):
    assert "not requested yet" in cuda_build.cuda_status(build=False)
    status = cuda_build.cuda_status()
    assert "not in use" in status and "reference" in status
    assert cuda_build.cached_outcome().reason in status


def test_disable_variable_turns_the_kernels_off(fresh_build_state, monkeypatch, caplog):
    monkeypatch.setenv(cuda_build.DISABLE_ENV, "1")
    assert cuda_build.load_extension() is None
    assert cuda_build.DISABLE_ENV in cuda_build.cached_outcome().reason
    assert len(warnings_from(caplog, "kernels.cuda_build")) == 1


def test_dispatch_on_cpu_gives_the_reference_and_builds_nothing(fresh_build_state, caplog):
    x, s0 = wkv_inputs(2, 37, 2, 64)
    y, s = dispatch.wkv7(*x, s0)
    y_ref, s_ref = reference.wkv7_chunked(*x, s0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)

    step_inputs = [t[:, 0] for t in x]
    state, state_ref = s0.clone(), s0.clone()
    y1 = dispatch.wkv7_step_(*step_inputs, state)
    y1_ref = reference.wkv7_step_(*step_inputs, state_ref)
    assert torch.equal(y1, y1_ref) and torch.equal(state, state_ref)
    assert cuda_build.cached_outcome() is None  # CPU tensors never ask for the extension
    assert warnings_from(caplog, "kernels.cuda_build") == []


def test_dispatch_keeps_gradients_on_cpu(fresh_build_state):
    x, s0 = wkv_inputs(1, 19, 1, 8, seed=3)
    leaves = [t.clone().requires_grad_() for t in x + [s0]]
    y, s = dispatch.wkv7(*leaves[:6], leaves[6])
    (y.square().sum() + s.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


# ------------------------------------------------------------------------------------------------
# Architecture list, cache folder


def test_parse_torch_arch_list_reads_sm_entries():
    names = ["sm_50", "sm_80", "sm_86", "sm_90", "sm_90a", "sm_120", "compute_90"]
    assert cuda_build.parse_torch_arch_list(names) == [(5, 0), (8, 0), (8, 6), (9, 0), (12, 0)]


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ([(8, 6)], "8.6+PTX"),
        ([(9, 0), (8, 0), (9, 0)], "8.0;9.0+PTX"),  # several GPUs, duplicates merged, sorted
        ([(12, 0)], "9.0+PTX"),  # newer than torch knows: torch's newest, PTX for the rest
        ([(7, 5), (12, 0)], "7.5;9.0+PTX"),
    ],
)
def test_arch_list_for_devices(capabilities, expected):
    torch_arches = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0)]
    assert cuda_build.resolve_arch_list(None, capabilities, torch_arches) == expected


def test_arch_list_from_environment_wins():
    assert cuda_build.resolve_arch_list(" 8.0;8.6+PTX ", [(9, 0)], [(9, 0)]) == "8.0;8.6+PTX"
    assert cuda_build.resolve_arch_list("native", [(8, 9)], [(9, 0)]) == "8.9+PTX"
    assert cuda_build.resolve_arch_list("", [(8, 9)], [(9, 0)]) == "8.9+PTX"


def test_arch_list_needs_a_gpu():
    with pytest.raises(ValueError):
        cuda_build.resolve_arch_list(None, [], [(9, 0)])


def test_cache_root_follows_environment(tmp_path):
    assert cuda_build.cache_root({"RWKV_MUSIC_CACHE": str(tmp_path)}) == tmp_path
    assert cuda_build.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "rwkv-music"
    assert cuda_build.cache_root({}) == Path.home() / ".cache" / "rwkv-music"


def test_build_directory_key_names_everything_that_changes_the_binary(tmp_path):
    d = cuda_build.build_directory(tmp_path, "8.6;9.0+PTX", "0123456789ab", "2.5.1+cu124", "12.4", "311")
    assert d.parent == tmp_path / "kernels"
    assert d.name == "rwkv_music_wkv7-torch2.5.1_cu124-cuda12.4-py311-sm86-sm90ptx-0123456789ab"
    other_arch = cuda_build.build_directory(tmp_path, "8.9+PTX", "0123456789ab", "2.5.1+cu124", "12.4", "311")
    assert other_arch != d


def test_source_digest_changes_with_content(tmp_path):
    source = tmp_path / "kernel.cu"
    source.write_text("__global__ void f() {}\n")
    first = cuda_build.source_digest([source])
    assert cuda_build.source_digest([source]) == first
    source.write_text("__global__ void f() { }\n")
    assert cuda_build.source_digest([source]) != first


def test_source_digest_covers_the_shipped_sources():
    paths = [cuda_build.CUDA_DIR / name for name in cuda_build.SOURCES + cuda_build.HEADERS]
    assert all(p.is_file() for p in paths)
    assert len(cuda_build.source_digest(paths)) == 12


# ------------------------------------------------------------------------------------------------
# A real failed build gives one summarised line and a full log


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not _have_cxx(), reason="needs a C++ compiler")
def test_failed_build_is_summarised_in_one_line(tmp_path):
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("needs ninja")
    broken = tmp_path / "broken_op.cpp"
    # A missing header stops the compiler at once, before any torch header is parsed.
    broken.write_text('#include "wkv7_header_that_does_not_exist.h"\nint main() { return 0; }\n')
    outcome = cuda_build.compile_extension([broken], tmp_path / "build", "8.0")
    assert outcome.module is None
    assert outcome.reason.startswith("compiling the extension failed: ")
    assert "wkv7_header_that_does_not_exist.h" in outcome.reason
    assert "\n" not in outcome.reason
    log_path = tmp_path / "build" / "build-error.log"
    assert str(log_path) in outcome.reason
    assert "wkv7_header_that_does_not_exist.h" in log_path.read_text()


def test_summarize_build_error_prefers_the_compiler_error():
    text = (
        "Error building extension 'rwkv_music_wkv7': [1/3] c++ -MMD -MF wkv7_op.o.d ...\n"
        "FAILED: wkv7_train.cuda.o\n"
        "/src/kernels/cuda/wkv7_train.cu(72): error: identifier \"num_chunks\" is undefined\n"
        "1 error detected in the compilation of \"/src/kernels/cuda/wkv7_train.cu\".\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    assert cuda_build.summarize_build_error(text) == (
        "/src/kernels/cuda/wkv7_train.cu(72): error: identifier \"num_chunks\" is undefined")
    assert cuda_build.summarize_build_error("CUDA_HOME environment variable is not set.\n") == (
        "CUDA_HOME environment variable is not set.")
    assert cuda_build.summarize_build_error("") == "no error output"
    assert len(cuda_build.summarize_build_error("error: " + "x" * 1000)) == 240


# ------------------------------------------------------------------------------------------------
# The kernel sources compile (device code) wherever nvcc is installed


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
@pytest.mark.parametrize("source", ["wkv7_train.cu", "wkv7_step.cu"])
def test_kernel_source_compiles_with_nvcc(source, tmp_path):
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_80", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-I", str(cuda_build.CUDA_DIR), "-c", str(cuda_build.CUDA_DIR / source),
           "-o", str(tmp_path / "out.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out.o").stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# MSVC environment finder, on recorded Windows tool output


def test_vswhere_path_uses_program_files_x86():
    env = {"ProgramFiles(x86)": r"D:\Apps (x86)"}
    assert vswhere_path(env) == PureWindowsPath(
        r"D:\Apps (x86)\Microsoft Visual Studio\Installer\vswhere.exe")
    assert vswhere_path({}) == PureWindowsPath(
        r"C:\Program Files (x86)\Microsoft Visual Studio\Installer\vswhere.exe")


def test_parse_vswhere_json_reads_every_installation():
    installs = parse_vswhere_json((DATA / "vswhere_installations.json").read_text(encoding="utf-8"))
    assert [i.path for i in installs] == [BUILD_TOOLS_2019, COMMUNITY_2022, PREVIEW_2022]
    assert [i.prerelease for i in installs] == [False, False, True]
    assert installs[1].version == "17.9.34728.123"
    assert installs[1].display_name == "Visual Studio Community 2022"


def test_parse_vswhere_text_matches_json():
    from_text = parse_vswhere_text((DATA / "vswhere_installations.txt").read_text(encoding="utf-8"))
    from_json = parse_vswhere_json((DATA / "vswhere_installations.json").read_text(encoding="utf-8"))
    assert from_text == from_json[:2]


def test_parse_vswhere_output_detects_the_format():
    for name in ("vswhere_installations.json", "vswhere_installations.txt"):
        installs = parse_vswhere_output((DATA / name).read_text(encoding="utf-8"))
        assert COMMUNITY_2022 in [i.path for i in installs]
    assert parse_vswhere_output("[]") == []


def test_parse_vswhere_json_rejects_garbage():
    with pytest.raises(MsvcNotFoundError):
        parse_vswhere_json("[{not json")


def test_choose_installation_prefers_newest_release_with_vcvars():
    installs = parse_vswhere_json((DATA / "vswhere_installations.json").read_text(encoding="utf-8"))
    every = {vcvars64_path(i.path) for i in installs}
    assert choose_installation(installs, every.__contains__).path == COMMUNITY_2022
    # Community lacks the C++ workload: the 2019 Build Tools, still ahead of the preview.
    without_community = every - {vcvars64_path(COMMUNITY_2022)}
    assert choose_installation(installs, without_community.__contains__).path == BUILD_TOOLS_2019
    assert choose_installation(installs, {vcvars64_path(PREVIEW_2022)}.__contains__).path == PREVIEW_2022
    assert choose_installation(installs, set().__contains__) is None


def test_version_key_orders_numerically():
    older = VsInstallation(PureWindowsPath("C:/a"), "17.9.34728.123")
    newer = VsInstallation(PureWindowsPath("C:/b"), "17.10.34804.81")
    assert newer.version_key > older.version_key


def test_vcvars64_path():
    assert vcvars64_path(COMMUNITY_2022) == PureWindowsPath(
        r"C:\Program Files\Microsoft Visual Studio\2022\Community\VC\Auxiliary\Build\vcvars64.bat")


def test_parse_set_output_skips_the_banner():
    env = parse_set_output((DATA / "vcvars64_output.txt").read_text(encoding="utf-8"))
    assert not any(name.startswith("*") or name.startswith("[") for name in env)
    assert env["VSCMD_ARG_TGT_ARCH"] == "x64"
    assert env["VCToolsVersion"] == "14.39.33519"
    assert env["Path"].startswith(str(CL_2022.parent) + ";")
    assert env["PROMPT"] == "$P$G"
    assert all(not value.endswith("\r") for value in env.values())


def test_parse_set_output_keeps_equals_signs_and_skips_hidden_drive_variables():
    text = "=C:=C:\\Users\\mira\nFOO=a=b\nnot a variable\n"
    assert parse_set_output(text) == {"FOO": "a=b"}


def test_environment_changes_are_case_insensitive():
    before = {"PATH": r"C:\WINDOWS", "TEMP": r"C:\Temp"}
    after = {"Path": r"C:\VC\bin;C:\WINDOWS", "TEMP": r"C:\Temp", "INCLUDE": r"C:\VC\include"}
    assert environment_changes(before, after) == {
        "Path": r"C:\VC\bin;C:\WINDOWS", "INCLUDE": r"C:\VC\include"}
    assert environment_changes({"path": "x"}, {"PATH": "x"}) == {}


def test_recorded_vcvars_run_changes_the_expected_variables():
    before = parse_set_output((DATA / "windows_set_before.txt").read_text(encoding="utf-8"))
    after = parse_set_output((DATA / "vcvars64_output.txt").read_text(encoding="utf-8"))
    changes = environment_changes(before, after)
    assert {"Path", "INCLUDE", "LIB", "LIBPATH", "VCToolsInstallDir", "WindowsSdkDir"} <= set(changes)
    assert "USERNAME" not in changes and "ProgramFiles(x86)" not in changes
    assert find_on_path("cl.exe", changes["Path"], {CL_2022}.__contains__) == CL_2022


class RecordedWindows:
    """Answers activate_msvc's program runs with the recorded output and keeps the commands."""

    def __init__(self, vcvars_output: str):
        self.vcvars_output = vcvars_output
        self.commands: list[list[str] | str] = []

    def run(self, command, encoding):
        self.commands.append(command)
        if isinstance(command, list) and command[0].endswith("vswhere.exe"):
            return (DATA / "vswhere_installations.json").read_text(encoding="utf-8")
        if isinstance(command, str) and command.startswith("cmd.exe"):
            return self.vcvars_output
        raise AssertionError(f"unexpected command {command!r}")


def recorded_environment() -> dict[str, str]:
    return parse_set_output((DATA / "windows_set_before.txt").read_text(encoding="utf-8"))


def installed_files() -> set[PureWindowsPath]:
    return {vswhere_path(recorded_environment()), vcvars64_path(COMMUNITY_2022),
            vcvars64_path(BUILD_TOOLS_2019), CL_2022}


def test_activate_msvc_merges_the_vcvars_environment():
    environ = recorded_environment()
    windows = RecordedWindows((DATA / "vcvars64_output.txt").read_text(encoding="utf-8"))
    changes = activate_msvc(environ, run=windows.run, exists=installed_files().__contains__)
    assert environ["VCToolsVersion"] == "14.39.33519"
    assert environ["Path"].startswith(str(CL_2022.parent))
    assert environ["USERNAME"] == "mira"
    assert set(changes) >= {"Path", "INCLUDE", "LIB"}
    vswhere_cmd, vcvars_cmd = windows.commands
    assert "-requires" in vswhere_cmd and "Microsoft.VisualStudio.Component.VC.Tools.x86.x64" in vswhere_cmd
    assert f'""{vcvars64_path(COMMUNITY_2022)}" && echo {ENV_MARKER} && set"' in vcvars_cmd


def test_activate_msvc_without_vswhere_says_what_to_install():
    with pytest.raises(MsvcNotFoundError, match="Desktop development with C\\+\\+"):
        activate_msvc(recorded_environment(), run=RecordedWindows("").run, exists=set().__contains__)


def test_activate_msvc_reports_a_vcvars_failure():
    broken = "[ERROR:vcvars.bat] Invalid command line argument: 'x64'\n"
    windows = RecordedWindows(broken)
    with pytest.raises(MsvcNotFoundError, match="Invalid command line argument"):
        activate_msvc(recorded_environment(), run=windows.run, exists=installed_files().__contains__)


def test_activate_msvc_checks_that_cl_is_reachable():
    windows = RecordedWindows((DATA / "vcvars64_output.txt").read_text(encoding="utf-8"))
    no_cl = installed_files() - {CL_2022}
    with pytest.raises(MsvcNotFoundError, match="cl.exe is still not on PATH"):
        activate_msvc(recorded_environment(), run=windows.run, exists=no_cl.__contains__)
