"""Golden edge tables for the E2M1 codec: ties, signed zero, saturation and non-finite input."""

import pytest
import torch

from nvq.formats import e2m1
from nvq.formats.e2m1 import Rounding

INF = float("inf")
NAN = float("nan")
NEXT_ABOVE_QUARTER = 0.25000003  # the fp32 right after 0.25

# (scaled value, RNE code, GGML code). Ties: RNE goes to the even code, GGML to the lower
# magnitude. A negative that rounds to 0 keeps the sign in RNE (0x8) but not in GGML (0x0).
E2M1_TABLE = [
    (0.0, 0x0, 0x0),
    (-0.0, 0x0, 0x0),
    (1e-30, 0x0, 0x0),
    (-1e-30, 0x8, 0x0),
    (-1e-45, 0x8, 0x0),  # fp32 subnormal
    (0.25, 0x0, 0x0),
    (-0.25, 0x8, 0x0),
    (NEXT_ABOVE_QUARTER, 0x1, 0x1),
    (0.5, 0x1, 0x1),
    (0.75, 0x2, 0x1),
    (-0.75, 0xA, 0x9),
    (1.0, 0x2, 0x2),
    (1.25, 0x2, 0x2),
    (-1.25, 0xA, 0xA),
    (1.5, 0x3, 0x3),
    (1.75, 0x4, 0x3),
    (-1.75, 0xC, 0xB),
    (2.0, 0x4, 0x4),
    (2.5, 0x4, 0x4),
    (-2.5, 0xC, 0xC),
    (3.0, 0x5, 0x5),
    (3.5, 0x6, 0x5),
    (-3.5, 0xE, 0xD),
    (4.0, 0x6, 0x6),
    (5.0, 0x6, 0x6),
    (-5.0, 0xE, 0xE),
    (5.0000005, 0x7, 0x7),
    (6.0, 0x7, 0x7),
    (-6.0, 0xF, 0xF),
    (7.0, 0x7, 0x7),  # saturation beyond 6
    (-7.0, 0xF, 0xF),
    (1e30, 0x7, 0x7),
    (INF, 0x7, 0x7),  # non-finite policy: ±Inf saturates
    (-INF, 0xF, 0xF),
    (NAN, 0x0, 0x0),  # non-finite policy: NaN -> +0
    (-NAN, 0x0, 0x0),
]


@pytest.mark.parametrize("rounding, column", [(Rounding.RNE, 1), (Rounding.GGML, 2)])
def test_encode_matches_the_golden_table(rounding, column):
    y = torch.tensor([row[0] for row in E2M1_TABLE], dtype=torch.float32)
    expected = torch.tensor([row[column] for row in E2M1_TABLE], dtype=torch.uint8)
    codes = e2m1.encode(y, rounding)
    assert codes.dtype == torch.uint8
    mismatches = [
        (row[0], hex(row[column]), hex(int(c)))
        for row, c in zip(E2M1_TABLE, codes, strict=True)
        if c != row[column]
    ]
    assert torch.equal(codes, expected), mismatches


def test_rne_is_the_default_rounding():
    y = torch.tensor([0.75, 1.75, 3.5, -1e-30])
    assert e2m1.encode(y).tolist() == [0x2, 0x4, 0x6, 0x8]


def test_rounding_accepts_its_string_value():
    y = torch.tensor([1.75])
    assert e2m1.encode(y, "ggml").item() == 0x3


def test_bf16_and_fp16_inputs_encode_like_their_fp32_values():
    y = torch.linspace(-7, 7, 1001)
    for dtype in (torch.bfloat16, torch.float16):
        low = y.to(dtype)
        assert torch.equal(e2m1.encode(low), e2m1.encode(low.float()))


def test_every_code_value_encodes_back_to_its_code():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1.decode(codes)
    for rounding in Rounding:
        back = e2m1.encode(values, rounding)
        # code 0x8 decodes to -0.0, and an input of exactly -0.0 encodes as 0x0
        expected = torch.where(codes == 0x8, 0x0, codes).to(torch.uint8)
        assert torch.equal(back, expected), rounding


def test_decode_table_and_negative_zero():
    values = e2m1.decode(torch.arange(16, dtype=torch.uint8))
    assert values.dtype == torch.float32
    assert values.tolist() == [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ]  # fmt: skip
    assert not torch.signbit(values[0]) and torch.signbit(values[8])


def test_pack_puts_even_k_in_the_low_nibble():
    codes = torch.tensor([[0x1, 0x2, 0x3, 0xF]], dtype=torch.uint8)
    assert e2m1.pack_pairs(codes).tolist() == [[0x21, 0xF3]]
    assert e2m1.unpack_pairs(torch.tensor([[0x21, 0xF3]], dtype=torch.uint8)).tolist() == [
        [0x1, 0x2, 0x3, 0xF]
    ]


def test_pack_unpack_round_trip_on_random_codes():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (5, 3, 64), generator=gen, dtype=torch.uint8)
    packed = e2m1.pack_pairs(codes)
    assert packed.shape == (5, 3, 32)
    assert torch.equal(e2m1.unpack_pairs(packed), codes)


def test_pack_rejects_an_odd_row_length():
    with pytest.raises(ValueError, match="even number of codes.*got 3"):
        e2m1.pack_pairs(torch.zeros(2, 3, dtype=torch.uint8))


def test_codes_must_be_uint8_nibbles():
    with pytest.raises(ValueError, match="0..15, got a code 16"):
        e2m1.decode(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8, got torch.int64"):
        e2m1.pack_pairs(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="uint8 bytes, got torch.int32"):
        e2m1.unpack_pairs(torch.zeros(2, dtype=torch.int32))


def test_encode_rejects_non_float_input():
    with pytest.raises(ValueError, match="got torch.int32"):
        e2m1.encode(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="got torch.float64"):
        e2m1.encode(torch.zeros(2, dtype=torch.float64))
