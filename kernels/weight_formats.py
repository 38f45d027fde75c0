"""Reduced-precision storage of weight matrices for the compiled CPU step.

A token at batch 1 reads every weight once, so its floor is the bytes read divided by the
memory bandwidth; storing the large matrices in fewer bytes lowers that floor. The formats:

    fp32  the float32 matrix itself (4 bytes a weight)
    bf16  the top 16 bits of each float32, rounded to nearest even (2 bytes a weight): the
          kernel widens a weight back with a 16-bit shift, exactly
    int8  symmetric per-row quantisation (1 byte a weight + one float32 scale per row):
          w[r, i] ~ q[r, i] * scale[r], scale[r] = max_i |w[r, i]| / 127, q = round(w / scale)

Packed matrices are given in nn.Linear form, [rows, cols] = [outputs, inputs], and stored in
output tiles of `tile` rows: [rows rounded up / tile][cols][tile], the rows padded with zeros to
whole tiles. Tile t holds outputs [t * tile, t * tile + tile), and for each input their `tile`
weights lie together, so the kernel loads one input's weights of a tile at once and sums down
the tile (rwkv7_step.c, linear_tiles). In bf16 those `tile` weights are paired: in each block
of 2 * pair, 32-bit word j holds weight j (low half) and weight pair + j (high half), so that
one vector load widens to two float vectors with a shift and a mask (pair = the kernel's vector
width, tile = 2 * pair; 1 and 2 in the portable build). fp32 matrices are the model's own,
row-major, read in place.

`pack` makes the tensors the kernel reads; `unpack` gives back the float32 matrix those bytes
stand for, so a test can run the PyTorch reference step on exactly the weights the kernel uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the names below serve every CLI command
    from torch import Tensor

# The names the settings use, and the codes the C side uses (W_FP32, W_BF16, W_INT8).
WEIGHT_FORMATS: dict[str, int] = {"fp32": 0, "bf16": 1, "int8": 2}
# The default of [daemon] weights, `complete --weights` and `bench step --target-weights`,
# chosen by measurement (docs/cpu-step.md, "Weight formats").
DEFAULT_WEIGHTS = "bf16"
INT8_LEVELS = 127  # q in [-127, 127]: symmetric, so -128 is never used and 0 stays exact


@dataclass(frozen=True)
class PackedMatrix:
    """One matrix [rows, cols] (nn.Linear form) as the kernel reads it: `data` is the float32
    matrix itself, or int16 (bf16 bits, paired) or int8 output tiles [rows rounded up / tile,
    cols, tile]; for int8, `scale` float32 [rows]."""

    data: Tensor
    rows: int
    cols: int
    scale: Tensor | None = None
    pair: int = 1  # bf16 pairing inside a tile's block of weights (see the module docstring)
    tile: int = 0  # rows of an output tile, 0 for fp32 (the matrix itself)

    @property
    def nbytes(self) -> int:
        extra = self.scale.numel() * self.scale.element_size() if self.scale is not None else 0
        return self.data.numel() * self.data.element_size() + extra


def check_format(weights: str) -> str:
    """`weights` if it is a known format, else ValueError naming the allowed ones."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; allowed: {', '.join(WEIGHT_FORMATS)}")
    return weights


def pack(matrix: Tensor, weights: str, bf16_pair: int = 1, tile: int = 2) -> PackedMatrix:
    """A float32 matrix [rows, cols] (nn.Linear form: rows are outputs) in format `weights`:
    fp32 the matrix itself; bf16 or int8 a new tensor of output tiles of `tile` rows, bf16
    paired `bf16_pair` apart (the kernel's `CpuStepLibrary.bf16_pair` and `tile`)."""
    import torch

    check_format(weights)
    matrix = matrix.detach()
    rows, cols = matrix.shape
    if weights == "fp32":
        return PackedMatrix(matrix, rows, cols)
    if bf16_pair < 1 or tile != 2 * bf16_pair:
        raise ValueError(f"output tiles of {tile} rows do not hold bf16 pairs {bf16_pair} apart")
    scale = None
    if weights == "bf16":  # torch's float32 -> bfloat16 conversion rounds to nearest even
        stored = matrix.to(torch.bfloat16).view(torch.int16)
    else:
        peak = matrix.abs().amax(dim=1)  # [rows]
        scale = torch.where(peak > 0, peak / INT8_LEVELS, torch.ones_like(peak)).float().contiguous()
        stored = torch.round(matrix / scale[:, None]).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    tiles = -(-rows // tile)
    padded = stored.new_zeros(tiles * tile, cols)
    padded[:rows] = stored
    data = padded.view(tiles, tile, cols).transpose(1, 2)  # [tiles, cols, tile]
    if weights == "bf16":  # in each input's block: word j = (weight j, weight pair + j)
        data = data.reshape(tiles, cols, 2, bf16_pair).transpose(-1, -2)
    return PackedMatrix(data.contiguous().view(tiles, cols, tile), rows, cols, scale, bf16_pair, tile)


def unpack(packed: PackedMatrix) -> Tensor:
    """The float32 matrix [rows, cols] that the packed bytes stand for."""
    import torch

    data = packed.data.detach()
    if data.dtype == torch.float32:
        return data.clone()
    tiles, cols, tile = data.shape
    if data.dtype == torch.int16:  # undo the pairing
        data = data.view(tiles, cols, packed.pair, 2).transpose(-1, -2).reshape(tiles, cols, tile)
    rows = data.transpose(1, 2).reshape(tiles * tile, cols)[:packed.rows]
    if data.dtype == torch.int16:
        return rows.contiguous().view(torch.bfloat16).float()
    assert packed.scale is not None
    return rows.float() * packed.scale[:, None]
