"""NVFP4 reference: global-scale arithmetic, zero blocks, quirks, chunking, NaN/Inf policy."""

import pytest
import torch

from nvq.formats import nvfp4
from nvq.formats.nvfp4 import Profile
from nvq.formats.scales import fp8_e4m3_bits

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t: torch.Tensor) -> list[int]:
    return t.float().view(torch.int32).flatten().tolist()


def _assert_same(a: nvfp4.NVFP4Quantized, b: nvfp4.NVFP4Quantized) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(fp8_e4m3_bits(a.block_scale), fp8_e4m3_bits(b.block_scale))
    assert _bits(a.global_scale) == _bits(b.global_scale)
    assert (a.weight_scale_2 is None) == (b.weight_scale_2 is None)
    if a.weight_scale_2 is not None:
        assert _bits(a.weight_scale_2) == _bits(b.weight_scale_2)


# --- global scale, formats.md §1.2 step 3 ----------------------------------------------------

# (amax, dtype, expected g). Two roundings in the weight dtype: rnd(rnd(1/A) * 2688).
CT_GLOBAL_SCALE_TABLE = [
    (3.0, torch.bfloat16, 896.0),  # the golden vector: bf16(bf16(1/3) * 2688)
    (1.0, torch.bfloat16, 2688.0),
    (0.1, torch.bfloat16, 26880.0),
    (0.04, torch.float16, 1.0),  # fp16 overflow quirk: 2688/0.04 > 65504 -> inf -> 1.0
    (0.05, torch.float16, 53760.0),
    # fp32 still rounds twice: a single 2688/A division would give 1050.763671875
    (2.5581395626068115, torch.float32, 1050.7635498046875),
    (0.0, torch.bfloat16, 1.0),  # clamped to finfo.tiny, then 1/tiny * 2688 overflows
    (float("nan"), torch.bfloat16, 1.0),  # NaN/Inf policy: NaN amax counts as 0
]


@pytest.mark.parametrize("amax, dtype, expected", CT_GLOBAL_SCALE_TABLE)
def test_ct_global_scale_matches_the_golden_table(amax, dtype, expected):
    g = nvfp4.global_scale(torch.tensor(amax, dtype=dtype), dtype)
    assert g.dtype == torch.float32 and g.shape == (1,)
    assert g.item() == expected


def test_ct_global_scale_of_an_inf_amax_uses_the_dtype_max():
    g = nvfp4.global_scale(torch.tensor(float("inf"), dtype=torch.bfloat16), torch.bfloat16)
    max_g = nvfp4.global_scale(torch.tensor(torch.finfo(torch.bfloat16).max), torch.bfloat16)
    assert g.item() == max_g.item() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rnd_dt_in_fp32_equals_torch_arithmetic_in_the_dtype(dtype):
    # formats.md §1.2 writes rnd_dt(fp32 op); CT runs the op on dtype tensors. Check every value.
    every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    x = every[torch.isfinite(every)]
    assert torch.equal(torch.reciprocal(x), (1.0 / x.float()).to(dtype))
    assert torch.equal(2688.0 / x, ((1.0 / x.float()).to(dtype).float() * 2688.0).to(dtype))
    six = torch.tensor(6.0, dtype=dtype)
    assert torch.equal((x / six).view(torch.int16), (x.float() / 6.0).to(dtype).view(torch.int16))


def test_modelopt_scale_2_is_one_fp32_division():
    s2 = nvfp4.modelopt_scale_2(torch.tensor(3.0, dtype=torch.bfloat16))
    assert s2.dtype == torch.float32 and s2.shape == ()
    assert s2.item() == 0.0011160714784637094  # fp32(3 / 2688), the golden weight_scale_2
    assert nvfp4.modelopt_scale_2(torch.tensor(0.0)).item() == 1.0  # all-zero group


def test_modelopt_global_scale_is_the_fp32_reciprocal_of_scale_2():
    amax = torch.tensor(3.0, dtype=torch.bfloat16)
    g = nvfp4.global_scale(amax, torch.bfloat16, Profile.MODELOPT)
    assert g.item() == 895.9999389648438  # fp32(1 / fp32(3/2688)): CT's own g is 896


def test_fp32_reciprocal_does_not_always_round_trip():
    # why MODELOPT keeps the exact multiplier in weight_scale_2 (formats.md §3.1)
    amax = torch.tensor(1.9609375, dtype=torch.bfloat16)
    s2 = nvfp4.modelopt_scale_2(amax)
    g = nvfp4.global_scale(amax, torch.bfloat16, Profile.MODELOPT)
    assert (1.0 / g).item() != s2.item()
    q = nvfp4.quantize(torch.full((1, 16), 1.9609375, dtype=torch.bfloat16), profile="modelopt")
    assert q.weight_scale_2.item() == s2.item()


# --- block scales, zero blocks, sign of zero --------------------------------------------------


def _row_with_blocks(*blocks: list[float], dtype=torch.bfloat16) -> torch.Tensor:
    return torch.tensor([sum(blocks, [])], dtype=dtype)


def test_zero_block_stores_0x20_in_ct_and_0x38_in_modelopt():
    w = _row_with_blocks([1.0] * 16, [0.0] * 16, [-0.0] * 16)
    ct = nvfp4.quantize(w)
    mo = nvfp4.quantize(w, profile=Profile.MODELOPT)
    assert fp8_e4m3_bits(ct.block_scale).tolist() == [[0x7E, 0x20, 0x20]]
    assert fp8_e4m3_bits(mo.block_scale).tolist() == [[0x7E, 0x38, 0x38]]
    for q in (ct, mo):
        assert q.codes[0, 16:].eq(0).all()  # -0.0 inputs encode as 0x0, not 0x8


def test_tiny_negative_keeps_the_sign_bit():
    w = _row_with_blocks([1.0] * 15 + [-1e-6])
    for profile in Profile:
        assert nvfp4.quantize(w, profile=profile).codes[0, 15].item() == 0x8


def test_all_zero_tensor():
    w = torch.zeros(2, 32, dtype=torch.bfloat16)
    ct = nvfp4.quantize(w)
    assert ct.global_scale.item() == 1.0
    assert fp8_e4m3_bits(ct.block_scale).eq(0x20).all() and ct.codes.eq(0).all()
    mo = nvfp4.quantize(w, profile=Profile.MODELOPT)
    assert mo.weight_scale_2.item() == 1.0  # ModelOpt itself writes NaN scales here
    assert fp8_e4m3_bits(mo.block_scale).eq(0x38).all() and mo.codes.eq(0).all()


def test_fp16_small_tensor_quirk_flushes_blocks_to_zero():
    # amax 0.004 < 0.041: g overflows to 1.0, a_b/6 < 2^-10 flushes to 0 -> 0.125, codes ~0
    w = torch.full((1, 16), 0.004, dtype=torch.float16)
    w[0, 1] = -0.004
    q = nvfp4.quantize(w)
    assert q.global_scale.item() == 1.0
    assert fp8_e4m3_bits(q.block_scale).tolist() == [[0x20]]
    assert q.codes[0, 0].item() == 0x0 and q.codes[0, 1].item() == 0x8


def test_modelopt_clamps_tiny_block_scales_up_to_2_pow_minus_9():
    w = _row_with_blocks([448.0 * 6] + [0.0] * 15, [1e-3] + [0.0] * 15, dtype=torch.float32)
    q = nvfp4.quantize(w, profile=Profile.MODELOPT)
    assert fp8_e4m3_bits(q.block_scale).tolist() == [[0x7E, 0x01]]


def test_given_global_scale_is_used_as_is():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    shared = torch.tensor([123.0])
    q = nvfp4.quantize(w, shared)
    assert q.global_scale.item() == 123.0
    assert not torch.equal(q.block_scale.float(), nvfp4.quantize(w).block_scale.float())


def test_modelopt_takes_an_exact_shared_weight_scale_2():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    s2 = nvfp4.modelopt_scale_2(nvfp4.tensor_amax(w))
    _assert_same(nvfp4.quantize(w, profile=Profile.MODELOPT, weight_scale_2=s2),
                 nvfp4.quantize(w, profile=Profile.MODELOPT))  # fmt: skip


def test_weight_scale_2_helper():
    w = torch.tensor([[3.0] + [0.5] * 15], dtype=torch.bfloat16)
    assert nvfp4.weight_scale_2(nvfp4.quantize(w)).item() == (1.0 / torch.tensor(896.0)).item()
    mo = nvfp4.quantize(w, profile=Profile.MODELOPT)
    assert nvfp4.weight_scale_2(mo).item() == 0.0011160714784637094


# --- row-chunk independence ------------------------------------------------------------------


@pytest.mark.parametrize("profile", list(Profile))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_chunks_quantize_to_row_slices(profile, dtype):
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(41, 128, generator=gen) * 0.05).to(dtype)
    w[5, :16] = 0
    g = nvfp4.global_scale(nvfp4.tensor_amax(w), dtype, profile)
    whole = nvfp4.quantize(w, g, profile)
    for start, stop in [(0, 1), (1, 8), (8, 33), (33, 41)]:
        part = nvfp4.quantize(w[start:stop], g, profile)
        sliced = nvfp4.NVFP4Quantized(
            whole.codes[start:stop], whole.block_scale[start:stop], whole.global_scale,
            whole.weight_scale_2,
        )  # fmt: skip
        _assert_same(part, sliced)


def test_ct_quantize_with_its_own_scale_equals_passing_it():
    w = torch.randn(9, 64, generator=torch.Generator().manual_seed(8)).half()
    g = nvfp4.global_scale(nvfp4.tensor_amax(w), torch.float16)
    _assert_same(nvfp4.quantize(w), nvfp4.quantize(w, g))


# --- NaN / Inf policy ------------------------------------------------------------------------


@pytest.mark.parametrize("profile", list(Profile))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_quantizes_as_zero_and_inf_as_the_dtype_max(profile, dtype):
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(3, 48, generator=gen).to(dtype)
    poisoned = w.clone()
    poisoned[0, 3], poisoned[1, 20], poisoned[2, 40] = float("nan"), float("inf"), -float("inf")
    cleaned = w.clone()
    big = torch.finfo(dtype).max
    cleaned[0, 3], cleaned[1, 20], cleaned[2, 40] = 0.0, big, -big
    _assert_same(
        nvfp4.quantize(poisoned, profile=profile), nvfp4.quantize(cleaned, profile=profile)
    )
    assert nvfp4.tensor_amax(poisoned).item() == big


def test_inf_weight_pinned_bytes():
    w = torch.tensor([[float("inf"), -1.0] + [0.0] * 14, [float("nan")] + [0.5] * 15])
    q = nvfp4.quantize(w)
    assert fp8_e4m3_bits(q.block_scale).tolist() == [[0x7E], [0x20]]
    assert q.codes[:, :2].tolist() == [[0x7, 0x8], [0x0, 0x0]]
    assert _bits(q.global_scale) == [0x05280000]  # from A = finfo(float32).max


# --- dequantize ------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", list(Profile))
def test_dequantize_error_is_within_one_step(profile):
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(16, 256, generator=gen) * 0.02
    q = nvfp4.quantize(w, profile=profile)
    step = nvfp4.block_step(q).repeat_interleave(16, dim=1)
    error = (nvfp4.dequantize(q) - w).abs()
    assert (error <= step * 1.0001).all()  # E2M1's widest gap (4 -> 6) is 2 steps


def test_dequantize_dtypes_and_negative_zero():
    w = _row_with_blocks([1.0] * 15 + [-1e-6])
    q = nvfp4.quantize(w)
    for dtype in DTYPES:
        out = nvfp4.dequantize(q, dtype)
        assert out.dtype == dtype and torch.signbit(out[0, 15])
    with pytest.raises(ValueError, match="got torch.float64"):
        nvfp4.dequantize(q, torch.float64)


# --- input validation ------------------------------------------------------------------------


def test_k_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="K % 16 == 0, got K=40"):
        nvfp4.quantize(torch.zeros(2, 40))


@pytest.mark.parametrize(
    "w, message",
    [
        (torch.zeros(2, 32, dtype=torch.float64), "got torch.float64"),
        (torch.zeros(32), r"2-D \[N, K\] weight, got shape \(32,\)"),
    ],
)
def test_bad_weights_are_rejected(w, message):
    with pytest.raises(ValueError, match=message):
        nvfp4.quantize(w)


@pytest.mark.parametrize(
    "g, message",
    [
        (torch.tensor([0.0]), "finite and > 0, got 0.0"),
        (torch.tensor([float("inf")]), "finite and > 0, got inf"),
        (torch.tensor([1.0, 2.0]), "1-element float tensor"),
        (torch.tensor([3]), "1-element float tensor"),
    ],
)
def test_bad_global_scales_are_rejected(g, message):
    with pytest.raises(ValueError, match=message):
        nvfp4.quantize(torch.ones(1, 16), g)


def test_scale_arguments_are_checked_against_the_profile():
    w = torch.ones(1, 16)
    with pytest.raises(ValueError, match="ct profile takes global_scale"):
        nvfp4.quantize(w, weight_scale_2=torch.tensor(1.0))
    with pytest.raises(ValueError, match="not both"):
        nvfp4.quantize(w, torch.tensor([1.0]), Profile.MODELOPT, weight_scale_2=torch.tensor(1.0))
    with pytest.raises(ValueError, match="'bogus'"):
        nvfp4.quantize(w, profile="bogus")


@pytest.mark.parametrize("profile", list(Profile))
def test_zero_row_chunk_quantizes_to_empty_tensors(profile):
    q = nvfp4.quantize(torch.zeros(0, 32, dtype=torch.bfloat16), torch.tensor([896.0]), profile)
    assert q.codes.shape == (0, 32) and q.block_scale.shape == (0, 2)
    assert nvfp4.dequantize(q).shape == (0, 32)
