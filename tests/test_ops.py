"""nvq.ops on a machine without a GPU: nvcc flags and targets, the cache key, a real build of stub
kernels with the fixed C ABI, and CPU dispatch to the reference codecs (byte for byte).

The CUDA kernels themselves are tested on a GPU machine by tests/test_kernels_cuda.py.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nvq import ops
from nvq.cli import app
from nvq.errors import KernelBuildError
from nvq.formats import e2m1, mxfp4, nvfp4
from nvq.ops import Arch

HAS_NVCC = ops.find_nvcc() is not None
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed on this machine")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without a GPU")

# Stub kernels with the fixed C ABI: each launcher writes zeros where its output would go.
STUB_HEADER = """\
#pragma once
#include <cuda_runtime.h>
static __global__ void nvq_stub_zero(unsigned char* p, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) p[i] = 0;
}
static inline int nvq_stub_launch(void* p, long long n, void* stream) {
    if (n <= 0) return 0;
    nvq_stub_zero<<<(unsigned)((n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<unsigned char*>(p), n);
    return static_cast<int>(cudaGetLastError());
}
"""
STUB_QUANTIZE = """\
#include "fp4.cuh"
extern "C" int nvq_amax(const void*, long long, long long, int, float* amax, void* stream) {
    return nvq_stub_launch(amax, 0, stream);
}
extern "C" int nvq_nvfp4_global_scale(const float*, long long, int, float* g, void* stream) {
    return nvq_stub_launch(g, 4, stream);
}
extern "C" int nvq_nvfp4_quantize(const void*, long long experts, long long rows, long long k, int, const float*,
                                  unsigned int*, unsigned char* packed, unsigned char* block_scale, void* stream) {
    int e = nvq_stub_launch(packed, experts * rows * k / 2, stream);
    return e ? e : nvq_stub_launch(block_scale, experts * rows * k / 16, stream);
}
extern "C" int nvq_nvfp4_quantize_auto(const void*, long long experts, long long rows, long long k, int,
                                       const float*, float*, float* g, unsigned int*, unsigned char* packed,
                                       unsigned char* block_scale, void* stream) {
    int e = nvq_stub_launch(packed, experts * rows * k / 2, stream);
    e = e ? e : nvq_stub_launch(g, experts * 4, stream);
    return e ? e : nvq_stub_launch(block_scale, experts * rows * k / 16, stream);
}
extern "C" int nvq_mxfp4_quantize(const void*, long long rows, long long k, int, unsigned char* packed,
                                  unsigned char* scale, void* stream) {
    int e = nvq_stub_launch(packed, rows * k / 2, stream);
    return e ? e : nvq_stub_launch(scale, rows * k / 32, stream);
}
"""
STUB_DEQUANTIZE = """\
#include "fp4.cuh"
extern "C" int nvq_nvfp4_dequantize(const unsigned char*, const unsigned char*, const float*, long long rows,
                                    long long k, int dtype, void* out, void* stream) {
    return nvq_stub_launch(out, rows * k * (dtype == 0 ? 4 : 2), stream);
}
extern "C" int nvq_mxfp4_dequantize(const unsigned char*, const unsigned char*, long long rows, long long k,
                                    int dtype, void* out, void* stream) {
    return nvq_stub_launch(out, rows * k * (dtype == 0 ? 4 : 2), stream);
}
"""
STUB_FILES = {"fp4.cuh": STUB_HEADER, "fp4_quantize.cu": STUB_QUANTIZE, "fp4_dequantize.cu": STUB_DEQUANTIZE}


def write_stubs(directory, **replace):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in {**STUB_FILES, **replace}.items():
        if text is not None:
            (directory / name).write_text(text)
    return directory


@pytest.fixture
def stubs(tmp_path):
    return write_stubs(tmp_path / "kernels")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NVQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels"


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has decided nothing yet, and no record of earlier calls."""
    monkeypatch.setattr(ops, "_LOADER", ops._Loader())
    monkeypatch.setattr(ops, "_last_backend", {})
    return ops._LOADER


# --- nvcc command line ----------------------------------------------------------------------


def gencodes(command):
    return [flag for flag in command if flag.startswith("-gencode")]


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("9.0", "-gencode=arch=compute_90a,code=sm_90a"),
        ("10.0", "-gencode=arch=compute_100a,code=sm_100a"),
        ("10.3", "-gencode=arch=compute_103a,code=sm_103a"),
        ("12.0", "-gencode=arch=compute_120a,code=sm_120a"),
        ("12.1", "-gencode=arch=compute_121a,code=sm_121a"),
        ("8.0", "-gencode=arch=compute_80,code=sm_80"),
        ("8.6", "-gencode=arch=compute_86,code=sm_86"),
        ("8.9", "-gencode=arch=compute_89,code=sm_89"),
        ("7.5", "-gencode=arch=compute_75,code=sm_75"),
        ("9.0a", "-gencode=arch=compute_90a,code=sm_90a"),
    ],
)
def test_a_suffix_only_where_an_arch_specific_target_exists(arch, expected):
    assert gencodes(ops.nvcc_command(["k.cu"], "k.so", [arch])) == [expected]


def test_one_gencode_per_arch_and_plain_ptx_for_plus_ptx():
    command = ops.nvcc_command(["k.cu"], "k.so", ["8.0", "9.0+PTX", "12.0"])
    assert gencodes(command) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90",  # the portable PTX that later GPUs can JIT
        "-gencode=arch=compute_120a,code=sm_120a",
    ]


def test_no_duplicate_flags_even_for_repeated_archs():
    command = ops.nvcc_command(["a.cu", "b.cu"], "lib.so", ["9.0", "9.0", Arch(9, 0), "8.0+PTX", "8.0"], nvcc="/x/nvcc")
    assert len(command) == len(set(command)), command
    assert command[0] == "/x/nvcc"
    assert command[-4:] == ["a.cu", "b.cu", "-o", "lib.so"]


def test_flags_are_the_bit_exact_set():
    command = ops.nvcc_command(["k.cu"], "k.so", ["9.0"])
    assert command[1:8] == ["-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC,-Wall,-Wextra", "-Werror", "all-warnings"]
    assert not any("fast_math" in flag or "fast-math" in flag for flag in command)


def test_nvcc_command_needs_a_target():
    with pytest.raises(ValueError, match="at least one target"):
        ops.nvcc_command(["k.cu"], "k.so", [])


# --- targets --------------------------------------------------------------------------------


def test_torch_cuda_arch_list_is_honoured_and_left_unchanged(monkeypatch, stubs, cache):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert ops.target_archs() == [Arch(8, 0), Arch(9, 0, ptx=True)]
    plan = ops.plan_build(directory=stubs) if HAS_NVCC else None
    if plan:
        assert plan.archs == (Arch(8, 0), Arch(9, 0, ptx=True))
        assert "-gencode=arch=compute_90a,code=sm_90a" in plan.command("out.so")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"


def test_explicit_archs_win_over_torch_cuda_arch_list(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert ops.target_archs(["9.0", "9.0"]) == [Arch(9, 0)]
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8.0 9.0", [Arch(8, 0), Arch(9, 0)]),
        ("Hopper", [Arch(9, 0, ptx=True)]),
        ("Ampere;9.0", [Arch(8, 0), Arch(8, 6, ptx=True), Arch(9, 0)]),
        (" 10.0+PTX ; ", [Arch(10, 0, ptx=True)]),
        ("Blackwell", [Arch(10, 0), Arch(10, 3), Arch(12, 0), Arch(12, 1, ptx=True)]),
        ("9.0a+PTX", [Arch(9, 0, ptx=True)]),
    ],
)
def test_arch_list_parsing(text, expected):
    assert ops.parse_arch_list(text) == expected


@pytest.mark.parametrize("bad", ["sm_90", "9", "nine", "9.0+ptx"])
def test_bad_arch_list_entry_is_one_clear_error(monkeypatch, bad):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", bad)
    with pytest.raises(KernelBuildError, match="TORCH_CUDA_ARCH_LIST.*compute capability like 9.0"):
        ops.target_archs()
    with pytest.raises(KernelBuildError, match="compute capability like 9.0"):
        ops.target_archs([bad])


@no_gpu
@pytest.mark.parametrize("env", [None, "", "native"])
def test_no_gpu_and_no_target_asks_for_arch(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", env)
    with pytest.raises(KernelBuildError, match="--arch 9.0"):
        ops.target_archs()


@pytest.mark.parametrize(
    "arch, capability, runs",
    [
        (Arch(9, 0), (9, 0), True),
        (Arch(9, 0), (10, 0), False),  # sm_90a runs on 9.0 only
        (Arch(9, 0, ptx=True), (10, 0), True),  # its plain PTX is JIT-compiled
        (Arch(8, 0), (8, 6), True),
        (Arch(8, 6), (8, 0), False),
        (Arch(8, 0), (9, 0), False),
        (Arch(10, 0), (10, 3), False),
    ],
)
def test_which_targets_run_on_which_gpu(arch, capability, runs):
    assert arch.runs_on(capability) is runs


# --- cache key and build --------------------------------------------------------------------


HOPPER = Arch(9, 0)


def key_of(directory, command=("nvcc", "-O3"), archs=(HOPPER,), version="release 13.0"):
    sources, headers = ops.kernel_sources(directory)
    return ops.cache_key(sources + headers, list(command), list(archs), version)


@pytest.mark.parametrize("name", ["fp4_quantize.cu", "fp4.cuh"])
def test_cache_key_changes_when_one_source_byte_changes(stubs, name):
    before = key_of(stubs)
    path = stubs / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    assert key_of(stubs) != before


def test_cache_key_covers_command_archs_and_nvcc_version(stubs):
    base = key_of(stubs)
    assert key_of(stubs) == base
    assert key_of(stubs, command=("nvcc", "-O2")) != base
    assert key_of(stubs, archs=(Arch(9, 0, ptx=True),)) != base
    assert key_of(stubs, version="release 13.1") != base


def test_kernel_sources_are_found_beside_the_package():
    directory = ops.kernel_dir()
    sources, headers = ops.kernel_sources(directory)
    assert directory.name == "kernels"
    assert [p.suffix for p in sources] == [".cu"] * len(sources) and sources
    assert all(p.suffix == ".cuh" for p in headers)


@needs_nvcc
def test_build_stub_kernels_for_9_0_gives_a_loadable_library(stubs, cache):
    path = ops.build_library(["9.0"], directory=stubs)
    assert path.parent == cache and path.name.startswith("libnvq_kernels-") and path.suffix == ".so"
    assert path.stat().st_size > 0
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert ops.build_library(["9.0"], directory=stubs) == path  # cached: not rebuilt
    assert path.stat().st_mtime_ns == mtime

    library = ops.KernelLibrary(path)
    assert set(library.functions) == set(ops.C_SIGNATURES)
    for name, function in library.functions.items():
        assert function.restype is ctypes.c_int
        assert tuple(function.argtypes) == ops.C_SIGNATURES[name]


@needs_nvcc
def test_a_source_change_builds_a_new_library(stubs, cache):
    first = ops.build_library(["9.0"], directory=stubs)
    (stubs / "fp4_quantize.cu").write_text(STUB_QUANTIZE + "// changed\n")
    second = ops.build_library(["9.0"], directory=stubs)
    assert second != first and second.is_file()


@needs_nvcc
@no_gpu
def test_a_failing_launch_raises_naming_function_and_cuda_error(stubs, cache):
    library = ops.KernelLibrary(ops.build_library(["9.0"], directory=stubs))
    # No GPU driver here: the stub's launch fails, and its cudaError_t comes back.
    with pytest.raises(RuntimeError, match=r"nvq_nvfp4_global_scale failed with CUDA error \d+ \(cuda"):
        library.call("nvq_nvfp4_global_scale", None, 1, 0, None, None)


@needs_nvcc
def test_compile_error_is_one_sentence_with_a_log(tmp_path, cache):
    broken = write_stubs(tmp_path / "broken", **{"fp4_dequantize.cu": "this is not C++\n"})
    with pytest.raises(KernelBuildError, match=r"nvcc failed with exit code \d+; its output is in .*\.log") as info:
        ops.build_library(["9.0"], directory=broken)
    log = Path(str(info.value).rsplit(" ", 1)[-1].rstrip("."))
    text = log.read_text()
    assert text.startswith(str(ops.find_nvcc())) and "fp4_dequantize.cu" in text and "error" in text
    assert not list(cache.glob("*.so")) and not list(cache.glob("*.tmp"))


@needs_nvcc
def test_nvcc_warnings_fail_the_build(tmp_path, cache):
    warning = STUB_QUANTIZE + "static __global__ void nvq_unused_local() { int never_used; }\n"
    directory = write_stubs(tmp_path / "warns", **{"fp4_quantize.cu": warning})
    with pytest.raises(KernelBuildError, match="nvcc failed"):
        ops.build_library(["9.0"], directory=directory)


@needs_nvcc
def test_library_missing_a_launcher_is_refused(tmp_path, cache):
    directory = write_stubs(tmp_path / "partial", **{"fp4_dequantize.cu": None})
    with pytest.raises(KernelBuildError, match="has no function nvq_nvfp4_dequantize"):
        ops.KernelLibrary(ops.build_library(["9.0"], directory=directory))


def test_no_sources_is_one_clear_error(tmp_path, cache):
    if not HAS_NVCC:
        pytest.skip("nvcc is checked first")
    with pytest.raises(KernelBuildError, match=r"no kernel sources \(\*\.cu\) in"):
        ops.build_library(["9.0"], directory=tmp_path)


def test_missing_nvcc_is_one_clear_error(monkeypatch, stubs):
    monkeypatch.setattr(ops, "find_nvcc", lambda: None)
    with pytest.raises(KernelBuildError, match="nvcc was not found in"):
        ops.build_library(["9.0"], directory=stubs)


# --- dispatch -------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def weight(rows, k, dtype, seed, specials=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * 0.02
    if specials:
        w[0, :32] = 0.0  # all-zero blocks
        w[1, 3] = float("nan")
        w[1, 40] = float("inf")
        w[2 % rows, 5] = -1e-9  # tiny negative
        w[-1, -1] = -3.0  # outlier
    return w.to(dtype)


def bits(t):
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(width)


def check_expert_ops(stack):
    """The expert-stack ops equal the reference applied to each expert, own and shared amax."""
    own = torch.stack([nvfp4.tensor_amax(w) for w in stack])
    amax = ops.expert_amax(stack)
    assert amax.dtype == stack.dtype and amax.shape == (stack.shape[0],) and torch.equal(bits(amax), bits(own))
    shared = own.float().amax()  # one fusion-group amax (gate and up of every expert, say)
    for given in (None, shared.expand(stack.shape[0])):
        packed, block_scale, g = ops.nvfp4_quantize_experts(stack, amax=given)
        assert packed.shape == (*stack.shape[:2], stack.shape[2] // 2) and g.shape == (stack.shape[0],)
        assert block_scale.dtype == torch.float8_e4m3fn and g.dtype == torch.float32
        for e, w in enumerate(stack):
            g_ref = nvfp4.global_scale(own[e] if given is None else shared, stack.dtype)
            q = nvfp4.quantize(w, global_scale=g_ref)
            assert torch.equal(bits(g[e:e + 1]), bits(g_ref)), f"expert {e}: global scale"
            assert torch.equal(packed[e], e2m1.pack_pairs(q.codes)), f"expert {e}: codes"
            assert torch.equal(block_scale[e].view(torch.uint8), q.block_scale.view(torch.uint8)), f"expert {e}"
    packed, block_scale, g = ops.nvfp4_quantize(stack[0])
    q = nvfp4.quantize(stack[0], global_scale=nvfp4.global_scale(own[0], stack.dtype))
    assert torch.equal(bits(g), bits(q.global_scale)) and torch.equal(packed, e2m1.pack_pairs(q.codes))
    assert torch.equal(block_scale.view(torch.uint8), q.block_scale.view(torch.uint8))
    mx_packed, mx_scale = ops.mxfp4_quantize_experts(stack)
    for e, w in enumerate(stack):
        mq = mxfp4.quantize(w)
        assert torch.equal(mx_packed[e], e2m1.pack_pairs(mq.codes)) and torch.equal(mx_scale[e], mq.scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_tensors_run_the_reference_byte_for_byte(dtype, fresh_loader, monkeypatch):
    monkeypatch.setenv("NVQ_CPU_KERNELS", "0")  # the native CPU codec: tests/test_ops_cpu.py
    w = weight(5, 96, dtype, seed=1)
    amax = ops.tensor_amax(w)
    assert amax.dtype == dtype and amax.shape == () and torch.equal(bits(amax), bits(nvfp4.tensor_amax(w)))
    g = ops.nvfp4_global_scale(amax, dtype)
    assert torch.equal(bits(g), bits(nvfp4.global_scale(amax, dtype)))

    packed, block_scale = ops.nvfp4_quantize_packed(w, g)
    q = nvfp4.quantize(w, global_scale=g)
    assert packed.dtype == torch.uint8 and block_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(packed, e2m1.pack_pairs(q.codes))
    assert torch.equal(block_scale.view(torch.uint8), q.block_scale.view(torch.uint8))

    mx_packed, mx_scale = ops.mxfp4_quantize_packed(w)
    mq = mxfp4.quantize(w)
    assert torch.equal(mx_packed, e2m1.pack_pairs(mq.codes)) and torch.equal(mx_scale, mq.scale)

    for out_dtype in DTYPES:
        got = ops.nvfp4_dequantize_packed(packed, block_scale, g, out_dtype)
        assert torch.equal(bits(got), bits(nvfp4.dequantize(q, out_dtype)))
        got = ops.mxfp4_dequantize_packed(mx_packed, mx_scale, out_dtype)
        assert torch.equal(bits(got), bits(mxfp4.dequantize(mq, out_dtype)))
    check_expert_ops(torch.stack([w, weight(5, 96, dtype, seed=9) * 4, weight(5, 96, dtype, seed=10, specials=False)]))

    assert all(ops.backend(op) == "reference" for op in ops.OPS)
    assert not fresh_loader.decided  # CPU tensors never try to build the kernels


def test_non_contiguous_and_group_scale_inputs(fresh_loader):
    w = weight(64, 8, torch.bfloat16, seed=2, specials=False).t()  # [8, 64], not contiguous
    g = torch.tensor([1234.5])
    packed, block_scale = ops.nvfp4_quantize_packed(w, g)
    q = nvfp4.quantize(w.contiguous(), global_scale=g)
    assert torch.equal(packed, e2m1.pack_pairs(q.codes))
    assert torch.equal(block_scale.view(torch.uint8), q.block_scale.view(torch.uint8))


class ReferenceABI:
    """The kernels' C ABI emulated on CPU memory with the reference codecs, so that the kernel
    branch of every op (pointers, sizes, dtype codes, output buffers, views) runs without a GPU."""

    DTYPES = {code: dtype for dtype, code in ops.DTYPE_CODES.items()}

    def __init__(self):
        self.calls = []

    def call(self, name, *args):
        self.calls.append(name)
        getattr(self, name)(*args)

    @staticmethod
    def read(ptr, shape, dtype):
        n_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        raw = bytearray((ctypes.c_char * n_bytes).from_address(ptr))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)

    @staticmethod
    def write(ptr, t):
        t = t.contiguous()
        ctypes.memmove(ptr, t.data_ptr(), t.nbytes)

    def nvq_amax(self, x, experts, n_elements, dtype, amax, stream):
        w = self.read(x, (experts, n_elements), self.DTYPES[dtype])
        current = self.read(amax, (experts,), torch.float32)
        own = torch.stack([nvfp4.tensor_amax(e).float() for e in w])
        self.write(amax, torch.maximum(current, own))

    def nvq_nvfp4_global_scale(self, amax, n, dtype, global_scale, stream):
        a = self.read(amax, (n,), torch.float32)
        self.write(global_scale, torch.cat([nvfp4.global_scale(v, self.DTYPES[dtype]) for v in a]))

    def nvq_nvfp4_quantize(self, x, experts, rows, k, dtype, global_scale, table, packed, block_scale, stream):
        w = self.read(x, (experts, rows, k), self.DTYPES[dtype])
        g = self.read(global_scale, (experts,), torch.float32)
        self.read(table, (experts, ops.NVFP4_TABLE_WORDS), torch.int32)  # the scratch must be this large
        qs = [nvfp4.quantize(w[e], global_scale=g[e:e + 1]) for e in range(experts)]
        self.write(packed, torch.stack([e2m1.pack_pairs(q.codes) for q in qs]))
        self.write(block_scale, torch.stack([q.block_scale.view(torch.uint8) for q in qs]))

    def nvq_nvfp4_quantize_auto(self, x, experts, rows, k, dtype, amax, amax_scratch, global_scale, table, packed,
                                block_scale, stream):
        if not amax:
            self.write(amax_scratch, torch.zeros(experts))
            self.nvq_amax(x, experts, rows * k, dtype, amax_scratch, stream)
            amax = amax_scratch
        self.nvq_nvfp4_global_scale(amax, experts, dtype, global_scale, stream)
        self.nvq_nvfp4_quantize(x, experts, rows, k, dtype, global_scale, table, packed, block_scale, stream)

    def nvq_mxfp4_quantize(self, x, rows, k, dtype, packed, scale, stream):
        q = mxfp4.quantize(self.read(x, (rows, k), self.DTYPES[dtype]))
        self.write(packed, e2m1.pack_pairs(q.codes))
        self.write(scale, q.scale)

    def nvq_nvfp4_dequantize(self, packed, block_scale, global_scale, rows, k, dtype, out, stream):
        codes = e2m1.unpack_pairs(self.read(packed, (rows, k // 2), torch.uint8))
        scale = self.read(block_scale, (rows, k // 16), torch.uint8).view(torch.float8_e4m3fn)
        g = self.read(global_scale, (1,), torch.float32)
        self.write(out, nvfp4.dequantize(nvfp4.NVFP4Quantized(codes, scale, g), self.DTYPES[dtype]))

    def nvq_mxfp4_dequantize(self, packed, scale, rows, k, dtype, out, stream):
        codes = e2m1.unpack_pairs(self.read(packed, (rows, k // 2), torch.uint8))
        q = mxfp4.MXFP4Quantized(codes, self.read(scale, (rows, k // 32), torch.uint8))
        self.write(out, mxfp4.dequantize(q, self.DTYPES[dtype]))


@pytest.fixture
def emulated_kernels(monkeypatch):
    abi = ReferenceABI()

    def kernels_for(op, *tensors):
        ops._last_backend[op] = "cuda"
        return abi

    monkeypatch.setattr(ops, "_last_backend", {})
    monkeypatch.setattr(ops, "_kernels_for", kernels_for)
    monkeypatch.setattr(ops, "_launch", lambda library, name, device, *args: library.call(name, *args, None))
    return abi


def test_emulated_abi_takes_the_c_signatures():
    for name, argtypes in ops.C_SIGNATURES.items():
        assert len(inspect.signature(getattr(ReferenceABI(), name)).parameters) == len(argtypes), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_branch_marshals_like_the_reference(dtype, emulated_kernels):
    w = weight(6, 128, dtype, seed=3)[:, :96]  # not contiguous
    amax = ops.tensor_amax(w)
    assert amax.dtype == dtype and amax.shape == () and torch.equal(bits(amax), bits(nvfp4.tensor_amax(w)))
    g = ops.nvfp4_global_scale(amax, dtype)
    assert g.dtype == torch.float32 and torch.equal(bits(g), bits(nvfp4.global_scale(amax, dtype)))

    packed, block_scale = ops.nvfp4_quantize_packed(w, g)
    q = nvfp4.quantize(w.contiguous(), global_scale=g)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (6, 6)
    assert torch.equal(packed, e2m1.pack_pairs(q.codes))
    assert torch.equal(block_scale.view(torch.uint8), q.block_scale.view(torch.uint8))
    mx_packed, mx_scale = ops.mxfp4_quantize_packed(w)
    mq = mxfp4.quantize(w.contiguous())
    assert torch.equal(mx_packed, e2m1.pack_pairs(mq.codes)) and torch.equal(mx_scale, mq.scale)

    for out_dtype in DTYPES:
        got = ops.nvfp4_dequantize_packed(packed, block_scale, g, out_dtype)
        assert got.dtype == out_dtype and torch.equal(bits(got), bits(nvfp4.dequantize(q, out_dtype)))
        got = ops.mxfp4_dequantize_packed(mx_packed, mx_scale, out_dtype)
        assert got.dtype == out_dtype and torch.equal(bits(got), bits(mxfp4.dequantize(mq, out_dtype)))
    check_expert_ops(torch.stack([weight(6, 96, dtype, seed=s) * (s - 2) for s in (3, 4, 5)]))
    assert all(ops.backend(op) == "cuda" for op in ops.OPS)
    assert set(emulated_kernels.calls) == set(ops.C_SIGNATURES)


def test_expert_stacks_empty_and_bad_inputs(fresh_loader):
    packed, block_scale, g = ops.nvfp4_quantize_experts(torch.ones(0, 4, 32, dtype=torch.bfloat16))
    assert packed.shape == (0, 4, 16) and block_scale.shape == (0, 4, 2) and g.shape == (0,)
    assert ops.expert_amax(torch.ones(0, 4, 32)).shape == (0,)
    with pytest.raises(ValueError, match=r"3-D \[experts, N, K\]"):
        ops.nvfp4_quantize_experts(torch.ones(4, 32))
    with pytest.raises(ValueError, match="K % 32 == 0"):
        ops.mxfp4_quantize_experts(torch.ones(2, 4, 48))
    with pytest.raises(ValueError, match="one per expert"):
        ops.nvfp4_quantize_experts(torch.ones(2, 4, 32), amax=torch.ones(3))


def test_kernel_branch_skips_empty_tensors(emulated_kernels):
    packed, scale = ops.mxfp4_quantize_packed(torch.ones(0, 64, dtype=torch.bfloat16))
    assert packed.shape == (0, 32) and scale.shape == (0, 2)
    assert ops.tensor_amax(torch.ones(0)).item() == 0.0
    assert emulated_kernels.calls == []


@no_gpu
def test_backend_before_any_call_is_reference_without_a_gpu(fresh_loader):
    assert ops.backend("nvfp4_quantize_packed") == "reference"
    assert not ops.kernels_available()


def test_backend_of_an_unknown_op_lists_the_ops():
    with pytest.raises(ValueError, match="unknown op 'quantize'.*tensor_amax"):
        ops.backend("quantize")


VALIDATION_CASES = {
    "int weight": (lambda: ops.nvfp4_quantize_packed(torch.ones(2, 16, dtype=torch.int32), torch.ones(1)), "bfloat16, float16 or float32"),
    "1-D weight": (lambda: ops.mxfp4_quantize_packed(torch.ones(64)), "2-D"),
    "K not a multiple of 16": (lambda: ops.nvfp4_quantize_packed(torch.ones(2, 24), torch.ones(1)), "K % 16 == 0, got K=24"),
    "K not a multiple of 32": (lambda: ops.mxfp4_quantize_packed(torch.ones(2, 48)), "K % 32 == 0, got K=48"),
    "two-element global scale": (lambda: ops.nvfp4_quantize_packed(torch.ones(2, 16), torch.ones(2)), "global_scale must be a 1-element float tensor"),
    "amax not a scalar": (lambda: ops.nvfp4_global_scale(torch.ones(3), torch.bfloat16), "amax must be a 1-element"),
    "int8 global-scale dtype": (lambda: ops.nvfp4_global_scale(torch.ones(1), torch.int8), "bfloat16, float16 or float32"),
    "packed not uint8": (lambda: ops.mxfp4_dequantize_packed(torch.ones(2, 16), torch.zeros(2, 1, dtype=torch.uint8), torch.bfloat16), "2-D uint8"),
    "scale shape": (lambda: ops.mxfp4_dequantize_packed(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8), torch.bfloat16), r"shape \(2, 1\)"),
    "scale dtype": (lambda: ops.nvfp4_dequantize_packed(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8), torch.ones(1), torch.bfloat16), "float8_e4m3fn"),
    "packed K not a block multiple": (lambda: ops.nvfp4_dequantize_packed(torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(2, 0, dtype=torch.float8_e4m3fn), torch.ones(1), torch.bfloat16), "K % 16 == 0, got K=8"),
    "tensors on two devices": (lambda: ops.nvfp4_quantize_packed(torch.ones(2, 16), torch.ones(1, device="meta")), "one device, got cpu, meta"),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_bad_inputs_are_one_value_error_naming_the_problem(case):
    call, message = VALIDATION_CASES[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_unbuildable_kernels_fall_back_with_one_stderr_line(monkeypatch, fresh_loader, capsys):
    def no_nvcc(*args, **kwargs):
        raise KernelBuildError("nvcc was not found in $CUDA_HOME/bin, on PATH or in /usr/local/cuda/bin.")

    monkeypatch.setattr(ops, "plan_build", no_nvcc)
    assert fresh_loader.load() is None
    assert fresh_loader.load() is None
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "nvq: CUDA kernels unavailable (nvcc was not found in $CUDA_HOME/bin, on PATH or in "
        "/usr/local/cuda/bin); using the reference codecs on the GPU."
    ]


def test_importing_nvq_compiles_nothing():
    code = "import nvq.ops as o, nvq.quant.pipeline, nvq.cli; print(o._LOADER.decided)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- CLI and pipeline -----------------------------------------------------------------------


@needs_nvcc
def test_cli_kernels_build_prints_the_library_path(monkeypatch, stubs, cache):
    monkeypatch.setattr(ops, "kernel_dir", lambda: stubs)
    result = CliRunner().invoke(app, ["kernels", "build", "--arch", "9.0", "--arch", "8.0+PTX"])
    assert result.exit_code == 0, result.output
    path = result.output.strip().splitlines()[-1]
    assert path.startswith(str(cache)) and os.path.isfile(path)


def test_cli_kernels_build_bad_arch_is_exit_2(monkeypatch, stubs, cache):
    monkeypatch.setattr(ops, "kernel_dir", lambda: stubs)
    result = CliRunner().invoke(app, ["kernels", "build", "--arch", "sm_90"])
    assert result.exit_code == 2
    assert "'sm_90' is not a compute capability like 9.0" in result.output


def test_cli_kernels_status_lists_every_op(monkeypatch, stubs, cache, fresh_loader):
    monkeypatch.setattr(ops, "kernel_dir", lambda: stubs)
    result = CliRunner().invoke(app, ["kernels", "status"])
    assert result.exit_code == 0, result.output
    for word in ("nvcc", "GPU", "cache", str(cache), "fp4_quantize.cu", *ops.OPS):
        assert word in result.output
    result = CliRunner().invoke(app, ["kernels", "status", "--json"])
    assert result.exit_code == 0 and '"backends"' in result.output


def test_convert_summary_names_the_backend(tiny_llama, tmp_path, monkeypatch):
    from nvq.quant.pipeline import convert

    monkeypatch.setenv("NVQ_CPU_KERNELS", "0")  # "native" is tests/test_ops_cpu.py's

    summary = convert(tiny_llama, tmp_path / "out", "mxfp4", device="cpu")
    assert summary.backends == ["reference"] and summary.engine == "cpu (reference)"
