"""Block-scale codecs: FP8 E4M3FN (NVFP4 checkpoints), UE4M3 (GGUF NVFP4) and E8M0 (MX).

Encodings are in formats.md §0.3; the E8M0 rounding rules are §2a step 2 and §2d.

Non-finite policy (deterministic, pinned by tests):
* `fp8_e4m3_encode`: ±Inf clamps to ±448 (0x7E / 0xFE); NaN stays NaN (0x7F / 0xFF).
* `ue4m3_encode`: mirrors gguf-py `fp32_to_ue4m3`: NaN, +Inf and anything >= 448 give 0x7E;
  negatives, -Inf and zero give 0x00.
* `e8m0_from_amax`: NaN and ±Inf give 0xFF, the E8M0 NaN. `e8m0_decode(0xFF)` is NaN.
"""

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from nvq.formats.constants import (
    E2M1_MAX_EXPONENT,
    E8M0_BIAS,
    E8M0_MAX_BYTE,
    E8M0_NAN_BYTE,
    FP8_E4M3_MAX,
    UE4M3_BIAS,
    UE4M3_EXPONENT_MASK,
    UE4M3_MANTISSA_MASK,
    UE4M3_MAX_BYTE,
    UE4M3_ZERO_ALIAS,
)

__all__ = [
    "ScaleRule",
    "fp8_e4m3_encode",
    "fp8_e4m3_decode",
    "fp8_e4m3_bits",
    "ue4m3_encode",
    "ue4m3_decode",
    "e8m0_from_amax",
    "e8m0_decode",
]

_FP32_MANTISSA_BITS = 23
_FP32_EXPONENT_MASK = 0xFF
_FP32_BIAS = 127
_UE4M3_MANTISSA_BITS = 3
_UE4M3_SUBNORMAL_STEP = 2.0**-9  # value of one mantissa unit when the exponent field is 0
_UE4M3_EXPONENT_LIMIT = 15  # a UE4M3 exponent field >= 15 saturates to 0x7E in gguf-py
# Sentinels that the E8M0 byte clamp turns into 0 (no power of two) and 255 (NaN/overflow).
_EXPONENT_OF_ZERO = -(1 << 20)
_EXPONENT_OF_OVERFLOW = 1 << 20
# fp32 bit patterns: 2^-127 is the only subnormal E8M0 value; 0x7FC00000 is the quiet NaN.
_FP32_BITS_2_POW_MINUS_127 = 0x00400000
_FP32_BITS_QUIET_NAN = 0x7FC00000


# --- FP8 E4M3FN -----------------------------------------------------------------------------


def fp8_e4m3_encode(x: Tensor) -> Tensor:
    """float -> torch.float8_e4m3fn: clamp to ±448, then torch's RNE cast (§0.3)."""
    # Every producer clamps first: older torch eager casts turned overflow into NaN.
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_e4m3_decode(s: Tensor) -> Tensor:
    """torch.float8_e4m3fn -> float32 (exact)."""
    if s.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_e4m3_decode takes torch.float8_e4m3fn, got {s.dtype}")
    return s.float()


def fp8_e4m3_bits(s: Tensor) -> Tensor:
    """The raw E4M3FN bytes (uint8) of a torch.float8_e4m3fn tensor."""
    if s.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_e4m3_bits takes torch.float8_e4m3fn, got {s.dtype}")
    return s.view(torch.uint8)


# --- UE4M3 (GGUF NVFP4) ---------------------------------------------------------------------


def ue4m3_encode(x: Tensor) -> Tensor:
    """float -> UE4M3 byte, bit-exact with gguf-py `NVFP4.fp32_to_ue4m3` (ggml's C encoder).

    Normal values round half-up on fp32 mantissa bit 19 (not RNE) and saturate at 0x7E;
    values below 2^-6 round half-up to a multiple of 2^-9.
    """
    x = x.float().clamp(0.0, FP8_E4M3_MAX)
    bits = x.view(torch.int32)
    exponent = ((bits >> _FP32_MANTISSA_BITS) & _FP32_EXPONENT_MASK) - _FP32_BIAS + UE4M3_BIAS
    mantissa = (bits >> (_FP32_MANTISSA_BITS - _UE4M3_MANTISSA_BITS)) & UE4M3_MANTISSA_MASK
    round_bit = (bits >> (_FP32_MANTISSA_BITS - _UE4M3_MANTISSA_BITS - 1)) & 1

    mantissa = mantissa + round_bit
    carry = mantissa > UE4M3_MANTISSA_MASK
    mantissa = torch.where(carry, 0, mantissa)
    rounded_exponent = exponent + carry.to(exponent.dtype)
    normal = torch.where(
        rounded_exponent >= _UE4M3_EXPONENT_LIMIT,
        UE4M3_MAX_BYTE,
        (rounded_exponent << _UE4M3_MANTISSA_BITS) | mantissa,
    )
    # Subnormal: x / 2^-9 rounded half-up; the (x * 512 + 0.5) is fp32 arithmetic, as in gguf-py.
    subnormal = (x * (1.0 / _UE4M3_SUBNORMAL_STEP) + 0.5).to(torch.int32).clamp(0, 7)

    byte = torch.where(exponent >= _UE4M3_EXPONENT_LIMIT, UE4M3_MAX_BYTE, normal)
    byte = torch.where(exponent <= 0, subnormal, byte)
    byte = torch.where(x <= 0.0, 0, byte)
    return byte.to(torch.uint8)


def ue4m3_decode(byte: Tensor) -> Tensor:
    """UE4M3 byte -> float32 value, as gguf-py `NVFP4.ue4m3_to_fp32` without its 0.5 factor.

    Bit 7 is ignored; 0x00 and 0x7F (the E4M3 NaN pattern) decode to 0.0.
    """
    if byte.dtype != torch.uint8:
        raise ValueError(f"ue4m3_decode takes uint8 bytes, got {byte.dtype}")
    exponent = (byte >> _UE4M3_MANTISSA_BITS).to(torch.int32) & UE4M3_EXPONENT_MASK
    mantissa = (byte & UE4M3_MANTISSA_MASK).float()
    normal = (1.0 + mantissa / 8.0) * torch.exp2((exponent - UE4M3_BIAS).float())
    value = torch.where(exponent == 0, mantissa * _UE4M3_SUBNORMAL_STEP, normal)
    return torch.where((byte == 0) | (byte == UE4M3_ZERO_ALIAS), 0.0, value)


# --- E8M0 (MX block scale) ------------------------------------------------------------------


class ScaleRule(str, Enum):
    """How a block amax becomes an E8M0 exponent (formats.md §2d)."""

    FLOOR = "floor"  # OCP MX v1.0 / ggml: 127 + floor(log2 amax) - 2
    EVEN = "even"  # compressed-tensors / torchao EVEN: +1 when the amax mantissa is >= 1.75


@dataclass(frozen=True)
class _FloatBits:
    int_view: torch.dtype  # same-width signed int to view the bits through
    width: int
    mantissa: int
    exponent: int

    @property
    def bias(self) -> int:
        return (1 << (self.exponent - 1)) - 1


_FLOAT_BITS = {
    torch.float32: _FloatBits(torch.int32, width=32, mantissa=23, exponent=8),
    torch.bfloat16: _FloatBits(torch.int16, width=16, mantissa=7, exponent=8),
    torch.float16: _FloatBits(torch.int16, width=16, mantissa=10, exponent=5),
}


def _floor_exponent(amax: Tensor) -> Tensor:
    """floor(log2 amax), exact for every finite value (subnormals included)."""
    magnitude = amax.float().abs()
    _, frexp_exponent = torch.frexp(magnitude)  # magnitude = m * 2^e with m in [0.5, 1)
    exponent = frexp_exponent.to(torch.int64) - 1
    return torch.where(magnitude == 0, _EXPONENT_OF_ZERO, exponent)


def _even_exponent(amax: Tensor) -> Tensor:
    """compressed-tensors `round_to_power_2` on amax's own bit pattern (formats.md §2a step 2).

    Adding a quarter of the exponent's ulp to the mantissa field carries into the exponent iff
    the mantissa is >= 1.75. Working on the weight dtype's bits reproduces CT's edge cases: a
    subnormal below 0.75 x (smallest normal) masks to 0 (byte 0), and a carry into the
    all-ones exponent is +Inf (byte 255).
    """
    layout = _FLOAT_BITS[amax.dtype]
    bits = amax.view(layout.int_view).to(torch.int64) & ((1 << (layout.width - 1)) - 1)
    exponent_field = (bits + (1 << (layout.mantissa - 2))) >> layout.mantissa
    exponent = torch.where(exponent_field == 0, _EXPONENT_OF_ZERO, exponent_field - layout.bias)
    all_ones = (1 << layout.exponent) - 1
    return torch.where(exponent_field >= all_ones, _EXPONENT_OF_OVERFLOW, exponent)


_EXPONENT_RULES = {ScaleRule.FLOOR: _floor_exponent, ScaleRule.EVEN: _even_exponent}


def e8m0_from_amax(amax: Tensor, rule: ScaleRule) -> Tensor:
    """Block amax (bf16/fp16/fp32; sign ignored) -> E8M0 byte for an FP4 block (§2a, §2c).

    byte = clamp(127 + E - 2, 0, 255), E the rule's power-of-two exponent; amax 0 gives 0.
    """
    if amax.dtype not in _FLOAT_BITS:
        raise ValueError(f"e8m0_from_amax takes bfloat16/float16/float32 amax, got {amax.dtype}")
    exponent = _EXPONENT_RULES[ScaleRule(rule)](amax)
    exponent = torch.where(torch.isfinite(amax), exponent, _EXPONENT_OF_OVERFLOW)
    byte = (exponent + E8M0_BIAS - E2M1_MAX_EXPONENT).clamp(0, E8M0_MAX_BYTE)
    return byte.to(torch.uint8)


def e8m0_decode(byte: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """E8M0 byte -> 2^(byte - 127), built exactly in fp32 bits and then cast (RNE) to `dtype`.

    0xFF decodes to NaN. The cast matters for fp16, where bytes below 103 underflow to 0
    (compressed-tensors' MXFP4 fp16 quirk, formats.md §2a gotchas).
    """
    if byte.dtype != torch.uint8:
        raise ValueError(f"e8m0_decode takes uint8 bytes, got {byte.dtype}")
    wide = byte.to(torch.int32)
    bits = torch.where(wide == 0, _FP32_BITS_2_POW_MINUS_127, wide << _FP32_MANTISSA_BITS)
    bits = torch.where(wide == E8M0_NAN_BYTE, _FP32_BITS_QUIET_NAN, bits)
    return bits.view(torch.float32).to(dtype)
