"""GGUF MXFP4/NVFP4 block layouts: byte positions, gguf-py 0.19.0 bit-exactness, round trips."""

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from nvq.formats import mxfp4, nvfp4
from nvq.formats.constants import GGUF_MXFP4_BLOCK, GGUF_NVFP4_BLOCK
from nvq.formats.e2m1 import Rounding
from nvq.formats.nvfp4 import Profile
from nvq.formats.scales import ScaleRule, fp8_e4m3_bits
from nvq.layouts.gguf_blocks import (
    mxfp4_from_blocks,
    mxfp4_to_blocks,
    nvfp4_from_blocks,
    nvfp4_to_blocks,
)

MXFP4_TYPE = GGMLQuantizationType.MXFP4
NVFP4_TYPE = GGMLQuantizationType.NVFP4
GGUF_PROFILE = (ScaleRule.FLOOR, Rounding.GGML)


def _random(index: int, shape=(9, 256), dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(index)
    std = [1e-4, 3e-3, 0.02, 0.5, 4.0][index % 5]
    return (torch.randn(*shape, generator=gen) * std).to(dtype)


def _gguf_bytes(w: torch.Tensor) -> np.ndarray:
    return gguf_quantize(w.float().numpy(), MXFP4_TYPE)


def test_block_sizes_agree_with_gguf_py():
    assert GGML_QUANT_SIZES[MXFP4_TYPE] == GGUF_MXFP4_BLOCK
    assert GGML_QUANT_SIZES[NVFP4_TYPE] == GGUF_NVFP4_BLOCK


# --- byte positions --------------------------------------------------------------------------


def test_mxfp4_block_puts_element_j_low_and_j_plus_16_high():
    codes = (torch.arange(64) % 16).to(torch.uint8).reshape(1, 64)
    q = mxfp4.MXFP4Quantized(codes=codes, scale=torch.tensor([[0x7E, 0x05]], dtype=torch.uint8))
    blocks = mxfp4_to_blocks(q)
    assert blocks.shape == (1, 34) and blocks.dtype == np.uint8
    assert blocks[0, 0] == 0x7E and blocks[0, 17] == 0x05
    # element j = j % 16 and element j + 16 = j % 16 again
    assert blocks[0, 1:17].tolist() == [j | (j << 4) for j in range(16)]


def test_nvfp4_block_puts_element_16s_plus_j_low_and_16s_plus_8_plus_j_high():
    codes = torch.arange(64).remainder(16).to(torch.uint8).reshape(1, 64)
    codes[0, 16:32] = 0xF  # second sub-block all 0xF
    scales = torch.tensor([[1.0, 0.125, 448.0, 2.0**-9]]).to(torch.float8_e4m3fn)
    q = nvfp4.NVFP4Quantized(codes, scales, torch.tensor([2.0]))
    blocks, scale = nvfp4_to_blocks(q)
    assert blocks.shape == (1, 36) and scale == 0.5
    assert blocks[0, :4].tolist() == [0x38, 0x20, 0x7E, 0x01]
    assert blocks[0, 4:12].tolist() == [j | ((j + 8) << 4) for j in range(8)]
    assert blocks[0, 12:20].tolist() == [0xFF] * 8


# --- MXFP4 against gguf-py -------------------------------------------------------------------


@pytest.mark.parametrize("index", range(40))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mxfp4_gguf_profile_equals_gguf_quantize(index, dtype):
    w = _random(index, dtype=dtype)
    ours = mxfp4_to_blocks(mxfp4.quantize(w, *GGUF_PROFILE))
    assert np.array_equal(ours, _gguf_bytes(w))


def test_mxfp4_gguf_profile_equals_gguf_quantize_on_fp16_via_fp32():
    # fp16 arithmetic has CT's underflow quirk, so fp16 weights go through fp32 (mxfp4 docstring)
    for index in range(20):
        w = _random(index, dtype=torch.float16)
        w[0, :32] = 0
        assert np.array_equal(
            mxfp4_to_blocks(mxfp4.quantize(w.float(), *GGUF_PROFILE)), _gguf_bytes(w)
        )


def test_mxfp4_gguf_profile_equals_gguf_quantize_on_edge_rows():
    rows = torch.zeros(6, 64)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    rows[0, :8], rows[0, 8:16] = ties, -ties  # ties at scale 1 (amax 6 -> byte 127)
    rows[1, 0], rows[1, 1:5] = 1.0, torch.tensor([-1e-6, -0.0, 1e-30, -0.1])  # tiny negatives
    rows[2, 0] = 1.75  # the EVEN/FLOOR edge
    rows[3, :32] = 7.5  # beyond 6 x scale -> saturates at ±6
    rows[3, 32:] = -7.5
    rows[4, :32] = torch.linspace(-3e-38, 3e-38, 32)  # tiny, below 2^-125: byte 0
    rows[5] = torch.linspace(-100, 100, 64)
    ours = mxfp4_to_blocks(mxfp4.quantize(rows, *GGUF_PROFILE))
    assert np.array_equal(ours, _gguf_bytes(rows))


@pytest.mark.parametrize("index", range(10))
def test_gguf_dequantize_of_our_mxfp4_blocks_equals_ours(index):
    w = _random(index, shape=(5, 128))
    for rule, rounding in [(ScaleRule.EVEN, Rounding.RNE), GGUF_PROFILE]:
        q = mxfp4.quantize(w, rule, rounding)
        theirs = gguf_dequantize(mxfp4_to_blocks(q), MXFP4_TYPE)
        ours = mxfp4.dequantize(q, torch.float32).numpy()
        # gguf-py decodes code 0x8 as +0.0, nvq as -0.0: compare values, then non-zero bits
        assert np.array_equal(theirs, ours)
        nonzero = ours != 0
        assert np.array_equal(theirs[nonzero].view(np.int32), ours[nonzero].view(np.int32))


def test_floor_disagrees_with_gguf_py_just_below_a_power_of_two():
    # Peer disagreement: gguf-py takes floor(np.log2(amax)) in fp32, and log2 of the fp32
    # right below 2^21 rounds to 21.0; the exact floor (OCP, formats.md §2c) is 20.
    amax = 2.0**20 * (2 - 2.0**-23)
    w = torch.zeros(1, 32)
    w[0, 0] = amax
    assert mxfp4.quantize(w, *GGUF_PROFILE).scale.item() == 127 + 20 - 2
    assert _gguf_bytes(w)[0, 0] == 127 + 21 - 2


# --- NVFP4 against gguf-py dequantize --------------------------------------------------------

# gguf-py computes fp32((s · code) · scale), one rounding, with scale = weight_scale_2(q).
# nvq computes fp32(code · step): CT step = fp32(s / g) -> up to 2 ulp apart (3 roundings
# against 1); ModelOpt step = fp32(s · s2) -> up to 1 ulp. Exact where code is a power of two.
MAX_ULPS = {Profile.CT: 2, Profile.MODELOPT: 1}


@pytest.mark.parametrize("profile", list(Profile))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gguf_dequantize_times_scale_matches_within_stated_ulps(profile, dtype):
    worst = 0
    for index in range(12):
        q = nvfp4.quantize(_random(index, shape=(7, 192), dtype=dtype), profile=profile)
        blocks, scale = nvfp4_to_blocks(q)
        theirs = torch.from_numpy(gguf_dequantize(blocks, NVFP4_TYPE) * np.float32(scale))
        ours = nvfp4.dequantize(q, torch.float32)
        assert theirs.dtype == torch.float32
        assert torch.equal(theirs == 0, ours == 0)
        nonzero = ours != 0
        assert torch.equal(torch.sign(theirs[nonzero]), torch.sign(ours[nonzero]))
        ulps = (
            theirs[nonzero].abs().view(torch.int32) - ours[nonzero].abs().view(torch.int32)
        ).abs()
        worst = max([worst, *ulps.tolist()])  # empty when fp16's tiny-tensor quirk zeroes all
        power_of_two_code = torch.isin(q.codes, torch.tensor([1, 2, 4, 6, 9, 10, 12, 14]))
        if profile is Profile.MODELOPT:
            assert torch.equal(theirs[power_of_two_code], ours[power_of_two_code])
    assert worst <= MAX_ULPS[profile]


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule, rounding", [(ScaleRule.EVEN, Rounding.RNE), GGUF_PROFILE])
def test_mxfp4_round_trip(rule, rounding):
    q = mxfp4.quantize(_random(3, shape=(11, 160), dtype=torch.bfloat16), rule, rounding)
    back = mxfp4_from_blocks(mxfp4_to_blocks(q), 160)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_nvfp4_round_trip_is_exact_for_modelopt_data(dtype):
    q = nvfp4.quantize(_random(4, shape=(6, 128), dtype=dtype), profile=Profile.MODELOPT)
    back = nvfp4_from_blocks(*_with_cols(nvfp4_to_blocks(q), 128))
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(fp8_e4m3_bits(back.block_scale), fp8_e4m3_bits(q.block_scale))
    assert back.weight_scale_2.item() == q.weight_scale_2.item()
    assert back.global_scale.item() == q.global_scale.item()
    assert torch.equal(nvfp4.dequantize(back), nvfp4.dequantize(q))


def test_nvfp4_round_trip_of_ct_data_keeps_the_multiplier_not_the_divisor():
    # GGUF stores fp32(1/g); fp32(1/fp32(1/g)) is g or one ulp away from it (formats.md §3.1)
    for index in range(8):
        q = nvfp4.quantize(_random(index, shape=(3, 64), dtype=torch.bfloat16))
        back = nvfp4_from_blocks(*_with_cols(nvfp4_to_blocks(q), 64))
        assert torch.equal(back.codes, q.codes)
        assert torch.equal(fp8_e4m3_bits(back.block_scale), fp8_e4m3_bits(q.block_scale))
        assert nvfp4.weight_scale_2(back).item() == nvfp4.weight_scale_2(q).item()
        g_bits = [t.view(torch.int32).item() for t in (back.global_scale, q.global_scale)]
        assert abs(g_bits[0] - g_bits[1]) <= 1


def _with_cols(packed: tuple[np.ndarray, float], n_cols: int) -> tuple[np.ndarray, int, float]:
    blocks, scale = packed
    return blocks, n_cols, scale


# --- errors ----------------------------------------------------------------------------------


def test_nvfp4_needs_k_multiple_of_64():
    q = nvfp4.quantize(torch.ones(2, 48))
    with pytest.raises(ValueError, match="K % 64 == 0, got K=48"):
        nvfp4_to_blocks(q)


def test_from_blocks_checks_shape_and_dtype():
    with pytest.raises(ValueError, match=r"K=64 must be uint8 \[N, 34\], got uint8 \(2, 17\)"):
        mxfp4_from_blocks(np.zeros((2, 17), dtype=np.uint8), 64)
    with pytest.raises(ValueError, match="got int16"):
        mxfp4_from_blocks(np.zeros((2, 34), dtype=np.int16), 64)
    with pytest.raises(ValueError, match="K % 64 == 0, got K=32"):
        nvfp4_from_blocks(np.zeros((2, 18), dtype=np.uint8), 32, 1.0)


def test_zero_row_tensors_pack_to_empty_block_arrays():
    nv_blocks, _ = nvfp4_to_blocks(nvfp4.quantize(torch.zeros(0, 128)))
    mx_blocks = mxfp4_to_blocks(mxfp4.quantize(torch.zeros(0, 128)))
    assert nv_blocks.shape == (0, 72) and mx_blocks.shape == (0, 68)
    assert mxfp4_from_blocks(mx_blocks, 128).codes.shape == (0, 128)
    assert nvfp4_from_blocks(nv_blocks, 128, 1.0).codes.shape == (0, 128)
