"""The fused CPU step kernel (kernels/cpu/rwkv7_step.c) against the PyTorch `RWKV7.step`.

The library is really compiled (into a temporary cache folder) with the system C compiler; the
reference is RWKV7.step with RWKV_MUSIC_NO_CPU_STEP=1, so it stays the PyTorch path even where
RWKV7.step routes to the kernel.
"""

import copy
import dataclasses
import json
import logging
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from kernels import cpu_step
from kernels.cpu_step import CpuStepInputError, CpuStepKernel, ThreadTimes, cpu_step_kernel
from model import RWKV7, ModelConfig
from tests.model_factory import random_model

TOLERANCE = 1e-5
# Every test that builds the kernel needs the system C compiler (Debian: gcc provides cc).
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")
KERNEL_THREADS = 2  # the kernel runs with a helper thread even on a one-core machine


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Builds go to a folder of this test session, and the reference is the PyTorch step, run
    on one thread (torch's thread pool is slow on a busy machine; the kernel's threads are not
    the pool's)."""
    monkeypatch.setenv(cpu_step.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "rwkv-music-cache"))
    monkeypatch.delenv(cpu_step.COMPILER_ENV, raising=False)
    monkeypatch.setenv(cpu_step.DISABLE_ENV, "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors_of(state) -> tuple[torch.Tensor, torch.Tensor]:
    """A State as the kernel takes it: (shift, wkv)."""
    return state.shift, state.wkv


def kernel_for(model: RWKV7) -> CpuStepKernel:
    kernel = CpuStepKernel.for_model(model)
    assert kernel is not None, "the C compiler should build the kernel on this machine"
    return kernel


def perturbed(cfg: ModelConfig, seed: int) -> RWKV7:
    """Like tests.model_factory.random_model, for any ModelConfig."""
    torch.manual_seed(seed)
    model = RWKV7(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0) if name == "emb.weight" else p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def float64_twin(model: RWKV7) -> RWKV7:
    return copy.deepcopy(model).double()


def float64_state(model64: RWKV7, batch: int):
    state = model64.init_state(batch)
    state.shift, state.wkv = state.shift.double(), state.wkv.double()
    return state


def compare_steps(model: RWKV7, kernel: CpuStepKernel, batch: int, n_tokens: int, seed: int = 0,
                  well_conditioned: bool = False, threads: int = KERNEL_THREADS) -> None:
    """Feed the same tokens to both; logits and State must agree after every token.

    Two float32 implementations can only agree to 1e-5 where float32 itself is that good: with
    `well_conditioned` the PyTorch step is also run in float64 and must stay within 3e-6 of it
    (some random models are ill-conditioned, see the float64 test below).
    """
    assert cpu_step_kernel(model) is None  # RWKV7.step below is the PyTorch path
    gen = torch.Generator().manual_seed(seed)
    ref_state, state = model.init_state(batch), model.init_state(batch)
    model64 = float64_twin(model) if well_conditioned else None
    state64 = float64_state(model64, batch) if well_conditioned else None
    for t in range(n_tokens):
        idx = torch.randint(0, model.cfg.vocab_size, (batch,), generator=gen)
        ref_logits, _ = model.step(idx, ref_state)
        logits = kernel.step(idx, *tensors_of(state), threads=threads)
        assert logits.shape == (batch, model.cfg.vocab_size)
        if model64 is not None:
            truth, _ = model64.step(idx, state64)
            assert rel_err(ref_logits, truth) <= 3e-6, "premise: pick a well-conditioned seed"
        assert rel_err(logits, ref_logits) <= TOLERANCE, f"logits at token {t}"
        assert rel_err(state.shift, ref_state.shift) <= TOLERANCE, f"shift state at token {t}"
        assert rel_err(state.wkv, ref_state.wkv) <= TOLERANCE, f"wkv state at token {t}"


# Seeds of tests.model_factory.random_model whose models are well-conditioned in float32.
WELL_CONDITIONED_SEED = {(2, 64): 0, (3, 128): 1, (2, 256): 0}


@pytest.mark.parametrize("n_layer,n_embd", [(2, 64), (3, 128), (2, 256)])
@pytest.mark.parametrize("batch", [1, 3])
@needs_cc
def test_cpu_step_matches_torch_step(n_layer, n_embd, batch):
    model = random_model(n_layer=n_layer, n_embd=n_embd, seed=WELL_CONDITIONED_SEED[n_layer, n_embd])
    compare_steps(model, kernel_for(model), batch, n_tokens=40, seed=batch, well_conditioned=True)


@needs_cc
def test_cpu_step_as_accurate_as_torch_step_where_ill_conditioned():
    # With this seed the WKV read-out S r of a head sums to nearly zero at the first token and
    # GroupNorm's eps makes the output follow that cancelled sum: both float32 paths end up
    # ~1e-5 off the float64 step, and off each other by as much. The kernel must stay about as
    # close to the float64 truth as the PyTorch float32 step is.
    model = random_model(n_layer=2, n_embd=256, seed=3)
    kernel = kernel_for(model)
    model64 = float64_twin(model)
    gen = torch.Generator().manual_seed(1)
    state32, state, state64 = model.init_state(1), model.init_state(1), float64_state(model64, 1)
    torch_err = kernel_err = 0.0
    for _ in range(20):
        idx = torch.randint(0, model.cfg.vocab_size, (1,), generator=gen)
        truth, _ = model64.step(idx, state64)
        torch_err = max(torch_err, rel_err(model.step(idx, state32)[0], truth),
                        rel_err(state32.wkv, state64.wkv))
        logits = kernel.step(idx, *tensors_of(state), threads=KERNEL_THREADS)
        kernel_err = max(kernel_err, rel_err(logits, truth), rel_err(state.wkv, state64.wkv))
    assert torch_err > 3e-6  # the premise: this model is ill-conditioned in float32
    assert kernel_err <= 4 * torch_err


@needs_cc
def test_cpu_step_odd_head_size_and_one_thread():
    # head_size 12 and C = 36: every vector loop has a remainder; one head per stream.
    model = perturbed(ModelConfig(n_layer=2, n_embd=36, head_size=12, vocab_size=50, d_gate=40), seed=3)
    kernel = kernel_for(model)
    compare_steps(model, kernel, batch=2, n_tokens=10, threads=1)
    compare_steps(model, kernel, batch=2, n_tokens=10, seed=1)


@needs_cc
def test_cpu_step_layer_norm_in_several_blocks():
    # C = 576: the layer-norm phases cut a stream's channels into blocks of 512, the last short.
    model = perturbed(ModelConfig(n_layer=1, n_embd=576, head_size=64, vocab_size=60), seed=0)
    compare_steps(model, kernel_for(model), batch=2, n_tokens=12, well_conditioned=True)


@needs_cc
def test_cpu_step_sees_weights_copied_in_place():
    model = random_model(n_layer=2, n_embd=64, seed=5)
    kernel = kernel_for(model)
    idx = torch.tensor([7, 11])
    state0 = model.init_state(2)
    kernel.step(idx, *tensors_of(state0.clone()))
    new = random_model(n_layer=2, n_embd=64, seed=6)
    with torch.no_grad():
        for p, q in zip(model.parameters(), new.parameters(), strict=True):
            p.copy_(q)
    ref_state, state = state0.clone(), state0.clone()
    ref, _ = new.step(idx, ref_state)
    assert rel_err(kernel.step(idx, *tensors_of(state)), ref) <= TOLERANCE
    assert rel_err(state.wkv, ref_state.wkv) <= TOLERANCE


@needs_cc
def test_cpu_step_rebinds_replaced_parameter():
    model = random_model(n_layer=2, n_embd=64, seed=7)
    kernel = kernel_for(model)
    idx = torch.tensor([3])
    before = kernel.step(idx, *tensors_of(model.init_state(1)))
    model.head.weight = nn.Parameter(torch.randn_like(model.head.weight))
    model.blocks[1].ffn.value.weight.data = torch.randn_like(model.blocks[1].ffn.value.weight)
    ref, _ = model.step(idx, model.init_state(1))
    after = kernel.step(idx, *tensors_of(model.init_state(1)))
    assert rel_err(after, ref) <= TOLERANCE
    assert rel_err(after, before) > 0.1


@needs_cc
def test_cpu_step_weights_fixed_checks_once_on_entry():
    model = random_model(n_layer=2, n_embd=64, seed=7)
    kernel = kernel_for(model)
    idx = torch.tensor([3])

    def fresh():
        return tensors_of(model.init_state(1))

    kernel.step(idx, *fresh())
    model.head.weight = nn.Parameter(torch.randn_like(model.head.weight))  # before the block: seen on entry
    with kernel.weights_fixed():
        inside = kernel.step(idx, *fresh())
        ref, _ = model.step(idx, model.init_state(1))
        assert rel_err(inside, ref) <= TOLERANCE
        # Inside, the caller promised no changes, and none is looked for; the storage bound
        # stays alive, so a broken promise gives the old weights, never freed memory.
        model.head.weight = nn.Parameter(torch.randn_like(model.head.weight))
        assert torch.equal(kernel.step(idx, *fresh()), inside)
        ref, _ = model.step(idx, model.init_state(1))
        with kernel.weights_fixed():  # blocks nest, and each checks on entry
            assert rel_err(kernel.step(idx, *fresh()), ref) <= TOLERANCE
    model.head.weight = nn.Parameter(torch.randn_like(model.head.weight))
    ref, _ = model.step(idx, model.init_state(1))
    assert rel_err(kernel.step(idx, *fresh()), ref) <= TOLERANCE  # checked on every call again
    assert rel_err(ref, inside) > 0.1


def test_cpu_step_missing_compiler_gives_none(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(cpu_step.COMPILER_ENV, str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(cpu_step.CACHE_ENV, str(tmp_path / "cache"))
    model = random_model(n_layer=2, n_embd=64, seed=8)
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_step"):
        assert CpuStepKernel.for_model(model) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no-such-cc" in lines[0] and "PyTorch step" in lines[0]
    # The fallback: the routing answers None, RWKV7.step still runs (the PyTorch step).
    monkeypatch.setenv(cpu_step.DISABLE_ENV, "0")
    assert cpu_step_kernel(model) is None
    logits, _ = model.step(torch.tensor([1]), model.init_state(1))
    assert torch.isfinite(logits).all()


def test_cpu_step_failing_compiler_gives_none(monkeypatch, tmp_path, caplog):
    # A "compiler" that exists and runs, but fails every build.
    monkeypatch.setenv(cpu_step.COMPILER_ENV, f"{shlex.quote(sys.executable)} -c 'raise SystemExit(1)'")
    monkeypatch.setenv(cpu_step.CACHE_ENV, str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_step"):
        assert CpuStepKernel.for_model(random_model(n_layer=2, n_embd=64)) is None
    assert len(caplog.records) == 1 and "could not build" in caplog.records[0].getMessage()
    assert not list((tmp_path / "cache" / "cpu").glob("*.so"))


@needs_cc
def test_cpu_step_rejects_float64_model(caplog):
    model = random_model(n_layer=2, n_embd=64).double()
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_step"):
        assert CpuStepKernel.for_model(model) is None
    assert "float64" in caplog.records[-1].getMessage()


@needs_cc
def test_cpu_step_refuses_a_model_turned_float64_after_binding():
    model = random_model(n_layer=2, n_embd=64)
    kernel = kernel_for(model)
    model.double()
    with pytest.raises(cpu_step.CpuStepUnavailableError, match="float64"):
        kernel.step(torch.tensor([1]), *tensors_of(model.init_state(1)))


@needs_cc
def test_cpu_step_bad_token_leaves_state_untouched():
    model = random_model(n_layer=2, n_embd=64)
    kernel = kernel_for(model)
    state = model.init_state(2)
    kernel.step(torch.tensor([1, 2]), *tensors_of(state))
    before = state.clone()
    vocab = model.cfg.vocab_size
    with pytest.raises(CpuStepInputError, match=f"token id {vocab} is out of range"):
        kernel.step(torch.tensor([4, vocab]), *tensors_of(state))
    with pytest.raises(CpuStepInputError, match="token id -1"):
        kernel.step(torch.tensor([-1, 4]), *tensors_of(state))
    assert torch.equal(state.shift, before.shift) and torch.equal(state.wkv, before.wkv)
    with pytest.raises(CpuStepInputError, match="streams"):
        kernel.step(torch.tensor([4, 5, 6]), *tensors_of(state))
    with pytest.raises(CpuStepInputError, match="state.wkv: must be float32"):
        kernel.step(torch.tensor([4, 5]), state.shift, state.wkv.double())
    with pytest.raises(CpuStepInputError, match="state.shift: must be float32, contiguous"):
        kernel.step(torch.tensor([4, 5]), state.shift.transpose(2, 3).contiguous().transpose(2, 3), state.wkv)
    with pytest.raises(CpuStepInputError, match="1-D CPU tensor"):
        kernel.step(torch.tensor([[4, 5]]), *tensors_of(state))
    assert torch.equal(state.shift, before.shift) and torch.equal(state.wkv, before.wkv)
    # ids of another integer type are taken as they are
    assert torch.equal(kernel.step(torch.tensor([4, 5], dtype=torch.int32), *tensors_of(state.clone())),
                       kernel.step(torch.tensor([4, 5]), *tensors_of(state.clone())))


def test_read_pass_takes_float32_buffers_of_any_length_and_refuses_others():
    # The floor `bench step` prints beside every figure: a read of the step's bytes through the
    # same threads and scheduler. Lengths that are not whole chunks, one after another (its
    # per-chunk sums are kept per length), on one thread, two, and as ThreadTimes choose.
    kernel = kernel_for(random_model(n_layer=2, n_embd=64))
    chunk = cpu_step.READ_CHUNK_FLOATS
    for n in (3 * chunk + 5, 1, 7 * chunk, 3 * chunk + 5):
        buffer = torch.randn(n)
        for threads in (1, 2, None):
            assert kernel.read_pass(buffer, threads=threads) is None
    with pytest.raises(CpuStepInputError, match="buffer: must be float32, contiguous"):
        kernel.read_pass(torch.randn(chunk, dtype=torch.float64))
    with pytest.raises(CpuStepInputError, match="buffer: must be float32, contiguous"):
        kernel.read_pass(torch.randn(64, 64).t())


@pytest.mark.parametrize("define", ["-DRWKV7_SCALAR", "-DRWKV7_NO_AVX512", "-DRWKV7_NO_THREADS"])
@needs_cc
def test_cpu_step_portable_builds_match(monkeypatch, define):
    # The scalar fallback, the AVX2 code (where the CPU has AVX-512) and the build without
    # helper threads, each compiled for real.
    monkeypatch.setenv(cpu_step.COMPILER_ENV, f"cc {define}")
    model = random_model(n_layer=3, n_embd=128, seed=WELL_CONDITIONED_SEED[3, 128])
    kernel = kernel_for(model)
    if define == "-DRWKV7_SCALAR":
        assert kernel.library.simd == "scalar"
    if define == "-DRWKV7_NO_AVX512":
        assert kernel.library.simd in ("avx2", "scalar")
    assert kernel.library.threads == (define != "-DRWKV7_NO_THREADS")
    compare_steps(model, kernel, batch=2, n_tokens=10, well_conditioned=True)


@needs_cc
def test_bench_step_smoke():
    # In a subprocess: importing the rwkv package flips global TorchScript switches.
    result = subprocess.run(
        [sys.executable, "-m", "tools", "bench", "step", "--json", "--configs", "L1-D64",
         "--tokens", "3", "--rounds", "2", "--threads", "1", "--streams", "1,2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    (config,) = report["configs"]
    assert config["config"] == "L1-D64" and config["agrees"]
    formats = ("fp32", "bf16", "int8")
    timed = set(config["ms_per_token"])
    llama = {f"llama_{w}" for w in formats}  # the optional llama.cpp peer, where installed
    assert timed - llama == ({f"kernel_{w}" for w in formats} | {f"read_{w}" for w in formats}
                             | {"torch_step", "package", "streams_2"})
    if timed & llama:
        assert timed >= llama and config["agreement"]["llama_fp32"] <= 1e-4
    assert config["agreement"]["kernel_fp32"] <= 1e-4
    assert config["agreement"]["kernel_bf16"] < 0.1  # reduced precision, near but not equal
    assert all(config["ratio"][w] > 0 and config["x_floor"][w] > 0 for w in formats)
    assert config["bytes_per_token"]["int8"] < config["bytes_per_token"]["bf16"] < config["bytes_per_token"]["fp32"]
    assert config["streams_ratio"]["2"] > 0
    # a round trip between two threads in each round (at most about 50 ms: a busy machine ends it early)
    assert len(config["round_trip_ns"]) == 2 and all(0 < t < 1e8 for t in config["round_trip_ns"])


@needs_cc
def test_round_trip_between_two_threads_is_timed(monkeypatch):
    # bench step's note on where the threads ran: a real round trip, one trip or many
    library = cpu_step.load_library()
    assert all(0 < library.round_trip_ns(trips) < 1e8 for trips in (1, 500))
    monkeypatch.setenv(cpu_step.COMPILER_ENV, "cc -DRWKV7_NO_THREADS")
    assert cpu_step.load_library().round_trip_ns() is None  # nobody to pass the line to


@needs_cc
def test_bench_phases_accounts_for_the_whole_token():
    result = subprocess.run(
        [sys.executable, "-m", "tools", "bench", "phases", "--json", "--configs", "L2-D64",
         "--tokens", "30", "--streams", "1,2", "--threads", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reports = json.loads(result.stdout)["reports"]
    assert [r["streams"] for r in reports] == [1, 2]
    names = cpu_step.load_library().phase_names
    for report in reports:
        rows = {row["phase"]: row for row in report["rows"]}
        assert list(rows) == [*names, "outside the phases"]
        inside = sum(rows[n]["ms"] for n in names)
        assert 0 < inside <= report["call_ms"]  # the phases happen inside the call
        assert abs(inside + rows["outside the phases"]["ms"] - report["call_ms"]) < 1e-9
        for matvec in ("proj", "out", "ffn_key", "ffn_value"):
            assert rows[matvec]["mb"] > 0 and rows[matvec]["gb_per_s"] > 0 and rows[matvec]["busy_ms"] > 0
        assert rows["heads"]["mb"] == 0 and rows["heads"]["busy_ms"] > 0
    # The ordinary build has no profile to give.
    library = cpu_step.load_library()
    assert not library.profiling
    with pytest.raises(cpu_step.CpuStepUnavailableError, match="profile"):
        library.phase_times()


@needs_cc
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_cpu_step_same_bits_on_any_thread_count(weights):
    # Chunks are fixed by the sizes, not by the threads, so who runs them changes nothing. At
    # 256 channels each matrix is several chunks, and a claim takes several of them at once
    # (how many depends on the thread count): a row's sum must not depend on the claim.
    model = random_model(n_layer=2, n_embd=256, seed=4)
    kernel = CpuStepKernel.for_model(model, weights)
    assert kernel is not None
    states = {n: model.init_state(3) for n in (1, 2, 3, None)}
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(0, model.cfg.vocab_size, (3,), generator=gen)
        logits = {n: kernel.step(idx, *tensors_of(s), threads=n) for n, s in states.items()}
        for n in (2, 3, None):
            assert torch.equal(logits[n], logits[1])
            assert torch.equal(states[n].wkv, states[1].wkv) and torch.equal(states[n].shift, states[1].shift)


@needs_cc
@pytest.mark.parametrize("one_thread_s, far", [
    (0.0024, False),  # close (1.2x): the other option is tried every 16th call
    (0.005, True),  # far (2.5x): every 256th
])
def test_thread_choice_runs_the_faster_option_and_keeps_checking_the_other(one_thread_s, far):
    choice = ThreadTimes(cpu_step.load_library())
    explore_every = choice.explore_far_every if far else choice.explore_every
    seen = []
    for _ in range(2 * choice.warmup):  # both options are tried first
        n = choice.choose(4)
        seen.append(n)
        choice.record(n, 0.002 if n == 4 else one_thread_s)
    assert sorted(set(seen)) == [1, 4]
    picks = [choice.choose(4) for _ in range(4 * explore_every)]
    assert picks.count(1) == 4 and picks.count(4) == len(picks) - 4
    for _ in range(choice.window):  # the machine got busy: one thread is faster now
        choice.record(4, 0.009)
    assert choice.choose(4) == 1
    assert ThreadTimes(cpu_step.load_library()).choose(1) == 1
    choice.record(4, 0.001)  # one fast time out of five does not move the median
    assert choice.choose(4) == 1


@needs_cc
def test_thread_choice_starts_over_when_the_thread_count_changes():
    choice = ThreadTimes(cpu_step.load_library())
    for _ in range(2 * choice.warmup):
        n = choice.choose(4)
        choice.record(n, 0.001 if n == 4 else 0.002)
    assert choice.choose(4) == 4
    # torch.set_num_threads(2): the times of 4 threads say nothing about 2, so both are tried
    assert [choice.choose(2) for _ in range(choice.warmup)] == [1] * choice.warmup


@needs_cc
def test_cpu_step_refuses_more_layers_than_its_scheduler_counts():
    # The shared counter holds 4,095 phases: 1 + 7 per layer + 2, so 584 layers fit and 585 do
    # not. One block stands for all of them (building 585 takes seconds); the kernel reads each
    # layer's parameters by address and does not mind that they are the same.
    for n_layer, fits in ((584, True), (585, False)):
        model = RWKV7(ModelConfig(n_layer=1, n_embd=64, vocab_size=16))
        model.blocks = nn.ModuleList([model.blocks[0]] * n_layer)
        model.cfg = dataclasses.replace(model.cfg, n_layer=n_layer)
        kernel = CpuStepKernel.for_model(model)
        assert kernel is not None
        state = model.init_state(1)
        before = state.shift.clone()
        if fits:
            kernel.step(torch.tensor([3]), *tensors_of(state))
            assert not torch.equal(state.shift, before)
            continue
        with pytest.raises(cpu_step.CpuStepUnavailableError, match="585 layers at 1 streams"):
            kernel.step(torch.tensor([3]), *tensors_of(state))
        assert torch.equal(state.shift, before)  # refused before it ran
