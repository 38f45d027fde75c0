"""Reduced-precision weights in the CPU step (kernels/weight_formats.py, rwkv7_step.c).

A kernel with bf16 or int8 matrices must compute exactly what the PyTorch step computes on the
float32 matrices those bytes stand for (`unpack(pack(w))`), to the float32 tolerance of the fp32
kernel; how far that is from the float32 model is a property of the format, reported by
`rwkv-music evaluate --weights` on real music, not asserted here.
"""

import copy
import shutil
import subprocess
import sys

import pytest
import torch

from kernels import cpu_step, huge_pages
from kernels.cpu_step import CpuStepKernel, cpu_step_kernel, pack_for_kernel
from kernels.weight_formats import INT8_LEVELS, pack, unpack
from model import RWKV7, ModelConfig
from tests.model_factory import random_model
from tests.test_cpu_step import private_cache  # noqa: F401 - its autouse fixture serves here too

TOLERANCE = 1e-5
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")
PACKED = ("bf16", "int8")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def with_unpacked_matrices(model: RWKV7, kernel: CpuStepKernel) -> RWKV7:
    """A copy of `model` whose packable matrices hold what the kernel's packed bytes stand for."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            short = name.split(".", 2)[2] if name.startswith("blocks.") else name
            if short in kernel.library.packable:
                stored = unpack(pack_for_kernel(kernel.library, short, p.detach(), kernel.weights))
                p.copy_(stored.t() if short in kernel.library.transposed else stored)
    return twin


def compare_with_unpacked(model: RWKV7, weights: str, batch: int, n_tokens: int, threads: int = 2) -> None:
    kernel = CpuStepKernel.for_model(model, weights)
    assert kernel is not None, "the C compiler should build the kernel on this machine"
    reference = with_unpacked_matrices(model, kernel)
    gen = torch.Generator().manual_seed(batch)
    ref_state, state = model.init_state(batch), model.init_state(batch)
    for t in range(n_tokens):
        idx = torch.randint(0, model.cfg.vocab_size, (batch,), generator=gen)
        ref_logits, _ = reference.step(idx, ref_state)
        logits = kernel.step(idx, state.shift, state.wkv, threads=threads)
        assert rel_err(logits, ref_logits) <= TOLERANCE, f"logits at token {t}"
        assert rel_err(state.wkv, ref_state.wkv) <= TOLERANCE, f"wkv state at token {t}"


def test_weight_formats_pack_unpack():
    torch.manual_seed(0)
    w = torch.randn(37, 100) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different sizes
    w[3] = 0.0  # an all-zero row must stay zero (scale 1, not 0/0)
    for pair in (1, 8, 16):  # the portable, AVX2 and AVX-512 builds' pairing
        tile = 2 * pair
        bf16 = pack(w, "bf16", pair, tile)
        tiles = -(-37 // tile)  # the last tile padded with zero rows
        assert bf16.data.shape == (tiles, 100, tile) and bf16.data.dtype == torch.int16
        assert torch.equal(unpack(bf16), w.to(torch.bfloat16).float())
        assert bf16.nbytes == tiles * tile * 100 * 2
    bits = w.to(torch.bfloat16).view(torch.int16)
    block = pack(w, "bf16", 8, 16).data[0, 5]  # tile 0 (rows 0-15), input 5: paired 8 apart
    assert block[0] == bits[0, 5] and block[1] == bits[8, 5] and block[2] == bits[1, 5]
    assert torch.equal(pack(w, "bf16", 8, 16).data[2, 5, ::2][:5], bits[32:37, 5])  # tile 2: rows 32-36
    assert torch.all(pack(w, "bf16", 8, 16).data[2, :, 1::2] == 0)  # and padding
    int8 = pack(w, "int8", 16, 32)
    assert int8.data.dtype == torch.int8 and int8.data.shape == (2, 100, 32) and int8.scale.shape == (37,)
    assert torch.equal(int8.data[1, :, 4].float() * int8.scale[36], unpack(int8)[36])  # unpaired
    err = (unpack(int8) - w).abs()
    assert torch.all(err <= int8.scale[:, None] / 2 * (1 + 1e-6))  # rounding to nearest level
    assert torch.all(unpack(int8)[3] == 0) and int8.data.abs().max() == INT8_LEVELS
    assert torch.equal(unpack(pack(w, "fp32")), w)
    with pytest.raises(ValueError, match="fp16"):
        pack(w, "fp16")
    with pytest.raises(ValueError, match="pairs"):
        pack(w, "bf16", 8, 32)


def test_the_format_names_and_every_command_line_parser_leave_torch_unimported():
    # `rwkv-music watch` and every --help build the whole parser, which names the formats: with
    # torch imported on the way they took about 3 s to start (and longer on a busy machine)
    code = ("import sys; from kernels.weight_formats import DEFAULT_WEIGHTS; from tools.cli import build_parser; "
            "build_parser(); sys.exit('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:] or "torch was imported"


@pytest.mark.parametrize("weights", PACKED)
@pytest.mark.parametrize("batch", [1, 2, 7])  # one stream; a pair; fours, a pair and one
@needs_cc
def test_cpu_step_packed_matches_torch_step_on_unpacked(weights, batch):
    model = random_model(n_layer=2, n_embd=128, seed=1)
    compare_with_unpacked(model, weights, batch, n_tokens=12)


@pytest.mark.parametrize("weights", PACKED)
@pytest.mark.parametrize("n_embd, head_size", [(96, 32), (36, 12)])
@needs_cc
def test_cpu_step_packed_partial_rows_and_runs(weights, n_embd, head_size):
    # V = 53 and C = 36 are not whole output tiles (16 rows on AVX2, 32 on AVX-512): zero
    # padding that must never reach an output; C = 96 is 3 tiles on AVX-512, so runs of tiles
    # of unequal length; one thread and two give the same answer.
    cfg = ModelConfig(n_layer=2, n_embd=n_embd, head_size=head_size, vocab_size=53)
    torch.manual_seed(2)
    model = RWKV7(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0) if name == "emb.weight" else p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    compare_with_unpacked(model, weights, batch=3, n_tokens=8, threads=1)
    compare_with_unpacked(model, weights, batch=3, n_tokens=8, threads=2)


@needs_cc
def test_cpu_step_packed_repacks_after_in_place_change():
    model = random_model(n_layer=2, n_embd=64, seed=5)
    kernel = CpuStepKernel.for_model(model, "bf16")
    idx = torch.tensor([7])
    state = model.init_state(1)
    before = kernel.step(idx, state.shift, state.wkv)
    new = random_model(n_layer=2, n_embd=64, seed=6)
    model.load_state_dict(new.state_dict())  # in place: same storage, version counters move
    state = model.init_state(1)
    after = kernel.step(idx, state.shift, state.wkv)
    ref, _ = with_unpacked_matrices(new, kernel).step(idx, new.init_state(1))
    assert rel_err(after, ref) <= TOLERANCE and rel_err(after, before) > 0.1


@needs_cc
def test_cpu_step_bytes_per_token_and_routing(monkeypatch):
    model = random_model(n_layer=2, n_embd=128, seed=0)
    params = dict(model.named_parameters())
    emb = params["emb.weight"]
    fp32 = sum(p.numel() * 4 for p in params.values()) - emb.numel() * 4 + emb.shape[1] * 4
    kernels = {w: CpuStepKernel.for_model(model, w) for w in ("fp32", "bf16", "int8")}
    assert kernels["fp32"].bytes_per_token == fp32
    library = kernels["fp32"].library
    packable = [(name.split(".", 2)[2] if name.startswith("blocks.") else name, p) for name, p in params.items()]
    packable = [(short, p) for short, p in packable if short in library.packable]
    # head; r, k, v, output, FFN key and value; the 8 LoRA matrices (packed as their transposes)
    assert len(packable) == 1 + 14 * model.cfg.n_layer
    assert sum(short in library.transposed for short, _ in packable) == 8 * model.cfg.n_layer
    for w in ("bf16", "int8"):  # the packed matrices (padded tiles, scales) and the float32 rest
        expected = fp32 - sum(p.numel() * 4 for _, p in packable)
        expected += sum(pack_for_kernel(library, short, p.detach(), w).nbytes for short, p in packable)
        assert kernels[w].bytes_per_token == expected
    assert kernels["int8"].bytes_per_token < kernels["bf16"].bytes_per_token < 0.6 * fp32
    # RWKV7.step routes through the kernel of the model's step_weights
    monkeypatch.delenv(cpu_step.DISABLE_ENV)
    model.step_weights = "int8"
    idx = torch.tensor([5, 9])
    state, ref_state = model.init_state(2), model.init_state(2)
    logits, _ = model.step(idx, state)
    ref = cpu_step_kernel(model, "int8").step(idx, ref_state.shift, ref_state.wkv)
    assert torch.equal(logits, ref)
    model.step_weights = "fp16"
    with pytest.raises(ValueError, match="allowed: fp32, bf16, int8"):
        model.step(idx, state)


@needs_cc
def test_cpu_step_packed_portable_build(monkeypatch):
    # The scalar fallback widens bf16 and int8 one weight at a time: same results.
    monkeypatch.setenv(cpu_step.COMPILER_ENV, "cc -DRWKV7_SCALAR")
    model = random_model(n_layer=2, n_embd=64, seed=3)
    for weights in PACKED:
        assert CpuStepKernel.for_model(model, weights).library.simd == "scalar"
        compare_with_unpacked(model, weights, batch=5, n_tokens=6)


def test_engine_keeps_its_weight_format_across_a_swap():
    from daemon.engine import Engine
    from model import load
    from tools.complete import default_checkpoint

    checkpoint = default_checkpoint()
    if not checkpoint.is_file():
        pytest.skip("checkpoints/default.safetensors is not present")
    model, meta = load(checkpoint)
    engine = Engine(model, meta, step_weights="int8")
    assert model.step_weights == "int8"
    new_model, new_meta = load(checkpoint)
    engine.swap_model(new_model, new_meta)
    assert new_model.step_weights == "int8"
    with pytest.raises(ValueError, match="allowed"):
        Engine(new_model, new_meta, step_weights="fp8")


def first_line_after(t: torch.Tensor) -> int:
    """The address of the first cache line (huge_pages.ALIGN) at or after the end of `t`."""
    return -(-(t.data_ptr() + t.nbytes) // huge_pages.ALIGN) * huge_pages.ALIGN


def test_huge_pages_gather_keeps_values_and_places_one_after_another():
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int16),
               torch.randint(-127, 128, (4, 33), dtype=torch.int8)]
    placed = huge_pages.gather(tensors)
    for t, p in zip(tensors, placed, strict=True):
        assert p.dtype == t.dtype and p.shape == t.shape and torch.equal(p, t)
        assert p.data_ptr() % huge_pages.ALIGN == 0
    assert placed[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    # one buffer, in order: each starts at the first cache line after the one before
    for a, b in zip(placed, placed[1:]):
        assert b.data_ptr() == first_line_after(a)
    floats = huge_pages.huge_page_floats(1000)
    assert floats.dtype == torch.float32 and torch.equal(floats, torch.ones(1000))


@needs_cc
def test_cpu_step_packed_weights_live_in_one_buffer():
    model = random_model(n_layer=2, n_embd=128, seed=3)
    kernel = CpuStepKernel.for_model(model, "bf16")
    assert kernel is not None
    packed = [m.data for m in kernel._current_binding().packed]
    assert packed[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    for a, b in zip(packed, packed[1:]):  # in the order of the layout table, back to back
        assert b.data_ptr() == first_line_after(a)
