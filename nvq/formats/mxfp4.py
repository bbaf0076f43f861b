"""MXFP4 reference codec: E2M1 codes with one E8M0 power-of-two scale per 32 elements.

Profiles are picked by naming the scale rule and the element rounding:

* compressed-tensors 0.20.0 `mxfp4-pack-quantized` (the defaults): `ScaleRule.EVEN`,
  `Rounding.RNE` (formats.md §2a).
* gguf-py / ggml type MXFP4: `ScaleRule.FLOOR`, `Rounding.GGML` (formats.md §2c).

All arithmetic runs in the weight's dtype, as compressed-tensors does (§2a step 4): the scale
2^(byte-127) is materialised in that dtype and y = w / scale is an exact power-of-two division
there. For fp16 this reproduces CT's underflow quirk (§2a gotchas): a byte below 103 gives
scale 0 in fp16, which CT replaces by 1, so the stored byte becomes 127. gguf-py works in
fp32, so pass `w.float()` to reproduce its bytes for fp16 weights; bf16 and fp32 weights give
gguf-py's bytes directly.

FLOOR uses the exact floor(log2 amax) (OCP, formats.md §2c). gguf-py evaluates
floor(np.log2(amax)) in fp32, and that log2 rounds up to k for the fp32 values up to 44 ulps
below any 2^k with k outside -1..2, so gguf-py stores one more there (2^20·(2 - 2^-23) gives
byte 146 in gguf-py, 145 here). bf16 and fp16 amax values cannot come that close to 2^k.

Non-finite policy: NaN weights become 0 and ±Inf become ±(largest finite of the dtype) before
the block amax, as in `nvq.formats.nvfp4`. A scale byte of 255 (E8M0 NaN) appears only when
EVEN rounds the amax up past the dtype's largest power of two (fp16 amax >= 57344); that
block's scale decodes to NaN and its codes are all 0x0.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from nvq.formats import e2m1
from nvq.formats._blocks import check_dtype, check_weight, sanitize, split_blocks
from nvq.formats.constants import E8M0_BIAS, MXFP4_BLOCK
from nvq.formats.e2m1 import Rounding
from nvq.formats.scales import ScaleRule, e8m0_decode, e8m0_from_amax

__all__ = ["MXFP4Quantized", "quantize", "dequantize"]

_UNIT_SCALE_BYTE = E8M0_BIAS  # 2^0 = 1.0, CT's replacement for a zero scale


@dataclass(frozen=True, eq=False)
class MXFP4Quantized:
    codes: Tensor  # uint8 [N, K], unpacked E2M1 codes 0..15
    scale: Tensor  # uint8 [N, K/32], E8M0 biased exponents


def quantize(
    w: Tensor, rule: ScaleRule = ScaleRule.EVEN, rounding: Rounding = Rounding.RNE
) -> MXFP4Quantized:
    """Quantize a [N, K] bf16/fp16/fp32 weight (K % 32 == 0) to MXFP4; rows are independent."""
    check_weight(w, MXFP4_BLOCK, "MXFP4")
    blocks = split_blocks(sanitize(w), MXFP4_BLOCK)
    scale_byte = e8m0_from_amax(blocks.abs().amax(dim=-1), ScaleRule(rule))
    scale = e8m0_decode(scale_byte, w.dtype)
    # CT replaces a zero scale (fp16 underflow) by 1, the eps of its uint8 scale dtype.
    underflow = scale == 0
    scale_byte = torch.where(underflow, _UNIT_SCALE_BYTE, scale_byte).to(torch.uint8)
    scale = torch.where(underflow, 1.0, scale).to(w.dtype)
    y = blocks / scale.unsqueeze(-1)
    codes = e2m1.encode(y, Rounding(rounding)).flatten(start_dim=1)
    return MXFP4Quantized(codes=codes, scale=scale_byte)


def dequantize(q: MXFP4Quantized, dtype: torch.dtype = torch.float32) -> Tensor:
    """W = dtype(e2m1 · 2^(byte-127)); the fp32 product is exact, so one rounding at most.

    Bit-exact with compressed-tensors 0.20.0 decompression, which multiplies in bfloat16.
    """
    check_dtype(dtype, "dequantize dtype")
    values = e2m1.decode(q.codes)
    n_rows, n_cols = values.shape
    scale = e8m0_decode(q.scale, torch.float32).unsqueeze(-1)
    return (split_blocks(values, MXFP4_BLOCK) * scale).reshape(n_rows, n_cols).to(dtype)
