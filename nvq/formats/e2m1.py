"""E2M1 (FP4) element codec: float -> 4-bit code, code -> float, and CT/ModelOpt nibble pairs.

A code is `s e1 e0 m` (formats.md §0.1): bit 3 is the sign, bits 2..0 index the magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6. `encode` takes values already divided by their block scale.

Two rounding flavours exist in the wild and they disagree on ties and on the sign of zero
(formats.md §0.2), so the flavour is always named:

* `Rounding.RNE`: compressed-tensors, ModelOpt, torchao. Clamp to [-6, 6], ties go to the
  even code, and the sign bit is set iff y < 0 (strict): a tiny negative gives 0x8, an
  input of exactly -0.0 gives 0x0.
* `Rounding.GGML`: gguf-py / ggml (`best_index_mxfp4`, an argmin over an ascending table).
  Ties go to the lower magnitude, and a negative value that rounds to zero gives 0x0.

Non-finite policy (both flavours; deterministic so that CUDA kernels can match it):
NaN encodes as 0x0 (+0), +Inf as 0x7 (+6) and -Inf as 0xF (-6). gguf-py's argmin differs for
±Inf (every distance is inf, so it returns index 0); nvq saturates instead.
"""

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from nvq.formats.constants import (
    E2M1_MAGNITUDES,
    E2M1_MAX,
    E2M1_MIDPOINTS,
    E2M1_RNE_TIES_UP,
    E2M1_SIGN_BIT,
    NIBBLE_MASK,
    NIBBLE_SHIFT,
)

__all__ = ["Rounding", "encode", "decode", "pack_pairs", "unpack_pairs"]

_CODE_COUNT = 16
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


class Rounding(str, Enum):
    """How a scaled value picks its E2M1 code (formats.md §0.2)."""

    RNE = "rne"  # compressed-tensors / ModelOpt / torchao
    GGML = "ggml"  # gguf-py / ggml argmin


@dataclass(frozen=True)
class _RoundingRule:
    ties_up: tuple[float, ...]  # midpoints that round to the upper magnitude
    signed_zero: bool  # keep the sign bit when a negative value rounds to magnitude 0


_RULES = {
    Rounding.RNE: _RoundingRule(ties_up=E2M1_RNE_TIES_UP, signed_zero=True),
    Rounding.GGML: _RoundingRule(ties_up=(), signed_zero=False),
}


def encode(y: Tensor, rounding: Rounding = Rounding.RNE) -> Tensor:
    """Round already-scaled values to E2M1 codes 0..15 (uint8, same shape as `y`)."""
    if y.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"e2m1.encode takes float32/bfloat16/float16 values, got {y.dtype}")
    rule = _RULES[Rounding(rounding)]
    # NaN -> +0 and +-Inf -> +-6 (module docstring); bf16/fp16 -> fp32 is exact.
    y = torch.nan_to_num(y.float(), nan=0.0).clamp(-E2M1_MAX, E2M1_MAX)
    magnitude = y.abs()
    midpoints = torch.tensor(E2M1_MIDPOINTS, dtype=torch.float32, device=y.device)
    # bucketize counts the midpoints strictly below |y|: nearest magnitude, ties down.
    code = torch.bucketize(magnitude, midpoints, out_int32=True)
    if rule.ties_up:
        ties_up = torch.tensor(rule.ties_up, dtype=torch.float32, device=y.device)
        code = code + torch.isin(magnitude, ties_up)
    negative = y < 0
    if not rule.signed_zero:
        negative = negative & (code > 0)
    return (code | negative.to(code.dtype) * E2M1_SIGN_BIT).to(torch.uint8)


def decode(codes: Tensor) -> Tensor:
    """E2M1 codes (uint8 0..15) -> float32 values; code 0x8 decodes to -0.0."""
    _check_codes(codes)
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    table = torch.cat([magnitudes, -magnitudes])
    return table[codes.long()]


def pack_pairs(codes: Tensor) -> Tensor:
    """[..., K] codes -> [..., K/2] bytes; low nibble = even k, high nibble = odd k (§0.4)."""
    _check_codes(codes)
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_pairs needs an even number of codes per row, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << NIBBLE_SHIFT)


def unpack_pairs(packed: Tensor) -> Tensor:
    """[..., K/2] bytes -> [..., K] codes, the inverse of `pack_pairs`."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_pairs takes uint8 bytes, got {packed.dtype}")
    pairs = torch.stack([packed & NIBBLE_MASK, packed >> NIBBLE_SHIFT], dim=-1)
    return pairs.flatten(start_dim=-2)


def _check_codes(codes: Tensor) -> None:
    if codes.dtype != torch.uint8:
        raise ValueError(f"E2M1 codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= _CODE_COUNT:
        raise ValueError(f"E2M1 codes must be 0..15, got a code {int(codes.max())}")
