"""Golden tables for the scale codecs (FP8 E4M3FN, UE4M3, E8M0), plus bit-exact checks of
UE4M3 against gguf-py and of E8M0 EVEN against compressed-tensors' own scale generation."""

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales
from gguf.quants import NVFP4 as GgufNVFP4

from nvq.formats.scales import (
    ScaleRule,
    e8m0_decode,
    e8m0_from_amax,
    fp8_e4m3_bits,
    fp8_e4m3_decode,
    fp8_e4m3_encode,
    ue4m3_decode,
    ue4m3_encode,
)

INF = float("inf")
NAN = float("nan")

# --- FP8 E4M3FN ------------------------------------------------------------------------------

E4M3_TABLE = [
    (448.0, 0x7E),
    (1.0, 0x38),
    (0.125, 0x20),
    (44.0, 0x63),
    (2.0**-9, 0x01),  # smallest subnormal
    (2.0**-6, 0x08),  # smallest normal
    (2.0**-10, 0x00),  # half the smallest subnormal: tie to even -> 0
    (1.5 * 2.0**-10, 0x01),
    (1.0625, 0x38),  # tie between 1.0 and 1.125: RNE keeps 1.0 (UE4M3 below rounds up)
    (464.0, 0x7E),  # above 448: clamped first
    (1e6, 0x7E),
    (-448.0, 0xFE),
    (-1e6, 0xFE),
    (0.0, 0x00),
    (-0.0, 0x80),
    (INF, 0x7E),  # non-finite policy: ±Inf clamps to ±448
    (-INF, 0xFE),
    (NAN, 0x7F),  # NaN stays NaN
]


def test_fp8_e4m3_encode_matches_the_golden_table():
    x = torch.tensor([row[0] for row in E4M3_TABLE], dtype=torch.float32)
    s = fp8_e4m3_encode(x)
    assert s.dtype == torch.float8_e4m3fn
    assert fp8_e4m3_bits(s).tolist() == [row[1] for row in E4M3_TABLE]


def test_fp8_e4m3_encode_takes_bf16_and_fp16():
    x = torch.tensor([448.0, 1.0, 0.125, 3.0])
    for dtype in (torch.bfloat16, torch.float16):
        assert fp8_e4m3_bits(fp8_e4m3_encode(x.to(dtype))).tolist() == [0x7E, 0x38, 0x20, 0x44]


def test_fp8_e4m3_decode_is_exact():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    values = fp8_e4m3_decode(every_byte)
    finite = torch.isfinite(values)
    assert int((~finite).sum()) == 2  # 0x7F and 0xFF
    assert torch.equal(
        fp8_e4m3_bits(fp8_e4m3_encode(values[finite])), every_byte.view(torch.uint8)[finite]
    )
    with pytest.raises(ValueError, match="float8_e4m3fn, got torch.float32"):
        fp8_e4m3_decode(torch.zeros(1))


# --- UE4M3 (gguf-py's NVFP4 sub-block scale) --------------------------------------------------

UE4M3_TABLE = [
    (0.0, 0x00),
    (448.0, 0x7E),
    (500.0, 0x7E),
    (1.0, 0x38),
    (0.125, 0x20),
    (2.0**-9, 0x01),
    (2.0**-6, 0x08),
    (1.0625, 0x39),  # half-up on mantissa bit 19, unlike the RNE E4M3 cast (0x38)
    (2.0**-10, 0x01),  # subnormal half-up: 0.5 -> 1 (E4M3 gives 0x00)
    (2.5 * 2.0**-9, 0x03),  # subnormal half-up: 2.5 -> 3 (E4M3 gives 0x02)
    (-1.0, 0x00),
    (INF, 0x7E),
    (-INF, 0x00),
    (NAN, 0x7E),
]


def test_ue4m3_encode_matches_the_golden_table():
    x = torch.tensor([row[0] for row in UE4M3_TABLE], dtype=torch.float32)
    assert ue4m3_encode(x).tolist() == [row[1] for row in UE4M3_TABLE]


def test_ue4m3_encode_is_bit_exact_with_gguf_py():
    gen = torch.Generator().manual_seed(11)
    random_values = torch.rand(50_000, generator=gen) * 460.0
    tiny_values = torch.rand(20_000, generator=gen) * 2.0**-5
    # every fp32 whose top mantissa bits sit on a UE4M3 rounding boundary, over the range
    exponents = torch.arange(-12, 10, dtype=torch.float32)
    mantissas = torch.arange(0, 16, dtype=torch.float32) / 16 + 1
    boundaries = (mantissas[None, :] * torch.exp2(exponents)[:, None]).flatten()
    x = torch.cat([random_values, tiny_values, boundaries, torch.tensor([0.0, 448.0, 449.0])])
    expected = GgufNVFP4.fp32_to_ue4m3(x.numpy())
    assert np.array_equal(ue4m3_encode(x).numpy(), expected)


def test_ue4m3_decode_is_gguf_py_without_its_half_factor():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = ue4m3_decode(every_byte)
    gguf_half = GgufNVFP4.ue4m3_to_fp32(every_byte.numpy())
    assert np.array_equal((ours * 0.5).numpy(), gguf_half.astype(np.float32))
    assert ours[0x7F] == 0.0 and ours[0x7E] == 448.0 and ours[0x01] == 2.0**-9


# --- E8M0 ---------------------------------------------------------------------------------

# (amax, dtype, FLOOR byte, EVEN byte)
E8M0_TABLE = [
    (1.75, torch.bfloat16, 125, 126),  # the §2a edge: EVEN bumps a 1.75 mantissa
    (1.74, torch.bfloat16, 125, 125),
    (1.75, torch.float32, 125, 126),
    (1.0, torch.float32, 125, 125),
    (6.0, torch.float32, 127, 127),
    (7.0, torch.float32, 127, 128),
    (0.0, torch.float32, 0, 0),
    (0.0, torch.float16, 0, 0),
    (-1.75, torch.float32, 125, 126),  # the sign is ignored
    (2.0**-125, torch.float32, 0, 0),
    (2.0**-126, torch.float32, 0, 0),  # 127 - 126 - 2 < 0 clamps to 0
    (2.0**-140, torch.float32, 0, 0),  # fp32 subnormal
    (2.0**127, torch.float32, 252, 252),
    (2.0**-15, torch.float16, 110, 0),  # fp16 subnormal below 0.75 * 2^-14: CT masks it to 0
    (0.75 * 2.0**-14, torch.float16, 110, 111),  # ... at 0.75 * 2^-14 it carries to 2^-14
    (65504.0, torch.float16, 140, 255),  # EVEN rounds past the fp16 range: +Inf -> 255
    (3.3895e38, torch.bfloat16, 252, 255),
    (INF, torch.float32, 255, 255),  # non-finite policy: 0xFF, the E8M0 NaN
    (NAN, torch.float32, 255, 255),
]


@pytest.mark.parametrize("amax, dtype, floor_byte, even_byte", E8M0_TABLE)
def test_e8m0_from_amax_matches_the_golden_table(amax, dtype, floor_byte, even_byte):
    a = torch.tensor([amax], dtype=dtype)
    assert e8m0_from_amax(a, ScaleRule.FLOOR).item() == floor_byte
    assert e8m0_from_amax(a, ScaleRule.EVEN).item() == even_byte


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_e8m0_even_equals_compressed_tensors_on_every_finite_value(dtype):
    every = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    amax = every[torch.isfinite(every)]
    ct = generate_mx_scales(amax).float().clamp(0, 255)  # CT clamps when casting to uint8
    assert torch.equal(e8m0_from_amax(amax, ScaleRule.EVEN).float(), ct)


def test_e8m0_even_equals_compressed_tensors_on_fp32():
    gen = torch.Generator().manual_seed(5)
    amax = torch.cat(
        [
            torch.exp2(torch.rand(100_000, generator=gen) * 280 - 150),
            torch.tensor([0.0, 1.75, 1.7499999, 2.0**-149, 3.4e38]),
        ]
    )
    ct = generate_mx_scales(amax).clamp(0, 255)
    assert torch.equal(e8m0_from_amax(amax, ScaleRule.EVEN).float(), ct)


def test_e8m0_floor_is_the_exact_exponent():
    gen = torch.Generator().manual_seed(6)
    amax = torch.exp2(torch.rand(10_000, generator=gen) * 200 - 100)
    # fp64 log2 of an fp32 value cannot round across an integer
    expected = (torch.floor(torch.log2(amax.double())) + 125).clamp(0, 255)
    assert torch.equal(e8m0_from_amax(amax, ScaleRule.FLOOR).double(), expected)


def test_e8m0_rejects_other_dtypes_and_rules():
    with pytest.raises(ValueError, match="got torch.float64"):
        e8m0_from_amax(torch.ones(1, dtype=torch.float64), ScaleRule.EVEN)
    with pytest.raises(ValueError, match="'ceil'"):
        e8m0_from_amax(torch.ones(1), "ceil")


E8M0_DECODE_TABLE = [
    (127, torch.float32, 1.0),
    (126, torch.float32, 0.5),
    (0, torch.float32, 2.0**-127),  # fp32 subnormal
    (254, torch.float32, 2.0**127),
    (0, torch.bfloat16, 2.0**-127),  # bf16 subnormal
    (103, torch.float16, 2.0**-24),  # smallest fp16 subnormal
    (102, torch.float16, 0.0),  # 2^-25 rounds to 0 in fp16
    (142, torch.float16, 2.0**15),
    (143, torch.float16, INF),
]


@pytest.mark.parametrize("byte, dtype, value", E8M0_DECODE_TABLE)
def test_e8m0_decode_matches_the_golden_table(byte, dtype, value):
    decoded = e8m0_decode(torch.tensor([byte], dtype=torch.uint8), dtype)
    assert decoded.dtype == dtype
    assert decoded.item() == value


def test_e8m0_decode_of_0xff_is_nan():
    assert torch.isnan(e8m0_decode(torch.tensor([255], dtype=torch.uint8))).all()


def test_e8m0_decode_equals_compressed_tensors_in_bf16():
    every = torch.arange(0, 255, dtype=torch.int32).to(torch.uint8)
    ours = e8m0_decode(every, torch.bfloat16)
    assert torch.equal(ours.view(torch.int16), decompress_mx_scale(every).view(torch.int16))
