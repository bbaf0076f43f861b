"""NVFP4 reference codec: E2M1 codes, one FP8 E4M3 scale per 16 elements, one fp32 tensor scale.

Two producer profiles are reproduced bit for bit; they are not bit-exact with each other
(formats.md §3.2), so the profile is always named:

* `Profile.CT`: compressed-tensors 0.20.0 as llm-compressor drives it (formats.md §1.2).
* `Profile.MODELOPT`: ModelOpt 0.47 `NVFP4QTensor.quantize` (formats.md §3.2).

Tensor-scale convention. `NVFP4Quantized.global_scale` is always a DIVISOR, as in
compressed-tensors: W ≈ e2m1 · s / g. ModelOpt stores a MULTIPLIER `weight_scale_2`
(W ≈ e2m1 · s · s2), and a fp32 reciprocal does not always round-trip (1/(1/s2) can be one
ulp off, formats.md §3.1), so the MODELOPT profile keeps the exact multiplier in
`weight_scale_2` and fills `global_scale` with fp32(1/s2) for uniformity. When
`weight_scale_2` is set, dequantize multiplies by it (ModelOpt, llama.cpp); when it is None,
dequantize divides by `global_scale` (compressed-tensors, vLLM). `weight_scale_2(q)` returns the
multiplier a ModelOpt or GGUF writer needs in both cases.

Non-finite policy. Before anything else NaN becomes 0 and ±Inf becomes ±(largest finite of the
weight dtype); `tensor_amax` applies the same rule. So a NaN weight encodes as code 0 and does
not move its block scale, and an Inf weight saturates like the dtype's largest value.
compressed-tensors has no usable behaviour here (an Inf amax gives g = 0 and NaN block
scales), and the nvq pipeline rejects non-finite weights before quantizing.

Deliberate divergence from ModelOpt: an all-zero weight (amax 0) makes ModelOpt divide 0/0 and
write NaN block scales; nvq uses weight_scale_2 = 1.0 there, so the blocks store 0x38 (1.0).
"""

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from nvq.formats import e2m1
from nvq.formats._blocks import check_dtype, check_weight, max_abs, sanitize, split_blocks
from nvq.formats.constants import (
    CT_ZERO_BLOCK_SCALE,
    E2M1_MAX,
    GLOBAL_SCALE_FALLBACK,
    MODELOPT_MIN_BLOCK_SCALE,
    MODELOPT_ZERO_BLOCK_SCALE,
    NVFP4_BLOCK,
    NVFP4_GLOBAL_NUMERATOR,
)
from nvq.formats.scales import fp8_e4m3_encode

__all__ = [
    "Profile",
    "NVFP4Quantized",
    "tensor_amax",
    "global_scale",
    "modelopt_scale_2",
    "global_scale_from_scale_2",
    "weight_scale_2",
    "block_step",
    "quantize",
    "dequantize",
]


class Profile(str, Enum):
    """Whose NVFP4 arithmetic to reproduce."""

    CT = "ct"  # compressed-tensors / llm-compressor, formats.md §1.2
    MODELOPT = "modelopt"  # NVIDIA ModelOpt NVFP4QTensor, formats.md §3.2


@dataclass(frozen=True, eq=False)
class NVFP4Quantized:
    codes: Tensor  # uint8 [N, K], unpacked E2M1 codes 0..15
    block_scale: Tensor  # torch.float8_e4m3fn [N, K/16]
    global_scale: Tensor  # float32 [1], a DIVISOR: W ≈ e2m1 · s / g (module docstring)
    weight_scale_2: Tensor | None = None  # float32 0-d MULTIPLIER; set by MODELOPT and GGUF


def tensor_amax(w: Tensor) -> Tensor:
    """0-d max |w| in w.dtype (exact), after the module's NaN/Inf policy."""
    return max_abs(sanitize(w))


def _ct_global_scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    # formats.md §1.2 step 2: clamp to the dtype's smallest normal (after the NaN/Inf policy).
    a = sanitize(amax.to(dtype)).clamp(min=torch.finfo(dtype).tiny)
    # Step 3: torch evaluates 2688 / A as reciprocal(A) * 2688, two roundings in dtype.
    r = (1.0 / a.float()).to(dtype)
    g = (r.float() * NVFP4_GLOBAL_NUMERATOR).to(dtype)
    # fp16 with A < 2688/65504 overflows to inf here and falls back to 1.0 (CT quirk).
    return _finite_or_fallback(g.float()).reshape(1)


def modelopt_scale_2(amax: Tensor) -> Tensor:
    """ModelOpt's multiplier weight_scale_2 = fp32(amax / 2688), 0-d (formats.md §3.2 step 1).

    amax 0 (an all-zero group) gives 1.0 instead of ModelOpt's 0 (module docstring).
    """
    s2 = sanitize(amax).float().reshape(()) / NVFP4_GLOBAL_NUMERATOR
    return torch.where(s2 > 0, s2, GLOBAL_SCALE_FALLBACK)


def global_scale_from_scale_2(scale_2: Tensor) -> Tensor:
    """A multiplier s2 -> the divisor fp32(1/s2) as float32 [1] (what CT's converter does)."""
    return _finite_or_fallback(1.0 / scale_2.float().reshape(1))


def _modelopt_global_scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    return global_scale_from_scale_2(modelopt_scale_2(amax))


_GLOBAL_SCALE_RULES = {Profile.CT: _ct_global_scale, Profile.MODELOPT: _modelopt_global_scale}


def global_scale(amax: Tensor, dtype: torch.dtype, profile: Profile = Profile.CT) -> Tensor:
    """Tensor (or fusion-group) amax -> the divisor g, float32 [1].

    CT: g = rnd_dt(rnd_dt(1/A) · 2688), A = max(amax, finfo(dt).tiny), NaN/±Inf -> 1 (§1.2 step 3).
    MODELOPT: g = fp32(1 / fp32(amax / 2688)); see `modelopt_scale_2` for the exact multiplier.
    A NaN amax counts as 0 and ±Inf as the dtype's largest finite value (module docstring).
    """
    check_dtype(dtype, "global_scale dtype")
    return _GLOBAL_SCALE_RULES[Profile(profile)](amax, dtype)


def weight_scale_2(q: NVFP4Quantized) -> Tensor:
    """The per-tensor MULTIPLIER (ModelOpt `weight_scale_2`, GGUF `<name>.scale`), 0-d fp32.

    Exact for MODELOPT-profile data; for CT data it is fp32(1/g), as CT's own converter and
    llama.cpp's converter compute it (formats.md §3.1, §3.4).
    """
    if q.weight_scale_2 is not None:
        return q.weight_scale_2.float().reshape(())
    return (1.0 / q.global_scale.float()).reshape(())


def block_step(q: NVFP4Quantized) -> Tensor:
    """fp32 value of one E2M1 unit per block, [N, K/16]: W = e2m1 · step.

    CT: fp32(s / g), one IEEE division (§1.2 step 5). ModelOpt: fp32(s · s2) (§3.2 step 3).
    """
    return _step(q.block_scale, q.global_scale, q.weight_scale_2)


def _step(block_scale: Tensor, g: Tensor, s2: Tensor | None) -> Tensor:
    if s2 is None:
        return block_scale.float() / g.float()
    return block_scale.float() * s2.float()


def _ct_scales(
    block_amax: Tensor, own_amax: Tensor, g: Tensor | None, s2: Tensor | None
) -> tuple[Tensor, Tensor, None]:
    if s2 is not None:
        raise ValueError(
            "weight_scale_2 is a ModelOpt multiplier; the ct profile takes global_scale"
        )
    dtype = block_amax.dtype
    g = _ct_global_scale(own_amax, dtype) if g is None else _checked_scalar(g, "global_scale")
    # formats.md §1.2 step 4: t = rnd_dt(a_b / 6), u = fp32(g · t), s = fp8(clamp(u)).
    t = (block_amax.float() / E2M1_MAX).to(dtype)
    s = fp8_e4m3_encode(g * t.float()).float()
    # s == 0 -> 0.125, CT's FP8 "eps" (byte 0x20).
    return fp8_e4m3_encode(torch.where(s == 0, CT_ZERO_BLOCK_SCALE, s)), g, None


def _modelopt_scales(
    block_amax: Tensor, own_amax: Tensor, g: Tensor | None, s2: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    if s2 is not None:
        s2 = _checked_scalar(s2, "weight_scale_2").reshape(())
    elif g is not None:
        s2 = (1.0 / _checked_scalar(g, "global_scale")).reshape(())
    else:
        s2 = modelopt_scale_2(own_amax)
    # formats.md §3.2 step 2: fp32(a_b / fp32(6 · s2)); 0 -> 1.0; clamp(2^-9, 448); fp8.
    s = block_amax.float() / (E2M1_MAX * s2)
    s = torch.where(s == 0, MODELOPT_ZERO_BLOCK_SCALE, s).clamp(min=MODELOPT_MIN_BLOCK_SCALE)
    return fp8_e4m3_encode(s), global_scale_from_scale_2(s2), s2


_SCALE_RULES = {Profile.CT: _ct_scales, Profile.MODELOPT: _modelopt_scales}


def _checked_scalar(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() != 1:
        raise ValueError(f"{name} must be a 1-element float tensor, got {x!r}")
    value = float(x)
    if not (0 < value < float("inf")):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return x.float().reshape(1)


def quantize(
    w: Tensor,
    global_scale: Tensor | None = None,
    profile: Profile = Profile.CT,
    *,
    weight_scale_2: Tensor | None = None,
) -> NVFP4Quantized:
    """Quantize a [N, K] bf16/fp16/fp32 weight (K % 16 == 0) to NVFP4.

    `global_scale` (the divisor g) defaults to the tensor's own; pass a fusion group's shared g
    to use it as is. Rows are independent given g, so row chunks quantize to row slices.
    MODELOPT only: `weight_scale_2` passes the exact shared multiplier instead of g, because
    fp32(1/g) may be one ulp away from the s2 that ModelOpt would use (module docstring).
    """
    check_weight(w, NVFP4_BLOCK, "NVFP4")
    if global_scale is not None and weight_scale_2 is not None:
        raise ValueError("pass global_scale or weight_scale_2, not both")
    blocks = split_blocks(sanitize(w), NVFP4_BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    scale_rule = _SCALE_RULES[Profile(profile)]
    block_scale, g, s2 = scale_rule(block_amax, max_abs(block_amax), global_scale, weight_scale_2)
    # §1.2 steps 5-7 / §3.2 steps 3-4: y = fp32(w / step), clamp to ±6, RNE code, sign = y < 0.
    y = blocks.float() / _step(block_scale, g, s2).unsqueeze(-1)
    codes = e2m1.encode(y, e2m1.Rounding.RNE).flatten(start_dim=1)
    return NVFP4Quantized(codes, block_scale, g, s2)


def dequantize(q: NVFP4Quantized, dtype: torch.dtype = torch.float32) -> Tensor:
    """W = dtype(fp32(e2m1 · step)), step from `block_step`.

    For CT data this is bit-exact with compressed-tensors 0.20.0 decompression, which computes
    fp32(s / g) · code in fp32 and rounds once to the output dtype (`_dequantize`); CT's
    `NVFP4PackedCompressor.decompress` always asks for bfloat16. For ModelOpt data it is
    `NVFP4QTensor.dequantize`'s order: fp32(s · s2) · code, then one cast.
    """
    check_dtype(dtype, "dequantize dtype")
    values = e2m1.decode(q.codes)
    n_rows, n_cols = values.shape
    steps = block_step(q).unsqueeze(-1)
    return (split_blocks(values, NVFP4_BLOCK) * steps).reshape(n_rows, n_cols).to(dtype)


def _finite_or_fallback(g: Tensor) -> Tensor:
    # formats.md §1.2 step 3: nan_to_num(g, nan=1, posinf=1, neginf=1).
    fallback = GLOBAL_SCALE_FALLBACK
    return torch.nan_to_num(g, nan=fallback, posinf=fallback, neginf=fallback)
