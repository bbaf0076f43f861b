"""Peer equality with compressed-tensors 0.20.0, driven as formats.md §6.1 describes.

NVFP4: preset NVFP4A16; per-16-block min/max; tensor absmax; generate_gparam;
calculate_qparams with the global scale; the scale copied into a tensor of the weight dtype;
NVFP4PackedCompressor.compress. MXFP4: the same with MXFP4A16 and MXFP4PackedCompressor.
Packed bytes, scale bytes, global-scale bits and decompressed weights must match exactly.
"""

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from nvq.formats import e2m1, mxfp4, nvfp4
from nvq.formats.scales import fp8_e4m3_bits

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STDS = [1e-4, 1e-3, 2e-2, 0.3, 1.0]
ROWS = [1, 7, 33, 64]
NVFP4_CASES_PER_DTYPE = 42  # 126 tensors
MXFP4_CASES_PER_DTYPE = 30  # 90 tensors
COLS = 256


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits of a float tensor, so that -0.0 != 0.0 and NaN payloads compare."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(width)


def _random_weight(index: int, dtype: torch.dtype, block: int) -> torch.Tensor:
    """A seeded tensor with the awkward features cycled in: outliers, zero, -0.0 and tiny blocks."""
    gen = torch.Generator().manual_seed(1000 * DTYPES.index(dtype) + index)
    rows, std = ROWS[index % len(ROWS)], STDS[index % len(STDS)]
    w = torch.randn(rows, COLS, generator=gen) * std
    flat = w.view(-1)
    if index % 5 == 1:
        flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = 85 * std  # outlier
    if index % 3 == 0:
        flat[block : 2 * block] = 0.0  # all-zero block
    if index % 4 == 0:
        flat[-block:] = -0.0  # all -0.0 block
    if index % 6 == 2:
        flat[3 * block + 5] = -1e-6 * std  # tiny negative
        flat[4 * block : 5 * block] *= 1e-3  # a tiny block next to normal ones
    return w.to(dtype)


def _scheme(preset: str) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])


def _ct_state(w: torch.Tensor, scheme: QuantizationScheme, block: int, with_global: bool) -> dict:
    """What llm-compressor's memoryless_minmax observer hands to the compressor."""
    blocks = w.reshape(w.shape[0], -1, block)
    g = None
    if with_global:
        absmax = w.abs().amax()
        g = generate_gparam(-absmax, absmax)
    scale, zero_point = calculate_qparams(
        blocks.amin(-1), blocks.amax(-1), scheme.weights, global_scale=g
    )
    scale_param = torch.empty(scale.shape, dtype=w.dtype)  # the module's scale parameter
    scale_param.copy_(scale)
    state = {"weight": w, "weight_scale": scale_param, "weight_zero_point": zero_point}
    if g is not None:
        state["weight_global_scale"] = g
    return state


NVFP4_CASES = [(d, i) for d in DTYPES for i in range(NVFP4_CASES_PER_DTYPE)]
MXFP4_CASES = [(d, i) for d in DTYPES for i in range(MXFP4_CASES_PER_DTYPE)]


def _case_id(case) -> str:
    dtype, index = case
    return f"{str(dtype).removeprefix('torch.')}-{index}"


@pytest.fixture(scope="module")
def nvfp4_scheme():
    return _scheme("NVFP4A16")


@pytest.fixture(scope="module")
def mxfp4_scheme():
    return _scheme("MXFP4A16")


@pytest.mark.parametrize("case", NVFP4_CASES, ids=_case_id)
def test_nvfp4_bytes_and_decompression_match_ct(case, nvfp4_scheme):
    dtype, index = case
    w = _random_weight(index, dtype, block=16)
    compressed = NVFP4PackedCompressor.compress(_ct_state(w, nvfp4_scheme, 16, True), nvfp4_scheme)
    q = nvfp4.quantize(w)

    assert torch.equal(e2m1.pack_pairs(q.codes), compressed["weight_packed"])
    assert torch.equal(fp8_e4m3_bits(q.block_scale), fp8_e4m3_bits(compressed["weight_scale"]))
    assert torch.equal(_bits(q.global_scale), _bits(compressed["weight_global_scale"]))

    decompressed = NVFP4PackedCompressor.decompress(compressed, nvfp4_scheme)["weight"]
    assert decompressed.dtype == torch.bfloat16  # CT always decompresses NVFP4 to bf16
    assert torch.equal(_bits(nvfp4.dequantize(q, torch.bfloat16)), _bits(decompressed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_dequantize_matches_ct_dequantize_in_every_dtype(dtype, nvfp4_scheme):
    # CT's lifecycle dequantize (the op decompress calls), asked for fp16/fp32/bf16 output
    for index in range(6):
        w = _random_weight(index, dtype, block=16)
        compressed = NVFP4PackedCompressor.compress(
            _ct_state(w, nvfp4_scheme, 16, True), nvfp4_scheme
        )
        unpacked = unpack_fp4_from_uint8(compressed["weight_packed"], *w.shape, dtype=torch.float32)
        expected = ct_dequantize(
            x_q=unpacked,
            scale=compressed["weight_scale"].to(dtype),
            args=nvfp4_scheme.weights,
            global_scale=compressed["weight_global_scale"],
            dtype=dtype,
        )
        assert torch.equal(_bits(nvfp4.dequantize(nvfp4.quantize(w), dtype)), _bits(expected))


@pytest.mark.parametrize("case", MXFP4_CASES, ids=_case_id)
def test_mxfp4_bytes_and_decompression_match_ct(case, mxfp4_scheme):
    dtype, index = case
    w = _random_weight(index, dtype, block=32)
    compressed = MXFP4PackedCompressor.compress(_ct_state(w, mxfp4_scheme, 32, False), mxfp4_scheme)
    q = mxfp4.quantize(w)

    assert torch.equal(e2m1.pack_pairs(q.codes), compressed["weight_packed"])
    assert compressed["weight_scale"].dtype == torch.uint8
    assert torch.equal(q.scale, compressed["weight_scale"])

    decompressed = MXFP4PackedCompressor.decompress(compressed, mxfp4_scheme)["weight"]
    assert decompressed.dtype == torch.bfloat16
    assert torch.equal(_bits(mxfp4.dequantize(q, torch.bfloat16)), _bits(decompressed))


def test_mxfp4_amax_1_75_vs_1_74_edge_matches_ct(mxfp4_scheme):
    for amax, byte in [(1.75, 126), (1.74, 125)]:
        w = torch.zeros(1, 32, dtype=torch.bfloat16)
        w[0, 0], w[0, 1] = amax, -0.3
        compressed = MXFP4PackedCompressor.compress(
            _ct_state(w, mxfp4_scheme, 32, False), mxfp4_scheme
        )
        q = mxfp4.quantize(w)
        assert compressed["weight_scale"].item() == q.scale.item() == byte
        assert torch.equal(e2m1.pack_pairs(q.codes), compressed["weight_packed"])


def test_fp16_quirks_are_exercised_by_the_random_cases():
    # guard: the sweep above must include fp16 tensors that hit both CT fp16 quirks
    nv = [
        nvfp4.quantize(_random_weight(i, torch.float16, 16)) for i in range(NVFP4_CASES_PER_DTYPE)
    ]
    assert any(q.global_scale.item() == 1.0 for q in nv)  # global-scale overflow -> 1.0
    mx = [
        mxfp4.quantize(_random_weight(i, torch.float16, 32)) for i in range(MXFP4_CASES_PER_DTYPE)
    ]
    assert any(bool(q.scale.eq(127).any()) for q in mx)  # zero scale -> byte 127


SMALLEST_SUBNORMAL = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float32: 2.0**-149}


def _mxfp4_edge_rows(dtype: torch.dtype) -> torch.Tensor:
    tiny = SMALLEST_SUBNORMAL[dtype]
    rows = torch.zeros(5, 64, dtype=torch.float32)
    rows[0, 0], rows[0, 1], rows[0, 2] = 64.0, -tiny, tiny  # w / scale underflows in the dtype
    rows[1, :32] = torch.linspace(-tiny * 7, tiny * 7, 32)  # an all-subnormal block
    rows[2, 0], rows[2, 32] = 1.75, 1.74  # the EVEN bump edge
    rows[3, :32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)  # ties
    rows[3, 32:] = -rows[3, :32]
    rows[4, 32:] = -0.0
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mxfp4_edge_rows_match_ct(dtype, mxfp4_scheme):
    w = _mxfp4_edge_rows(dtype)
    compressed = MXFP4PackedCompressor.compress(_ct_state(w, mxfp4_scheme, 32, False), mxfp4_scheme)
    q = mxfp4.quantize(w)
    assert torch.equal(e2m1.pack_pairs(q.codes), compressed["weight_packed"])
    assert torch.equal(q.scale, compressed["weight_scale"])


def test_bf16_mxfp4_divides_in_bf16_like_ct():
    # -2^-133 / 2^4 underflows to -0.0 in bf16 (code 0x0); in fp32 it would stay negative (0x8)
    w = _mxfp4_edge_rows(torch.bfloat16)
    assert mxfp4.quantize(w).codes[0, 1].item() == 0x0
    assert mxfp4.quantize(w.float()).codes[0, 1].item() == 0x8
