"""Grouped int4 codec of GPTQ checkpoints (formats.md §4): W = s·(q − z), one fp16 scale (and
zero point) per output row and group of G input columns, codes q in 0..15.

The quantizer is GPTQ's `Quantizer.find_params` (§4.3 step 7) with one deliberate difference:
a symmetric group whose values are all ≥ 0 gets the same scale 2·max|x|/15 as every other group
(the reference keeps xmin = 0 there, so its scale halves and the upper half of the values clips).
Scales are rounded to fp16 when they are fitted, so the codes chosen are the codes of the scale
stored on disk and dequantization here equals any reader's. Dead groups (all zero) get scale 1/7.5,
the reference's (−1, +1) range.

Groups are runs of G consecutive input columns, or, given a `g_idx` (act-order checkpoints,
§4.3 step 8), the sets of columns k with g_idx[k] = j: group j may then be any K/G columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nvq.formats.constants import FP16_MIN_SUBNORMAL, INT4_MAXQ, INT4_SYM_ZERO

__all__ = ["Int4Quantized", "check_g_idx", "check_group_size", "dequantize", "fit_params", "fit_range", "quantize",
           "quantize_codes"]


@dataclass(frozen=True, eq=False)
class Int4Quantized:
    codes: Tensor  # uint8 [N, K], 0..15
    scale: Tensor  # float16 [N, K/G]
    zero: Tensor  # uint8 [N, K/G]; 8 everywhere when symmetric
    group_size: int
    g_idx: Tensor | None = None  # int64 [K]: the group of each input column; None: k // G

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def check_group_size(k: int, group_size: int) -> int:
    """The effective group size (−1 means one group of K); ValueError when K does not tile."""
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {group_size}")
    return g


def check_g_idx(g_idx: Tensor, k: int, groups: int) -> Tensor:
    """g_idx as int64 [K]; ValueError unless it holds K group indices in [0, groups)."""
    if g_idx.dim() != 1 or g_idx.shape[0] != k or g_idx.is_floating_point():
        raise ValueError(f"g_idx has shape {list(g_idx.shape)} and dtype {g_idx.dtype}; "
                         f"it must hold {k} integer group indices")
    g = g_idx.long()
    bad = (g < 0) | (g >= groups)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"g_idx[{i}] = {int(g[i])} is outside [0, {groups}), the groups of the scales")
    return g


def fit_params(x: Tensor, sym: bool = True) -> tuple[Tensor, Tensor]:
    """Scale (fp32 holding fp16 values) and zero point (fp32 integers) per row of x `[..., G]`."""
    x = x.float()
    return fit_range(x.amin(dim=-1), x.amax(dim=-1), sym)


def fit_range(xmin: Tensor, xmax: Tensor, sym: bool = True) -> tuple[Tensor, Tensor]:
    """fit_params from each group's smallest and largest value."""
    xmin = xmin.float().clamp(max=0)
    xmax = xmax.float().clamp(min=0)
    if sym:
        m = torch.maximum(-xmin, xmax)
        xmin, xmax = -m, m
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    scale = ((xmax - xmin) / INT4_MAXQ).half().float().clamp(min=FP16_MIN_SUBNORMAL)
    if sym:
        zero = torch.full_like(scale, float(INT4_SYM_ZERO))
    else:
        zero = torch.round(-xmin / scale).clamp(0, INT4_MAXQ)
    return scale, zero


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """q = clamp(round(x/s) + z, 0, 15) with round-half-even, broadcast over the last dim."""
    return (torch.round(x.float() / scale) + zero).clamp(0, INT4_MAXQ)


def dequantize(q: Int4Quantized, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [N, K] = s·(q − z), each scale and zero spread over its group's columns."""
    if q.g_idx is not None:
        scale, zero = q.scale.float()[:, q.g_idx], q.zero.float()[:, q.g_idx]
    else:
        scale = q.scale.float().repeat_interleave(q.group_size, dim=1)
        zero = q.zero.float().repeat_interleave(q.group_size, dim=1)
    return (scale * (q.codes.float() - zero)).to(dtype)


def quantize(w: Tensor, group_size: int, sym: bool = True, g_idx: Tensor | None = None) -> Int4Quantized:
    """Round-to-nearest int4 of a [N, K] weight (GPTQ without calibration, `--method rtn`).

    With `g_idx` [K] (an act-order checkpoint's groups), group j is every column k with
    g_idx[k] = j instead of a run of G columns; a group with no column gets the dead-group scale.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    g = check_group_size(k, group_size)
    if g_idx is not None:
        return _quantize_indexed(w.float(), g, sym, check_g_idx(g_idx, k, k // g))
    groups = w.float().reshape(n, k // g, g)
    scale, zero = fit_params(groups, sym)
    codes = quantize_codes(groups, scale[..., None], zero[..., None]).reshape(n, k)
    return Int4Quantized(codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), g)


def _quantize_indexed(w: Tensor, g: int, sym: bool, g_idx: Tensor) -> Int4Quantized:
    n, k = w.shape
    index = g_idx.expand(n, k)
    empty = torch.zeros(n, k // g)  # a group without columns stays (0, 0): the dead-group scale
    xmin = empty.scatter_reduce(1, index, w, "amin", include_self=False)
    xmax = empty.scatter_reduce(1, index, w, "amax", include_self=False)
    scale, zero = fit_range(xmin, xmax, sym)
    codes = quantize_codes(w, scale[:, g_idx], zero[:, g_idx])
    return Int4Quantized(codes.to(torch.uint8), scale.half(), zero.to(torch.uint8), g, g_idx)
