"""Reduced-precision storage of weight matrices for the compiled CPU step.

A token at batch 1 reads every weight once, so its floor is the bytes read divided by the
memory bandwidth; storing the large matrices in fewer bytes lowers that floor. The formats:

    fp32  the float32 matrix itself (4 bytes a weight)
    bf16  the top 16 bits of each float32, rounded to nearest even (2 bytes a weight): the
          kernel widens a weight back with a 16-bit shift, exactly
    int8  symmetric per-row quantisation (1 byte a weight + one float32 scale per row):
          w[r, i] ~ q[r, i] * scale[r], scale[r] = max_i |w[r, i]| / 127, q = round(w / scale)

Packed matrices are row-major with each row padded with zero columns to a multiple of
COLUMN_PAD (COLUMN_PAD in rwkv7_step.c), and bf16 columns are
paired: in each block of 2 * pair columns, 32-bit word j holds column j (low half) and column
pair + j (high half), so that one vector load widens to two float vectors with a shift and a
mask (pair = the kernel's vector width; 1 = plain order). fp32 matrices are the model's own,
row-major, read in place.

A matrix may also be packed in column tiles (`tile` columns, a multiple of 2 * pair that
divides COLUMN_PAD): the padded rows are cut into blocks of `tile` columns, stored block by
block, [cols / tile][rows][tile], so that one block is one run of memory. The kernel stores the
LoRA up-projections so: it sums along their rows for a block of outputs at a time (no
horizontal sums of their 32-128-column rows).

`pack` makes the tensors the kernel reads; `unpack` gives back the float32 matrix those bytes
stand for, so a test can run the PyTorch reference step on exactly the weights the kernel uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The names the settings use, and the codes the C side uses (W_FP32, W_BF16, W_INT8).
WEIGHT_FORMATS: dict[str, int] = {"fp32": 0, "bf16": 1, "int8": 2}
# The default of [daemon] weights, `complete --weights` and `bench step --target-weights`,
# chosen by measurement (docs/cpu-step.md, "Weight formats").
DEFAULT_WEIGHTS = "bf16"
INT8_LEVELS = 127  # q in [-127, 127]: symmetric, so -128 is never used and 0 stays exact
COLUMN_PAD = 32  # packed rows are padded to a multiple of this many columns


@dataclass(frozen=True)
class PackedMatrix:
    """One matrix [rows, cols] as the kernel reads it: `data` is the float32 matrix itself, or
    int16 (bf16 bits, paired columns) or int8 [rows, cols rounded up to COLUMN_PAD]; for int8,
    `scale` float32 [rows]. Tiled (`tile` > 0), data is [cols rounded up / tile, rows, tile]."""

    data: Tensor
    rows: int
    cols: int
    scale: Tensor | None = None
    pair: int = 1  # bf16 column pairing (see the module docstring)
    tile: int = 0  # columns of a tile, 0 when the rows are stored whole

    @property
    def nbytes(self) -> int:
        extra = self.scale.numel() * self.scale.element_size() if self.scale is not None else 0
        return self.data.numel() * self.data.element_size() + extra


def check_format(weights: str) -> str:
    """`weights` if it is a known format, else ValueError naming the allowed ones."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; allowed: {', '.join(WEIGHT_FORMATS)}")
    return weights


@torch.no_grad()
def pack(matrix: Tensor, weights: str, bf16_pair: int = 1, tile: int = 0) -> PackedMatrix:
    """A float32 matrix [rows, cols] in format `weights` (a new tensor unless fp32); bf16
    columns paired `bf16_pair` apart (the kernel's `CpuStepLibrary.bf16_pair`); with `tile`,
    bf16 or int8 stored in column tiles of that many columns (see the module docstring)."""
    check_format(weights)
    if tile:
        if weights == "fp32" or tile % (2 * bf16_pair) or COLUMN_PAD % tile:
            raise ValueError(f"column tiles of {tile} need bf16 or int8, a multiple of {2 * bf16_pair} "
                             f"columns that divides {COLUMN_PAD}")
        rows_packed = pack(matrix, weights, bf16_pair)
        data = rows_packed.data
        tiles = data.view(data.shape[0], data.shape[1] // tile, tile).transpose(0, 1).contiguous()
        return PackedMatrix(tiles, rows_packed.rows, rows_packed.cols, rows_packed.scale, rows_packed.pair, tile)
    rows, cols = matrix.shape
    if weights == "fp32":
        return PackedMatrix(matrix, rows, cols)
    if weights == "bf16":
        if bf16_pair < 1 or COLUMN_PAD % (2 * bf16_pair):
            raise ValueError(f"bf16 pair distance {bf16_pair} does not divide {COLUMN_PAD} columns in pairs")
        # torch's float32 -> bfloat16 conversion rounds to nearest even; int16 carries the bits
        padded = _padded(matrix.to(torch.bfloat16).view(torch.int16))
        blocks = padded.shape[1] // (2 * bf16_pair)
        paired = padded.view(rows, blocks, 2, bf16_pair).transpose(-1, -2)
        return PackedMatrix(paired.contiguous().view(padded.shape), rows, cols, pair=bf16_pair)
    peak = matrix.abs().amax(dim=1)  # [rows]
    scale = torch.where(peak > 0, peak / INT8_LEVELS, torch.ones_like(peak)).float()
    q = torch.round(matrix / scale[:, None]).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return PackedMatrix(_padded(q), rows, cols, scale.contiguous())


def _padded(matrix: Tensor) -> Tensor:
    """[rows, cols] -> [rows, cols rounded up to COLUMN_PAD], zero-padded, contiguous."""
    rows, cols = matrix.shape
    padded = matrix.new_zeros(rows, -(-cols // COLUMN_PAD) * COLUMN_PAD)
    padded[:, :cols] = matrix
    return padded


@torch.no_grad()
def unpack(packed: PackedMatrix) -> Tensor:
    """The float32 matrix [rows, cols] that the packed bytes stand for."""
    data = packed.data
    if data.dtype == torch.float32:
        return data.clone()
    if packed.tile:  # [blocks, rows, tile] -> [rows, blocks * tile]
        data = data.transpose(0, 1).reshape(packed.rows, -1)
    rows, width = data.shape
    if data.dtype == torch.int16:  # undo the column pairing
        p = packed.pair
        data = data.view(rows, width // (2 * p), p, 2).transpose(-1, -2).contiguous().view(rows, width)
    rows = data[:, :packed.cols]
    if data.dtype == torch.int16:
        return rows.contiguous().view(torch.bfloat16).float()
    assert packed.scale is not None
    return rows.float() * packed.scale[:, None]
