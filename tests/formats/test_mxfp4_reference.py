"""MXFP4 reference: scale rules, zero blocks, the fp16 underflow quirk, chunking, NaN/Inf."""

import pytest
import torch

from nvq.formats import mxfp4
from nvq.formats.e2m1 import Rounding
from nvq.formats.scales import ScaleRule

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GGUF_PROFILE = (ScaleRule.FLOOR, Rounding.GGML)


def _block(first: float, rest: float = 0.0, dtype=torch.bfloat16) -> torch.Tensor:
    row = torch.full((1, 32), rest, dtype=dtype)
    row[0, 0] = first
    return row


def _assert_same(a: mxfp4.MXFP4Quantized, b: mxfp4.MXFP4Quantized) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scale, b.scale)


def test_amax_1_75_edge_even_vs_floor():
    w = _block(1.75)
    ct = mxfp4.quantize(w)  # EVEN: byte 126, scale 0.5, 1.75 -> 3.5 -> RNE tie up to 4.0
    assert ct.scale.tolist() == [[126]] and ct.codes[0, 0].item() == 0x6
    gg = mxfp4.quantize(w, *GGUF_PROFILE)  # FLOOR: byte 125, scale 0.25, 1.75 -> 7 -> 6.0
    assert gg.scale.tolist() == [[125]] and gg.codes[0, 0].item() == 0x7


def test_amax_1_74_takes_the_same_byte_under_both_rules():
    w = _block(1.74)
    assert mxfp4.quantize(w).scale.item() == mxfp4.quantize(w, *GGUF_PROFILE).scale.item() == 125


@pytest.mark.parametrize(
    "dtype, byte", [(torch.bfloat16, 0), (torch.float32, 0), (torch.float16, 127)]
)
def test_all_zero_block(dtype, byte):
    # 2^(0-127) underflows to 0 in fp16, and CT replaces a zero scale by 1 (byte 127)
    q = mxfp4.quantize(torch.zeros(2, 64, dtype=dtype))
    assert q.scale.eq(byte).all() and q.codes.eq(0).all()


def test_negative_zero_block_encodes_as_plus_zero():
    q = mxfp4.quantize(torch.full((1, 32), -0.0))
    assert q.codes.eq(0).all() and q.scale.item() == 0


def test_fp16_tiny_block_underflow_quirk():
    w = _block(2.0**-20, dtype=torch.float16)
    # EVEN on fp16 bits: the subnormal amax masks to 0 -> byte 0 -> fp16 scale 0 -> byte 127
    ct = mxfp4.quantize(w)
    assert ct.scale.item() == 127 and ct.codes[0, 0].item() == 0x0
    # FLOOR gives byte 105, and 2^-22 is representable in fp16
    gg = mxfp4.quantize(w, *GGUF_PROFILE)
    assert gg.scale.item() == 105 and gg.codes[0, 0].item() == 0x6


def test_fp16_input_differs_from_its_fp32_copy_only_through_the_underflow_quirk():
    w = torch.zeros(1, 64, dtype=torch.float16)
    w[0, 32:] = torch.linspace(-1, 1, 32)
    as_fp16 = mxfp4.quantize(w, *GGUF_PROFILE)
    as_fp32 = mxfp4.quantize(w.float(), *GGUF_PROFILE)
    assert as_fp16.scale.tolist() == [[127, 125]] and as_fp32.scale.tolist() == [[0, 125]]
    assert torch.equal(as_fp16.codes, as_fp32.codes)


def test_tiny_negative_sign_depends_on_rounding():
    w = _block(1.0, 0.0)
    w[0, 1] = -1e-6
    assert mxfp4.quantize(w).codes[0, 1].item() == 0x8
    assert mxfp4.quantize(w, *GGUF_PROFILE).codes[0, 1].item() == 0x0


def test_ties_follow_the_rounding():
    # amax 6 -> byte 127 (scale 1) under both rules; the values are exact E2M1 midpoints
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75]
    w = torch.tensor([[6.0] + ties + [0.0] * 23])
    rne = mxfp4.quantize(w).codes[0, 1:9].tolist()
    ggml = mxfp4.quantize(w, *GGUF_PROFILE).codes[0, 1:9].tolist()
    assert rne == [0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6, 0xA]
    assert ggml == [0x0, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x9]


def test_even_overflow_past_fp16_range_gives_byte_255_and_zero_codes():
    w = _block(60000.0, 1.0, dtype=torch.float16)
    q = mxfp4.quantize(w)
    assert q.scale.item() == 255 and q.codes.eq(0).all()
    assert torch.isnan(mxfp4.dequantize(q)).all()


@pytest.mark.parametrize("rule, rounding", [(ScaleRule.EVEN, Rounding.RNE), GGUF_PROFILE])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_chunks_quantize_to_row_slices(dtype, rule, rounding):
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(37, 128, generator=gen) * 0.03).to(dtype)
    w[3, 32:64] = 0
    whole = mxfp4.quantize(w, rule, rounding)
    for start, stop in [(0, 1), (1, 7), (7, 30), (30, 37)]:
        part = mxfp4.quantize(w[start:stop], rule, rounding)
        _assert_same(part, mxfp4.MXFP4Quantized(whole.codes[start:stop], whole.scale[start:stop]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_quantizes_as_zero_and_inf_as_the_dtype_max(dtype):
    w = torch.randn(2, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    poisoned, cleaned = w.clone(), w.clone()
    poisoned[0, 3], poisoned[1, 40] = float("nan"), -float("inf")
    cleaned[0, 3], cleaned[1, 40] = 0.0, -torch.finfo(dtype).max
    for rule, rounding in [(ScaleRule.EVEN, Rounding.RNE), GGUF_PROFILE]:
        _assert_same(
            mxfp4.quantize(poisoned, rule, rounding), mxfp4.quantize(cleaned, rule, rounding)
        )


def test_inf_weight_pinned_bytes():
    w = torch.zeros(1, 64, dtype=torch.bfloat16)
    w[0, 0], w[0, 1], w[0, 32], w[0, 33] = float("inf"), 1.0, float("nan"), -0.5
    q = mxfp4.quantize(w)
    assert q.scale.tolist() == [[255, 124]]  # bf16 max rounds up past 2^127 under EVEN
    assert q.codes[0, [0, 1, 32, 33]].tolist() == [0x0, 0x0, 0x0, 0xE]
    g = mxfp4.quantize(w, *GGUF_PROFILE)
    assert g.scale.tolist() == [[252, 124]]
    assert g.codes[0, [0, 1, 32, 33]].tolist() == [0x7, 0x0, 0x0, 0xE]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_is_code_times_power_of_two(dtype):
    w = (torch.randn(5, 96, generator=torch.Generator().manual_seed(6)) * 0.1).to(dtype)
    q = mxfp4.quantize(w)
    scale = torch.exp2(q.scale.double() - 127).repeat_interleave(32, dim=1)
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
    exact = values.double()[q.codes.long()] * scale
    assert torch.equal(mxfp4.dequantize(q, dtype), exact.to(dtype))
    error = (mxfp4.dequantize(q) - w.float()).abs()
    assert (error <= scale.float()).all()  # widest E2M1 gap is 2 units


def test_k_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="K % 32 == 0, got K=48"):
        mxfp4.quantize(torch.zeros(2, 48))


def test_unknown_rule_or_rounding_is_rejected():
    with pytest.raises(ValueError, match="'rceil'"):
        mxfp4.quantize(torch.zeros(1, 32), "rceil")
    with pytest.raises(ValueError, match="'away'"):
        mxfp4.quantize(torch.zeros(1, 32), ScaleRule.EVEN, "away")
