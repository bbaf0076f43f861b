"""The native CPU codec (kernels/cpu, nvq/ops_cpu.py) equals the reference codecs byte for byte:
random, adversarial and shape-edge inputs in bf16, fp16 and fp32, every bf16 and fp16 bit pattern,
dequantization, and a whole convert. Also its build cache and its silent fallback to the reference.
"""

from __future__ import annotations

import filecmp

import pytest
import torch

from nvq import ops, ops_cpu
from nvq.formats import e2m1, mxfp4, nvfp4

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 16), (1, 32), (1, 4096), (3, 96), (7, 4096), (100, 2816), (300, 1024)]
needs_cc = pytest.mark.skipif(ops_cpu.find_cc() is None, reason="no C compiler on this machine")
pytestmark = needs_cc


@pytest.fixture(scope="module", autouse=True)
def native(tmp_path_factory):
    """The library built once for this module into a private cache; its loader replaces the
    process's for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NVQ_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("NVQ_CPU_KERNELS", raising=False)
        mp.setattr(ops_cpu, "_LOADER", ops_cpu._Loader())
        lib = ops_cpu.library()
        assert lib is not None, ops_cpu.status()
        yield lib


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A loader that has decided nothing, building into an empty cache."""
    monkeypatch.setenv("NVQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ops_cpu, "_LOADER", ops_cpu._Loader())
    monkeypatch.setattr(ops, "_last_backend", {})
    return ops_cpu._LOADER


def bits(t):
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().reshape(-1).view(width)


def assert_bytes_equal(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = (bits(got) != bits(want)).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} of {got.numel()} differ, first at flat index {int(bad[0])}"


def assert_nvfp4_equal(w, g=None):
    """amax, global scale, block scales and packed codes of the native ops equal the reference."""
    if g is None:
        amax = ops.tensor_amax(w)
        assert ops.backend("tensor_amax") == "cpu"
        assert_bytes_equal(amax, nvfp4.tensor_amax(w), "amax")
        g = ops.nvfp4_global_scale(amax, w.dtype)
        assert ops.backend("nvfp4_global_scale") == "cpu"
        assert_bytes_equal(g, nvfp4.global_scale(amax, w.dtype), "global scale")
    packed, block_scale = ops.nvfp4_quantize_packed(w, g)
    assert ops.backend("nvfp4_quantize_packed") == "cpu"
    q = nvfp4.quantize(w.contiguous(), global_scale=g)
    assert block_scale.dtype == torch.float8_e4m3fn
    assert_bytes_equal(block_scale.view(torch.uint8), q.block_scale.view(torch.uint8), "block scales")
    assert_bytes_equal(packed, e2m1.pack_pairs(q.codes), "packed codes")


def assert_mxfp4_equal(w):
    packed, scale = ops.mxfp4_quantize_packed(w)
    assert ops.backend("mxfp4_quantize_packed") == "cpu"
    q = mxfp4.quantize(w.contiguous())
    assert_bytes_equal(scale, q.scale, "E8M0 scales")
    assert_bytes_equal(packed, e2m1.pack_pairs(q.codes), "packed codes")


def random_weight(shape, dtype, std, seed):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std).to(dtype)


# --- quantize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_weights_equal_the_reference(shape, dtype):
    for seed, std in enumerate((1e-4, 0.02, 1.0)):
        w = random_weight(shape, dtype, std, seed)
        assert_nvfp4_equal(w)
        if shape[1] % 32 == 0:
            assert_mxfp4_equal(w)


def edge_weights(dtype) -> dict[str, torch.Tensor]:
    finfo, k = torch.finfo(dtype), 64
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0])
    big = 6e4 if dtype == torch.float16 else 1e4
    rows = {
        "zeros": torch.zeros(4, k),
        "signed zeros": torch.tensor([0.0, -0.0] * (k // 2)).repeat(3, 1),
        # block amax 6 makes the block step 1 (g = 448, s = 448): exact E2M1 ties
        "exact ties": ties.repeat(2, k // 16),
        "ties scaled": (ties * 0.5).repeat(2, k // 16),
        "ties beside ulps": torch.cat([ties.repeat(1, k // 16), torch.nextafter(ties, ties * 2).repeat(1, k // 16)]),
        "all-zero block": torch.cat([torch.zeros(2, 16), torch.randn(2, k - 16)], 1),
        "tiny negatives": torch.cat([torch.full((2, 16), -1e-7), torch.ones(2, 16), torch.randn(2, k - 32)], 1),
        "subnormal block scales": torch.cat([torch.randn(2, 16) * 1e-3, torch.randn(2, 16) * 1e-5,
                                             torch.full((2, 16), 500.0), torch.randn(2, 16) * 0.1], 1),
        "dtype max": torch.full((2, k), finfo.max),
        "dtype tiny": torch.full((2, k), finfo.tiny) * torch.randn(2, k).sign(),
        "dtype subnormals": torch.full((2, k), finfo.tiny / 8) * torch.randn(2, k).sign(),
        "huge outlier": torch.cat([torch.randn(2, k - 1) * 0.01, torch.full((2, 1), big)], 1),
        "fp16 overflow of 2688/amax": torch.randn(2, k) * 1e-3,  # g = inf -> 1.0 in fp16
        "mantissa 1.75 amax": torch.cat([torch.full((2, 1), 1.75), torch.randn(2, 31) * 0.1,
                                         torch.full((2, 1), 1.74), torch.randn(2, 31) * 0.1], 1),
        "nan and inf": torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0] * (k // 4)).repeat(2, 1),
        "only nan": torch.full((1, k), float("nan")),
        "only -inf": torch.full((1, k), float("-inf")),
    }
    return {name: t.to(dtype) for name, t in rows.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_weights_equal_the_reference(dtype):
    for name, w in edge_weights(dtype).items():
        try:
            assert_nvfp4_equal(w)
            assert_mxfp4_equal(w)
        except AssertionError as e:
            raise AssertionError(f"{name} ({dtype}): {e}") from None


def every_bit_pattern(dtype, seed):
    """All 65536 bf16 or fp16 patterns (NaN, ±Inf, subnormals, -0 included), [2048, 32]: shuffled,
    and sorted by magnitude so that blocks of alike values reach every scale byte."""
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    shuffled = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(seed))]
    by_magnitude = values[bits(values).int().bitwise_and(0x7FFF).argsort(stable=True)]
    return shuffled.reshape(-1, 32), by_magnitude.reshape(-1, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16_bit_pattern_equals_the_reference(dtype):
    for w in every_bit_pattern(dtype, seed=0):
        assert_nvfp4_equal(w)
        assert_mxfp4_equal(w)


def test_golden_row_gives_compressed_tensors_bytes():
    # The cross-library golden 1x32 bf16 row (tests/data/vectors_row32.json, from the design docs).
    import json
    import struct
    from pathlib import Path

    vectors = json.loads((Path(__file__).parent / "data" / "vectors_row32.json").read_text())
    row = torch.frombuffer(bytearray.fromhex(vectors["input_bf16_hex"]), dtype=torch.bfloat16).reshape(1, 32)
    hexes = lambda t: " ".join(f"{b:02x}" for b in t.reshape(-1).view(torch.uint8).tolist())  # noqa: E731
    g = ops.nvfp4_global_scale(ops.tensor_amax(row), row.dtype)
    packed, block_scale = ops.nvfp4_quantize_packed(row, g)
    assert ops.backend("nvfp4_quantize_packed") == "cpu"
    nv = vectors["ct_nvfp4"]
    assert hexes(packed) == nv["weight_packed"] and hexes(block_scale) == nv["weight_scale_fp8"]
    assert struct.pack("<f", g.item()).hex(" ") == nv["weight_global_scale_hex"]
    packed, scale = ops.mxfp4_quantize_packed(row)
    mx = vectors["ct_mxfp4"]
    assert hexes(packed) == mx["weight_packed"] and hexes(scale) == mx["weight_scale_e8m0"]


def test_random_fp32_bit_patterns_equal_the_reference():
    raw = torch.randint(-(1 << 31), 1 << 31, (1 << 16,), dtype=torch.int64, generator=torch.Generator().manual_seed(5))
    w = raw.to(torch.int32).view(torch.float32)
    for block in (w, w[w.abs().argsort()]):
        assert_nvfp4_equal(block.reshape(-1, 32))
        assert_mxfp4_equal(block.reshape(-1, 32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_global_scales_including_extreme_ones(dtype):
    # A fusion group's g is passed in; tiny and huge g push the block steps to 0 and to Inf.
    w = torch.cat([random_weight((4, 64), dtype, 0.02, seed=3), edge_weights(dtype)["exact ties"]])
    for g in (1.0, 896.0, 29440.0, 3.0e6, 1e-3, 1e-30, 1e-44, 1e30, 3.0e38):
        try:
            assert_nvfp4_equal(w, torch.tensor([g]))
        except AssertionError as e:
            raise AssertionError(f"g={g}: {e}") from None


def test_global_scale_rule_over_many_amax_values():
    gen = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        finfo = torch.finfo(dtype)
        amaxes = [0.0, -1.0, finfo.tiny, finfo.tiny / 4, finfo.max, 2688 / 65504, 0.041, 0.0411, 1.0, 6.0,
                  float("nan"), float("inf"), float("-inf")]
        amaxes += (torch.rand(300, generator=gen) * 80 - 40).exp2().tolist()
        for a in amaxes:
            amax = torch.tensor(a, dtype=dtype)
            want = nvfp4.global_scale(amax, dtype)
            assert_bytes_equal(ops.nvfp4_global_scale(amax, dtype), want, f"g for amax {a} ({dtype})")
            # An fp32 amax rounded to a narrower dtype first, as the reference does.
            wide = torch.tensor(a, dtype=torch.float32)
            assert_bytes_equal(ops.nvfp4_global_scale(wide, dtype), nvfp4.global_scale(wide, dtype), f"fp32 amax {a}")


def test_amax_of_flat_empty_and_non_contiguous_tensors():
    w = random_weight((1, 1000 * 8 + 3), torch.bfloat16, 1.0, seed=4).reshape(-1)
    assert_bytes_equal(ops.tensor_amax(w), nvfp4.tensor_amax(w), "flat")
    for dtype in DTYPES:
        assert ops.tensor_amax(torch.ones(0, dtype=dtype)).item() == 0.0
        t = random_weight((64, 48), dtype, 0.3, seed=6).t()
        assert_bytes_equal(ops.tensor_amax(t), nvfp4.tensor_amax(t), f"transposed {dtype}")
        neg = torch.full((5,), -0.0, dtype=dtype)
        assert_bytes_equal(ops.tensor_amax(neg), nvfp4.tensor_amax(neg), "-0.0")


def test_empty_and_non_contiguous_quantize():
    packed, scale = ops.nvfp4_quantize_packed(torch.ones(0, 64, dtype=torch.bfloat16), torch.tensor([1.0]))
    assert packed.shape == (0, 32) and scale.shape == (0, 4)
    packed, scale = ops.mxfp4_quantize_packed(torch.ones(0, 64, dtype=torch.float16))
    assert packed.shape == (0, 32) and scale.shape == (0, 2)
    w = random_weight((128, 8), torch.bfloat16, 0.02, seed=2).t()  # [8, 128], not contiguous
    assert_nvfp4_equal(w)
    assert_mxfp4_equal(w)


def test_bad_global_scale_is_the_reference_error():
    w = torch.ones(2, 16)
    for g in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="global_scale must be finite and > 0"):
            ops.nvfp4_quantize_packed(w, torch.tensor([g]))


def test_thread_count_does_not_change_a_byte():
    w = random_weight((512, 1024), torch.bfloat16, 0.02, seed=8)  # enough blocks to go parallel
    g = ops.nvfp4_global_scale(ops.tensor_amax(w), w.dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.nvfp4_quantize_packed(w, g), ops.mxfp4_quantize_packed(w), ops.tensor_amax(w)
        torch.set_num_threads(max(threads, 2))
        many = ops.nvfp4_quantize_packed(w, g), ops.mxfp4_quantize_packed(w), ops.tensor_amax(w)
    finally:
        torch.set_num_threads(threads)
    flat = [(*one[0], *one[1], one[2]), (*many[0], *many[1], many[2])]
    for a, b in zip(*flat, strict=True):
        assert_bytes_equal(a, b, "1 thread vs several")
    assert_nvfp4_equal(w, g)


def test_all_finite_finds_every_nan_and_inf():
    for dtype in DTYPES:
        w = random_weight((64, 100), dtype, 1.0, seed=2)
        assert ops_cpu.all_finite(w) is True
        assert ops_cpu.all_finite(torch.ones(0, dtype=dtype)) is True
        assert ops_cpu.all_finite(torch.full((3,), torch.finfo(dtype).max, dtype=dtype)) is True
        for special in (float("nan"), float("inf"), float("-inf")):
            for where in (0, 3333, 6399):
                bad = w.clone()
                bad.view(-1)[where] = special
                assert ops_cpu.all_finite(bad) is False, (dtype, special, where)
    assert ops_cpu.all_finite(torch.ones(4, 4).t()) is None  # not contiguous: torch decides
    assert ops_cpu.all_finite(torch.ones(4, dtype=torch.float64)) is None


def test_convert_still_names_a_nan_weight(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from nvq.errors import TensorError
    from nvq.quant.pipeline import convert

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name][1, 2] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(TensorError, match=f"{name} holds NaN at row 1, column 2"):
        convert(src, tmp_path / "out", "nvfp4", device="cpu")


# --- rounding and dequantize ------------------------------------------------------------------


def test_dtype_rounding_equals_torch_casts():
    raw = torch.randint(-(1 << 31), 1 << 31, (1 << 18,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    x = raw.to(torch.int32).view(torch.float32)
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 2.0**-14, 2.0**-15 * 3, 2.0**-24, 2.0**-25,
                          2.0**-25 * 1.0000001, 3.0 * 2.0**-26, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.4e38])
    x = torch.cat([x, edges, -edges])
    x = x[~x.isnan()]  # NaN payloads are not values
    for dtype in (torch.bfloat16, torch.float16):
        assert_bytes_equal(ops_cpu.round_to_dtype(x, dtype), x.to(dtype).float(), f"round to {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 32), (7, 4096), (100, 2816)], ids=str)
def test_dequantize_equals_reference(shape, dtype):
    rows, k = shape
    gen = torch.Generator().manual_seed(rows + k)
    packed = torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, generator=gen)
    codes = e2m1.unpack_pairs(packed)
    nv_scale = torch.randint(0, 0x7F, (rows, k // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    for g in (896.0, 1.0, 3.0e6, 1e-30):
        g = torch.tensor([g])
        want = nvfp4.dequantize(nvfp4.NVFP4Quantized(codes, nv_scale, g), dtype)
        got = ops.nvfp4_dequantize_packed(packed, nv_scale, g, dtype)
        assert ops.backend("nvfp4_dequantize_packed") == "cpu"
        assert_bytes_equal(got, want, f"nvfp4 dequant g={float(g)}")
    mx_scale = torch.randint(0, 256, (rows, k // 32), dtype=torch.uint8, generator=gen)
    want = mxfp4.dequantize(mxfp4.MXFP4Quantized(codes, mx_scale), dtype)
    got = ops.mxfp4_dequantize_packed(packed, mx_scale, dtype)
    assert ops.backend("mxfp4_dequantize_packed") == "cpu"
    # byte 255 decodes to NaN; NaN payload bits differ between torch's own scalar and vector casts,
    # so NaNs must sit in the same places and every other value must match bit for bit.
    assert torch.equal(got.isnan(), want.isnan()), "mxfp4 dequant: NaN positions"
    assert_bytes_equal(got[~want.isnan()], want[~want.isnan()], "mxfp4 dequant")


# --- convert ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_convert_writes_the_reference_bytes_and_says_native(scheme, tiny_llama, tmp_path, monkeypatch):
    from nvq.quant.pipeline import convert

    summary = convert(tiny_llama, tmp_path / "native", scheme, device="cpu")
    assert summary.backends == ["native"] and summary.engine == "cpu (native)"
    monkeypatch.setenv("NVQ_CPU_KERNELS", "0")
    reference = convert(tiny_llama, tmp_path / "reference", scheme, device="cpu")
    assert reference.backends == ["reference"]
    shards = sorted(p.name for p in (tmp_path / "native").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "reference").glob("*.safetensors"))
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "native", tmp_path / "reference", shards, shallow=False)
    assert not mismatch and not errors


# --- build, cache and fallback ----------------------------------------------------------------


def test_switch_off_runs_the_reference(monkeypatch, fresh):
    monkeypatch.setenv("NVQ_CPU_KERNELS", "0")
    w = random_weight((4, 64), torch.bfloat16, 0.02, seed=1)
    packed, _ = ops.mxfp4_quantize_packed(w)
    assert ops.backend("mxfp4_quantize_packed") == "reference" and not fresh.decided
    assert torch.equal(packed, e2m1.pack_pairs(mxfp4.quantize(w).codes))
    assert ops.kernel_status().cpu == "reference (NVQ_CPU_KERNELS=0)"


def test_no_compiler_falls_back_silently(monkeypatch, fresh, capsys):
    monkeypatch.setattr(ops_cpu, "find_cc", lambda: None)
    w = random_weight((4, 64), torch.float16, 0.02, seed=1)
    g = ops.nvfp4_global_scale(ops.tensor_amax(w), w.dtype)
    packed, scale = ops.nvfp4_quantize_packed(w, g)
    q = nvfp4.quantize(w, global_scale=g)
    assert torch.equal(packed, e2m1.pack_pairs(q.codes))
    assert all(ops.backend(op) == "reference" for op in ("tensor_amax", "nvfp4_quantize_packed"))
    assert capsys.readouterr().err == ""
    assert ops.kernel_status().cpu == "reference (no C compiler was found ($CC, cc, gcc or clang))"


def test_compile_error_falls_back_with_a_log(monkeypatch, fresh, tmp_path):
    broken = tmp_path / "src"
    broken.mkdir()
    (broken / "fp4_cpu.c").write_text("this is not C\n")
    monkeypatch.setattr(ops_cpu, "source_dir", lambda: broken)
    assert ops_cpu.library() is None
    assert "failed with exit code" in fresh.reason and "see" in fresh.reason
    assert any(tmp_path.joinpath("cache", "kernels").glob("*.log"))
    assert ops_cpu.status().startswith("reference (")


def test_without_openmp_builds_serial_and_equal(monkeypatch, fresh):
    monkeypatch.setattr(ops_cpu, "OPENMP_FLAGS", ("-fno-such-openmp-flag",))
    lib = ops_cpu.library()
    assert lib is not None and not lib.openmp
    w = random_weight((300, 1024), torch.bfloat16, 0.02, seed=3)
    assert_nvfp4_equal(w)
    assert_mxfp4_equal(w)


def test_cache_key_covers_sources_flags_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("NVQ_CACHE_DIR", str(tmp_path))
    src = tmp_path / "src"
    src.mkdir()
    source = ops_cpu.source_dir() / "fp4_cpu.c"
    (src / "fp4_cpu.c").write_bytes(source.read_bytes())
    base = ops_cpu.plan_build(directory=src)
    assert base.key == ops_cpu.plan_build(directory=src).key
    assert base.key != ops_cpu.plan_build(openmp=False, directory=src).key
    assert base.library.parent == tmp_path / "kernels"
    (src / "fp4_cpu.c").write_bytes(source.read_bytes() + b"\n")
    assert base.key != ops_cpu.plan_build(directory=src).key
    monkeypatch.setattr(ops_cpu, "cc_version", lambda cc: "some other compiler 1.0")
    assert base.key != ops_cpu.plan_build(directory=src).key
    flags = base.command("out.so")
    assert "-ffp-contract=off" in flags and "-march=native" not in flags
    assert not any("fast-math" in f for f in flags)


def test_importing_nvq_compiles_nothing():
    import subprocess
    import sys

    code = "import nvq.ops, nvq.ops_cpu as c, nvq.quant.pipeline, nvq.cli; print(c._LOADER.decided)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "serial"])
def test_source_compiles_warning_free(openmp, tmp_path):
    import subprocess

    build = ops_cpu.plan_build(openmp=openmp)
    command = [*build.command(tmp_path / "lib.so"), "-Werror"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
