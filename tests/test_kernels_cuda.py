"""CUDA kernels equal the reference codecs byte for byte (packed codes, block scales, global scale
bits) and dequantize exactly as the reference does. Run on a GPU machine: pytest -m cuda.

Without CUDA these tests fail rather than skip; CI deselects them with -m "not cuda".
"""

from __future__ import annotations

import pytest
import torch

from nvq import ops
from nvq.formats import e2m1, mxfp4, nvfp4

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# rows × K: 1, 7, 100 and 8192 rows; K from one NVFP4 block (16) to 28672.
SHAPES = [(1, 32), (1, 28672), (7, 96), (7, 4096), (100, 64), (100, 2816), (100, 28672), (8192, 64), (8192, 704)]


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU; deselect with -m 'not cuda' on machines without one")
    assert ops.kernels_available(), "the CUDA kernels did not build on this GPU machine"


def reference_nvfp4(w_cpu: torch.Tensor, g: torch.Tensor | None = None):
    q = nvfp4.quantize(w_cpu, global_scale=g)
    return e2m1.pack_pairs(q.codes), q.block_scale.view(torch.uint8), q.global_scale


def kernel_nvfp4(w: torch.Tensor, members: list[torch.Tensor] | None = None):
    group = members or [w]
    amax = torch.stack([ops.tensor_amax(m.cuda()) for m in group]).amax()
    g = ops.nvfp4_global_scale(amax, w.dtype)
    packed, scale = ops.nvfp4_quantize_packed(w.cuda(), g)
    assert ops.backend("nvfp4_quantize_packed") == "cuda"
    return packed.cpu(), scale.view(torch.uint8).cpu(), g.cpu()


def assert_nvfp4_equal(w: torch.Tensor, members: list[torch.Tensor] | None = None):
    group = members or [w]
    g_ref = nvfp4.global_scale(torch.stack([nvfp4.tensor_amax(m) for m in group]).amax(), w.dtype)
    ref = reference_nvfp4(w, g_ref)
    got = kernel_nvfp4(w, members)
    assert torch.equal(got[2].view(torch.int32), ref[2].view(torch.int32)), "global scale bits differ"
    assert_bytes_equal(got[1], ref[1], "block scales")
    assert_bytes_equal(got[0], ref[0], "packed codes")
    if members is None:  # the one-call path (amax, global scale, tables, codes from one launcher)
        packed, scale, g = ops.nvfp4_quantize(w.cuda())
        assert ops.backend("nvfp4_quantize") == "cuda"
        assert torch.equal(g.cpu().view(torch.int32), ref[2].view(torch.int32)), "one call: global scale bits differ"
        assert_bytes_equal(scale.view(torch.uint8).cpu(), ref[1], "one call: block scales")
        assert_bytes_equal(packed.cpu(), ref[0], "one call: packed codes")


def assert_mxfp4_equal(w: torch.Tensor):
    q = mxfp4.quantize(w)
    packed, scale = ops.mxfp4_quantize_packed(w.cuda())
    assert ops.backend("mxfp4_quantize_packed") == "cuda"
    assert_bytes_equal(scale.cpu(), q.scale, "E8M0 scales")
    assert_bytes_equal(packed.cpu(), e2m1.pack_pairs(q.codes), "packed codes")


def assert_bytes_equal(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = (got != want).nonzero()
    assert bad.numel() == 0, (
        f"{what}: {bad.shape[0]} of {got.numel()} bytes differ; first at {bad[0].tolist()}: "
        f"kernel {got[tuple(bad[0])]:#04x} vs reference {want[tuple(bad[0])]:#04x}"
    )


def random_weight(shape, dtype, std, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * std).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_random_equals_reference(shape, dtype):
    for i, std in enumerate((1e-4, 0.02, 1.0)):
        w = random_weight(shape, dtype, std, seed=i)
        assert_nvfp4_equal(w)
        assert_mxfp4_equal(w)


def edge_weights(dtype) -> dict[str, torch.Tensor]:
    finfo = torch.finfo(dtype)
    k = 64
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0])
    rows = {
        "zeros": torch.zeros(4, k),
        "signed zeros": torch.tensor([0.0, -0.0] * (k // 2)).repeat(3, 1),
        # block amax 6 makes the block step 1 (global amax 6: g = 448, s = 448): exact E2M1 ties
        "exact ties": ties.repeat(2, k // 16),
        "ties scaled": (ties * 0.5).repeat(2, k // 16),
        "all-zero block": torch.cat([torch.zeros(2, 16), torch.randn(2, k - 16)], 1),
        "tiny negatives": torch.cat([torch.full((2, 16), -1e-7), torch.ones(2, 16), torch.randn(2, k - 32)], 1),
        # blocks far below the tensor amax get E4M3 subnormal (or zero → 0x20) block scales
        "subnormal block scales": torch.cat([torch.randn(2, 16) * 1e-3, torch.randn(2, 16) * 1e-5,
                                             torch.full((2, 16), 500.0), torch.randn(2, 16) * 0.1], 1),
        "dtype max": torch.full((2, k), finfo.max),
        "dtype tiny": torch.full((2, k), finfo.tiny) * torch.randn(2, k).sign(),
        "huge outlier": torch.cat([torch.randn(2, k - 1) * 0.01, torch.full((2, 1), 1e4 if dtype != torch.float16 else 6e4)], 1),
        "mantissa 1.75 amax": torch.cat([torch.full((2, 1), 1.75), torch.randn(2, 31) * 0.1,
                                         torch.full((2, 1), 1.74), torch.randn(2, 31) * 0.1], 1),
    }
    return {name: t.to(dtype) for name, t in rows.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_edge_cases_equal_reference(dtype):
    for name, w in edge_weights(dtype).items():
        try:
            assert_nvfp4_equal(w)
            assert_mxfp4_equal(w)
        except AssertionError as e:
            raise AssertionError(f"{name} ({dtype}): {e}") from None


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_follow_the_reference_policy(dtype):
    w = random_weight((3, 64), dtype, 0.02, seed=7)
    w[0, 3] = float("nan")
    w[1, 17] = float("inf")
    w[2, 40] = float("-inf")
    assert_nvfp4_equal(w)
    assert_mxfp4_equal(w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fusion_group_shares_one_global_scale(dtype):
    q = random_weight((64, 128), dtype, 0.02, seed=1)
    k = random_weight((32, 128), dtype, 0.5, seed=2)  # the group amax comes from k
    v = random_weight((32, 128), dtype, 0.01, seed=3)
    for member in (q, k, v):
        assert_nvfp4_equal(member, members=[q, k, v])


def test_amax_accumulates_over_chunks_and_unaligned_lengths():
    w = random_weight((1, 1000 * 8 + 3), torch.bfloat16, 1.0, seed=4).reshape(-1)
    assert torch.equal(ops.tensor_amax(w.cuda()).cpu(), nvfp4.tensor_amax(w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 4096), (100, 2816), (8192, 704)])
def test_dequantize_equals_reference(shape, dtype):
    rows, k = shape
    gen = torch.Generator().manual_seed(rows + k)
    packed = torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, generator=gen)
    codes = e2m1.unpack_pairs(packed)
    # every E4M3 byte but the NaNs (0x7F, 0xFF) and the negative half, which no quantizer writes
    nv_scale = torch.randint(0, 0x7F, (rows, k // 16), dtype=torch.uint8, generator=gen)
    for g in (torch.tensor([896.0]), torch.tensor([1.0]), torch.tensor([3.0e6])):
        want = nvfp4.dequantize(nvfp4.NVFP4Quantized(codes, nv_scale.view(torch.float8_e4m3fn), g), dtype)
        got = ops.nvfp4_dequantize_packed(packed.cuda(), nv_scale.view(torch.float8_e4m3fn).cuda(), g.cuda(), dtype)
        assert ops.backend("nvfp4_dequantize_packed") == "cuda"
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), f"nvfp4 dequant g={float(g)}"
    mx_scale = torch.randint(0, 256, (rows, k // 32), dtype=torch.uint8, generator=gen)
    want = mxfp4.dequantize(mxfp4.MXFP4Quantized(codes, mx_scale), dtype)
    got = ops.mxfp4_dequantize_packed(packed.cuda(), mx_scale.cuda(), dtype)
    assert ops.backend("mxfp4_dequantize_packed") == "cuda"
    # byte 255 decodes to NaN in both; NaN payload bits are not part of a value (CUDA writes the
    # canonical NaN, x86 propagates its operand), so NaNs must sit in the same places and every
    # other value must match bit for bit.
    got = got.cpu()
    assert torch.equal(got.isnan(), want.isnan()), "mxfp4 dequant: NaN positions"
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.uint8), want[finite].view(torch.uint8)), "mxfp4 dequant"


def test_convert_on_cuda_writes_the_same_bytes_as_cpu(tmp_path):
    from nvq.quant.pipeline import convert
    from tests.support.tiny_models import build_tiny_gemma4

    src = build_tiny_gemma4(tmp_path / "src", "moe")
    for scheme in ("nvfp4", "mxfp4"):
        cpu = convert(src, tmp_path / f"cpu-{scheme}", scheme, device="cpu")
        gpu = convert(src, tmp_path / f"gpu-{scheme}", scheme, device="cuda")
        assert "cuda" in gpu.device
        for f in sorted((tmp_path / f"cpu-{scheme}").iterdir()):
            assert f.read_bytes() == (tmp_path / f"gpu-{scheme}" / f.name).read_bytes(), f"{scheme}: {f.name}"
        assert cpu.bytes_written == gpu.bytes_written


def test_values_a_few_ulps_around_every_code_boundary():
    # The NVFP4 kernel encodes by comparing against cutoffs tabulated per scale byte; aim right at
    # them: in each block, element 0 fixes the block scale and the rest sit within ±3 ulps of
    # T·step for each E2M1 midpoint T (and of the smallest nonzero quotients, for the sign).
    gen = torch.Generator().manual_seed(11)
    n_blocks = 2048
    amax = torch.exp2(torch.empty(n_blocks).uniform_(-20, 2, generator=gen))  # many scale bytes
    w = torch.zeros(n_blocks, 32)  # two blocks per row with the same amax, so the same step
    w[:, 0] = w[:, 16] = amax
    w[0, 0] = w[0, 16] = 6.0  # the tensor amax, so g is known
    q = nvfp4.quantize(w)
    step = q.block_scale.float()[:, 0] / q.global_scale
    targets = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    near = []
    for t in targets:
        centre = (t * step).unsqueeze(1)
        for k in (-2, 0, 2):
            x = centre
            for _ in range(abs(k)):
                x = torch.nextafter(x, torch.full_like(x, float("inf") if k > 0 else 0.0))
            near.append(x)
    tiny = (step * 2.0**-149).unsqueeze(1)  # around the smallest nonzero quotient
    near += [tiny, torch.nextafter(tiny, torch.zeros_like(tiny))]
    body = torch.cat(near, dim=1)  # 23 columns
    body = torch.cat([body, body[:, :7]], dim=1)
    body = torch.minimum(body, w[:, :1]) * torch.where(torch.rand(body.shape, generator=gen) < 0.5, -1.0, 1.0)
    w[:, 1:16], w[:, 17:32] = body[:, :15], body[:, 15:]
    assert int((q.block_scale.view(torch.uint8)).unique().numel()) > 40
    assert_nvfp4_equal(w)
    for dtype in (torch.bfloat16, torch.float16):
        assert_nvfp4_equal(w.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_single_block_rows(dtype):
    for rows in (1, 7, 100, 8192):
        assert_nvfp4_equal(random_weight((rows, 16), dtype, 0.02, seed=rows))


def test_largest_shape_8192x28672():
    # The CPU reference is slow at 235 M elements, so the full tensor is compared with the reference
    # run on the GPU, and row slices (rows are independent given g) with the CPU reference too.
    w = random_weight((8192, 28672), torch.bfloat16, 0.02, seed=5).cuda()
    g = ops.nvfp4_global_scale(ops.tensor_amax(w), w.dtype)
    packed, scale = ops.nvfp4_quantize_packed(w, g)
    q = nvfp4.quantize(w, global_scale=g)
    assert torch.equal(g.cpu().view(torch.int32), nvfp4.global_scale(nvfp4.tensor_amax(w.cpu()), w.dtype).view(torch.int32))
    assert_bytes_equal(scale.view(torch.uint8), q.block_scale.view(torch.uint8), "block scales")
    assert_bytes_equal(packed, e2m1.pack_pairs(q.codes), "packed codes")
    mx_packed, mx_scale = ops.mxfp4_quantize_packed(w)
    mq = mxfp4.quantize(w)
    assert_bytes_equal(mx_scale, mq.scale, "E8M0 scales")
    assert_bytes_equal(mx_packed, e2m1.pack_pairs(mq.codes), "MXFP4 codes")
    for rows in (slice(0, 64), slice(4096, 4160), slice(8128, 8192)):
        cpu = nvfp4.quantize(w[rows].cpu(), global_scale=g.cpu())
        assert_bytes_equal(packed[rows].cpu(), e2m1.pack_pairs(cpu.codes), "packed codes vs CPU reference")
        assert_bytes_equal(mx_packed[rows].cpu(), e2m1.pack_pairs(mxfp4.quantize(w[rows].cpu()).codes), "MXFP4 vs CPU")


def test_unaligned_views_are_accepted():
    base = random_weight((1, 4096 + 3), torch.bfloat16, 0.02, seed=9).reshape(-1).cuda()
    view = base[3:]  # starts 6 bytes into the allocation
    assert view.data_ptr() % 16
    assert torch.equal(ops.tensor_amax(view).cpu(), nvfp4.tensor_amax(view.cpu()))
    w = view.reshape(64, 64)
    packed, scale = ops.mxfp4_quantize_packed(w)
    assert torch.equal(packed.cpu(), e2m1.pack_pairs(mxfp4.quantize(w.cpu()).codes))


def expert_stack(dtype, experts=5, shape=(64, 128)):
    stds = (1e-4, 0.02, 1.0, 0.3, 0.005)
    stack = torch.stack([random_weight(shape, dtype, stds[e % len(stds)], seed=100 + e) for e in range(experts)])
    stack[1, 3, 5] = float("nan")
    stack[2, 7, 9] = float("inf")
    stack[3, 0, :16] = 0.0
    return stack


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_stack_equals_the_reference_per_expert(dtype):
    stack = expert_stack(dtype)
    own = torch.stack([nvfp4.tensor_amax(w) for w in stack])
    amax = ops.expert_amax(stack.cuda())
    assert ops.backend("expert_amax") == "cuda"
    assert torch.equal(amax.cpu().view(torch.uint8), own.view(torch.uint8))
    shared = own.float().amax()
    for given in (None, shared.expand(len(stack)).cuda()):
        packed, block_scale, g = ops.nvfp4_quantize_experts(stack.cuda(), amax=given)
        assert ops.backend("nvfp4_quantize_experts") == "cuda"
        for e, w in enumerate(stack):
            g_ref = nvfp4.global_scale(own[e] if given is None else shared, dtype)
            ref = reference_nvfp4(w, g_ref)
            assert torch.equal(g[e:e + 1].cpu().view(torch.int32), ref[2].view(torch.int32)), f"expert {e}: g"
            assert_bytes_equal(block_scale[e].view(torch.uint8).cpu(), ref[1], f"expert {e} block scales")
            assert_bytes_equal(packed[e].cpu(), ref[0], f"expert {e} codes")
    mx_packed, mx_scale = ops.mxfp4_quantize_experts(stack.cuda())
    assert ops.backend("mxfp4_quantize_experts") == "cuda"
    for e, w in enumerate(stack):
        q = mxfp4.quantize(w)
        assert_bytes_equal(mx_scale[e].cpu(), q.scale, f"expert {e} E8M0 scales")
        assert_bytes_equal(mx_packed[e].cpu(), e2m1.pack_pairs(q.codes), f"expert {e} MXFP4 codes")


def test_gemma4_expert_stack_128x704x2816():
    # Gemma-4 26B-A4B: 128 experts of 704×2816. The batched call equals one ops call per expert
    # (each byte-checked against the reference above) and, for a few experts, the CPU reference.
    gen = torch.Generator(device="cuda").manual_seed(3)
    stack = (torch.randn(128, 704, 2816, generator=gen, device="cuda") * 0.02
             * torch.linspace(0.1, 10, 128, device="cuda").view(-1, 1, 1)).to(torch.bfloat16)
    packed, block_scale, g = ops.nvfp4_quantize_experts(stack)
    assert len(g.unique()) > 64  # per-expert global scales
    for e in range(128):
        g_e = ops.nvfp4_global_scale(ops.tensor_amax(stack[e]), stack.dtype)
        p_e, s_e = ops.nvfp4_quantize_packed(stack[e], g_e)
        assert torch.equal(g[e:e + 1], g_e), f"expert {e}: global scale"
        assert torch.equal(block_scale[e].view(torch.uint8), s_e.view(torch.uint8)), f"expert {e}: block scales"
        assert torch.equal(packed[e], p_e), f"expert {e}: codes"
    for e in (0, 77, 127):
        ref = reference_nvfp4(stack[e].cpu(), g[e:e + 1].cpu())
        assert_bytes_equal(packed[e].cpu(), ref[0], f"expert {e} codes vs CPU reference")
    mx_packed, mx_scale = ops.mxfp4_quantize_experts(stack)
    for e in (0, 127):
        q = mxfp4.quantize(stack[e].cpu())
        assert_bytes_equal(mx_packed[e].cpu(), e2m1.pack_pairs(q.codes), f"expert {e} MXFP4 codes")
