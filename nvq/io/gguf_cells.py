"""Rounding cells of GGUF tensors: for every stored value, the interval of original values that
the storage type would have rounded to it.

A lossy oracle (Q8_0, Q4_K, ...) is the original weight W rounded onto the type's grid, so W lies
in the cell of each oracle value. `nvq.verify.noise` draws plausible originals uniformly from these
cells; quantizing such a draw the candidate's way gives an expected candidate whose error against the
oracle has both noises in it, correlations included.

Grids with a uniform step per block (legacy and K-quants) are read without parsing their scale
packing: dequantizing the block with every code set to 1 and to 0 gives the step of each element
(`_CODE_BYTES`). E2M1 grids (MXFP4, NVFP4) get that unit the same way and their non-uniform cells
from `E2M1_CELLS`. Float types have their ulp. IQ codebook types have no such structure here; their
step is estimated from each block's range (`approximate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nvq.io import gguf_torch
from nvq.io.gguf import GGUFFile, GGUFTensor

EXACT_TYPES = frozenset({"F32", "F64", "I8", "I16", "I32", "I64"})
# float types: explicit mantissa bits and the smallest ulp (subnormal spacing)
FLOAT_ULPS = {"F16": (10, 2.0**-24), "BF16": (7, 2.0**-133)}

# Uniform-grid block types: byte ranges of the codes in one block, the byte that sets every code
# there to 0 and the one that sets it to 1, plus high-bit ranges forced to a fixed byte (Q5 qh = 0;
# Q3_K hmask = 0xFF, which makes its high offset 0). Layouts: gguf-py quants.py dequantize_blocks.
_CODE_BYTES: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "Q8_0": ((2, 34, 0x00, 0x01),),
    "Q4_0": ((2, 18, 0x00, 0x11),),
    "Q4_1": ((4, 20, 0x00, 0x11),),
    "Q5_0": ((2, 6, 0x00, 0x00), (6, 22, 0x00, 0x11)),
    "Q5_1": ((4, 8, 0x00, 0x00), (8, 24, 0x00, 0x11)),
    "Q2_K": ((16, 80, 0x00, 0x55),),
    "Q3_K": ((0, 32, 0xFF, 0xFF), (32, 96, 0x00, 0x55)),
    "Q4_K": ((16, 144, 0x00, 0x11),),
    "Q5_K": ((16, 48, 0x00, 0x00), (48, 176, 0x00, 0x11)),
    "Q6_K": ((0, 128, 0x00, 0x11), (128, 192, 0x00, 0x00)),
    "MXFP4": ((1, 17, 0x00, 0x11),),
    "NVFP4": ((4, 36, 0x00, 0x11),),
}
# E2M1 magnitude -> (lower, upper) edge of its rounding cell, in E2M1 units (RNE midpoints).
E2M1_CELLS = {0.0: (-0.25, 0.25), 0.5: (-0.25, 0.25), 1.0: (-0.25, 0.25), 1.5: (-0.25, 0.25),
              2.0: (-0.25, 0.5), 3.0: (-0.5, 0.5), 4.0: (-0.5, 1.0)}
# The top value's cell depends on the scale rule. NVFP4 maps a block's largest magnitude onto 6;
# ggml's MXFP4 takes the exponent floor(log2 amax) − 2, so magnitudes up to 8 clip to 6.
# Code 1 is E2M1 0.5 in both, so the unit read off the grid is half a step.
E2M1_TOP_CELL = {"MXFP4": (-1.0, 2.0), "NVFP4": (-1.0, 0.0)}
# IQ codebook types: effective levels per block for the range-based estimate
_IQ_LEVELS = {"IQ4_NL": 16, "IQ4_XS": 16, "IQ3_XXS": 8, "IQ3_S": 8, "IQ2_XXS": 4, "IQ2_XS": 4,
              "IQ2_S": 4, "IQ1_S": 3, "IQ1_M": 3, "TQ1_0": 3, "TQ2_0": 3, "Q1_0": 2}


@dataclass(frozen=True)
class Cells:
    """Per element, the cell [value + lower, value + upper] of original values behind it."""

    lower: torch.Tensor  # ≤ 0
    upper: torch.Tensor  # ≥ 0
    approximate: bool = False  # estimated from block ranges (IQ types), not read off the grid

    def width(self) -> torch.Tensor:
        return self.upper - self.lower


def is_exact(type_name: str) -> bool:
    return type_name in EXACT_TYPES


def is_modelled(type_name: str) -> bool:
    return type_name in EXACT_TYPES or type_name in FLOAT_ULPS or type_name in _CODE_BYTES or type_name in _IQ_LEVELS


def read_cells(gf: GGUFFile, name: str, start: int, stop: int, values: torch.Tensor) -> Cells | None:
    """Cells of rows start..stop of tensor `name` (2-D view), whose dequantized values are
    `values` ([rows, ne0] float32). None for exact types."""
    t = gf.info(name)
    kind = t.type_name
    if kind in EXACT_TYPES:
        return None
    if kind in FLOAT_ULPS:
        half = _float_ulp(values, *FLOAT_ULPS[kind]) / 2
        return Cells(-half, half)
    if kind in _CODE_BYTES:
        unit = _code_unit(gf, t, start, stop, values.device).abs()
        if kind in E2M1_TOP_CELL:
            return _e2m1_cells(values, unit * 2, E2M1_TOP_CELL[kind])
        return Cells(-unit / 2, unit / 2)
    if kind in _IQ_LEVELS:
        return _range_cells(values, t, _IQ_LEVELS[kind])
    return None


def _float_ulp(x: torch.Tensor, mantissa_bits: int, smallest: float) -> torch.Tensor:
    _, exp = torch.frexp(x.float())  # x = m·2^exp, 0.5 ≤ |m| < 1
    ulp = torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - 1 - mantissa_bits)
    return torch.clamp(ulp, min=smallest)


def _code_unit(gf: GGUFFile, t: GGUFTensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """dequant(all codes 1) − dequant(all codes 0): the grid step of every element."""
    from gguf import GGMLQuantizationType, quants

    raw = _raw_rows(gf, t, start, stop)
    if t.type_name in gguf_torch.STEPS:  # read straight off the block scales, on the device
        rows = torch.from_numpy(raw).to(device).reshape(stop - start, t.row_bytes)
        return gguf_torch.step_rows(rows, t.type_name, t.ne[0])
    blocks = raw.reshape(-1, t.type_size)
    out = []
    for pick in (2, 3):  # zero byte, one byte
        b = blocks.copy()
        for region in _CODE_BYTES[t.type_name]:
            b[:, region[0]:region[1]] = region[pick]
        out.append(quants.dequantize(b.reshape(stop - start, t.row_bytes), GGMLQuantizationType(t.ggml_type)))
    return torch.from_numpy(np.ascontiguousarray(out[1] - out[0], dtype=np.float32)).to(device)


def _raw_rows(gf: GGUFFile, t: GGUFTensor, start: int, stop: int) -> np.ndarray:
    from nvq.io.files import pread_exact

    return pread_exact(t.path, t.offset + start * t.row_bytes, (stop - start) * t.row_bytes,
                       f"tensor '{t.name}'")


def _e2m1_cells(values: torch.Tensor, step: torch.Tensor, top: tuple[float, float]) -> Cells:
    safe = torch.where(step > 0, step, torch.ones_like(step))
    mag = (values.abs() / safe).round(decimals=3)
    lower, upper = torch.zeros_like(values), torch.zeros_like(values)
    for m, (lo, hi) in {**E2M1_CELLS, 6.0: top}.items():
        hit = mag == m
        lower = torch.where(hit, lo * step, lower)
        upper = torch.where(hit, hi * step, upper)
    # a negative value's cell is the mirror image of its magnitude's
    neg = values < 0
    return Cells(torch.where(neg, -upper, lower), torch.where(neg, -lower, upper))


def _range_cells(values: torch.Tensor, t: GGUFTensor, levels: int) -> Cells:
    blocks = values.reshape(values.shape[0], -1, t.block_size)
    span = blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)
    half = (span / (levels - 1) / 2).expand_as(blocks).reshape(values.shape)
    return Cells(-half, half, approximate=True)
