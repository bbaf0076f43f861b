"""nvq's CUDA kernels against the peers, the torch reference and the copy bandwidth, on one GPU.

    source scripts/gpu-env.sh && python bench/kernels.py        # GPU machine, repository root
    python bench/kernels.py --dry-run                           # CPU: tiny shapes, checks the script

Rows, per bf16 weight shape (random, std 0.02):
  nvq NVFP4 quantize       ops.tensor_amax -> ops.nvfp4_global_scale -> ops.nvfp4_quantize_packed
  nvq MXFP4 quantize       ops.mxfp4_quantize_packed
  nvq NVFP4/MXFP4 dequant  ops.*_dequantize_packed -> bf16
  compressed-tensors 0.20.0 NVFP4 (as the design docs' bench/peer_quant.py drives it) and MXFP4
      (calculate_qparams + MXFP4PackedCompressor.compress)
  torchao 0.18.0 nvfp4_quantize (per-tensor scale) and to_mx(float4_e2m1fn_x2, 32), as peer_quant.py
  torch reference: nvq.formats on the same device, for all four ops
plus one device-to-device copy of 2 GiB, the bandwidth ceiling.

Timing: median of --reps CUDA-event-timed calls after warm-up; each call takes the next of several
input buffers, enough that together they are at least twice the L2 cache, so that the L2 is not
what is measured. Effective GB/s counts each byte read and written once, as
spec/perf-anchors.md does: B/elem is 2 (bf16 in) + 0.5 (packed) + 1/16 or 1/32 (scales) =
2.5625 for NVFP4 and 2.53125 for MXFP4, the same counts for dequantize (codes and scales in, bf16
out); the copy counts bytes read + written. "floor ms" is the least time at copy bandwidth: NVFP4
quantize must read the weight twice (tensor amax first), 4.5625 B/elem.

Once per shape the kernel's bytes are compared with the torch reference's (OK / MISMATCH), and
once on a small tensor of special values (NaN, ±Inf, zero blocks) with the CPU reference. Exit
code 1 on any mismatch or failed nvq row. A markdown table is printed last; with $OUT set, the
numbers go to $OUT/kernels.json.

The GPU machine lacks compressed-tensors, torchao and some of nvq's dependencies: carry them as
wheels in .whl/ (scripts/gpu-env.sh installs them), made on this side with
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl NAME==VERSION
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from nvq import __version__ as nvq_version  # noqa: E402
from nvq import ops  # noqa: E402
from nvq.formats import e2m1, mxfp4, nvfp4  # noqa: E402

GPU_SHAPES = [(8192, 28672), (4096, 4096), (2816, 704), (262144, 2816)]
DRY_RUN_SHAPES = [(64, 256), (32, 64)]
EXPERT_STACK = (128, 704, 2816)  # Gemma-4 26B-A4B: 128 experts of 704×2816
DRY_RUN_EXPERT_STACK = (4, 32, 64)
STD = 0.02
NO_REFERENCE = False
DTYPE = torch.bfloat16
COPY_BYTES = 2 << 30  # one 2 GiB buffer, as peer_quant.py
DRY_RUN_COPY_BYTES = 64 << 20
MIN_BUFFERS = 3
MAX_BUFFERS = 128

# Bytes per element each kind of row must move, read + written once (spec/perf-anchors.md).
NVFP4_BYTES = 2 + 0.5 + 1 / 16  # 2.5625
MXFP4_BYTES = 2 + 0.5 + 1 / 32  # 2.53125
NVFP4_TWO_PASS_BYTES = 2 + NVFP4_BYTES  # 4.5625: the amax pass reads the weight once more
KINDS = {  # kind -> (B/elem counted for GB/s, B/elem of the floor)
    "nvfp4 quantize": (NVFP4_BYTES, NVFP4_TWO_PASS_BYTES),
    "mxfp4 quantize": (MXFP4_BYTES, MXFP4_BYTES),
    "nvfp4 dequantize": (NVFP4_BYTES, NVFP4_BYTES),
    "mxfp4 dequantize": (MXFP4_BYTES, MXFP4_BYTES),
}


@dataclass
class Result:
    shape: str
    name: str
    kind: str
    bytes_per_element: float
    ms: float | None = None
    gbps: float | None = None
    pct_of_copy: float | None = None
    floor_ms: float | None = None
    note: str = ""


@dataclass
class Verification:
    shape: str
    checks: dict[str, str] = field(default_factory=dict)  # what -> "OK" or "MISMATCH: ..."

    @property
    def ok(self) -> bool:
        return all(v == "OK" for k, v in self.checks.items() if not k.startswith("peer"))


# --- timing ---------------------------------------------------------------------------------


class Clock:
    """Median milliseconds of `reps` calls of fn(i), i rotating over the input buffers. With
    batch > 1, each sample times `batch` calls back to back (the host queues the next call while
    the GPU runs the last, as a conversion over many tensors does) and divides by batch."""

    def __init__(self, device: torch.device, reps: int, warmup: int, batch: int = 1):
        self.device, self.reps, self.warmup, self.batch = device, reps, warmup, batch

    n_inputs_hint = 1

    def median_ms(self, fn: Callable[[int], object], n_inputs: int) -> float:
        self.n_inputs_hint = n_inputs
        for i in range(self.warmup):
            fn(i % n_inputs)
        self._sync()
        times = [self._one(fn, (self.warmup + r * self.batch) % n_inputs) for r in range(self.reps)]
        return statistics.median(times)

    def _one(self, fn: Callable[[int], object], i: int) -> float:
        n = max(1, self.n_inputs_hint)
        if self.device.type != "cuda":
            start = time.perf_counter()
            for b in range(self.batch):
                fn((i + b) % n)
            return (time.perf_counter() - start) * 1e3 / self.batch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for b in range(self.batch):
            fn((i + b) % n)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / self.batch

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))


def buffers_needed(bytes_per_buffer: float, device: torch.device) -> int:
    """Enough distinct buffers that together they hold at least twice the L2 cache."""
    return max(MIN_BUFFERS, min(MAX_BUFFERS, math.ceil(2 * l2_bytes(device) / bytes_per_buffer)))


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --- the rows -------------------------------------------------------------------------------


def nvq_nvfp4(w):
    packed, block_scale, g = ops.nvfp4_quantize(w)  # amax, global scale, quantize in one call
    return packed, block_scale, g


def nvq_nvfp4_three_ops(w):
    g = ops.nvfp4_global_scale(ops.tensor_amax(w), w.dtype)
    packed, block_scale = ops.nvfp4_quantize_packed(w, g)
    return packed, block_scale, g


def nvq_mxfp4(w):
    return ops.mxfp4_quantize_packed(w)


def reference_nvfp4(w):
    g = nvfp4.global_scale(nvfp4.tensor_amax(w), w.dtype)
    q = nvfp4.quantize(w, global_scale=g)
    return e2m1.pack_pairs(q.codes), q.block_scale, q.global_scale


def reference_mxfp4(w):
    q = mxfp4.quantize(w)
    return e2m1.pack_pairs(q.codes), q.scale


def reference_nvfp4_dequantize(packed, block_scale, g):
    return nvfp4.dequantize(nvfp4.NVFP4Quantized(e2m1.unpack_pairs(packed), block_scale, g), DTYPE)


def reference_mxfp4_dequantize(packed, scale):
    return mxfp4.dequantize(mxfp4.MXFP4Quantized(e2m1.unpack_pairs(packed), scale), DTYPE)


def compressed_tensors_rows():
    """{name: (kind, fn(w))} for compressed-tensors 0.20.0, driven as peer_quant.py does."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    nv_args, mx_args = NVFP4A16["weights"], MXFP4A16["weights"]
    nv_scheme = QuantizationScheme(targets=["Linear"], weights=nv_args)
    mx_scheme = QuantizationScheme(targets=["Linear"], weights=mx_args)

    def ct_nvfp4(w):
        gs = generate_gparam(w.min(), w.max())
        blocks = w.view(w.shape[0], -1, 16)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), nv_args, global_scale=gs)
        return NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gs}, nv_scheme)

    def ct_mxfp4(w):
        blocks = w.view(w.shape[0], -1, 32)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), mx_args)
        return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, mx_scheme)

    version = importlib.metadata.version("compressed-tensors")
    return {
        f"compressed-tensors {version} NVFP4": ("nvfp4 quantize", ct_nvfp4),
        f"compressed-tensors {version} MXFP4": ("mxfp4 quantize", ct_mxfp4),
    }


def torchao_rows():
    from torchao.prototype.mx_formats.mx_tensor import to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    def ao_nvfp4(w):
        return nvfp4_quantize(w, 16, per_tensor_amax_to_scale(w.abs().amax()))

    def ao_mxfp4(w):
        return to_mx(w, torch.float4_e2m1fn_x2, 32)

    version = importlib.metadata.version("torchao")
    return {
        f"torchao {version} nvfp4_quantize": ("nvfp4 quantize", ao_nvfp4),
        f"torchao {version} to_mx MXFP4": ("mxfp4 quantize", ao_mxfp4),
    }


PEERS = {"compressed-tensors": compressed_tensors_rows, "torchao": torchao_rows}


def load_peers() -> tuple[dict, list[str]]:
    """Rows of every peer that imports, and a note for each that does not."""
    rows, notes = {}, []
    for peer, make in PEERS.items():
        try:
            rows |= make()
        except Exception as e:  # a missing or broken peer is skipped, not fatal
            notes.append(f"{peer} skipped: {type(e).__name__}: {e}")
    return rows, notes


# --- one shape ------------------------------------------------------------------------------


def random_weights(shape, count: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(shape, generator=gen, device=device) * STD).to(DTYPE) for _ in range(count)]


def measure(results, shape_name, name, kind, fn, n_inputs, clock, copy_gbps, n_elements, check=None):
    counted, floor = KINDS[kind]
    result = Result(shape_name, name, kind, counted)
    try:
        result.ms = clock.median_ms(fn, n_inputs)
        if check:
            check()
        result.gbps = counted * n_elements / (result.ms * 1e-3) / 1e9
        result.pct_of_copy = 100 * result.gbps / copy_gbps
        result.floor_ms = floor * n_elements / (copy_gbps * 1e9) * 1e3
    except Exception as e:
        result.ms = None
        result.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        traceback.print_exc()
    print(format_row(result), flush=True)
    results.append(result)


def bench_shape(shape, device, clock, copy_gbps, peers, expect_cuda) -> tuple[list[Result], Verification]:
    rows, cols = shape
    n = rows * cols
    shape_name = f"{rows}x{cols}"
    n_inputs = buffers_needed(2 * n, device)
    inputs = random_weights(shape, n_inputs, device, seed=rows + cols)
    print(f"\n## {shape_name}: {n:,} elements, {n_inputs} input buffers", flush=True)

    verification = verify(shape_name, inputs[0], peers)
    print(f"verify {shape_name}: " + ", ".join(f"{k} {v}" for k, v in verification.checks.items()), flush=True)

    def backend_is_cuda(*op_names):
        def check():
            used = {op: ops.backend(op) for op in op_names}
            if expect_cuda and set(used.values()) != {"cuda"}:
                raise AssertionError(f"expected the cuda backend, got {used}")
        return check

    results: list[Result] = []
    common = dict(clock=clock, copy_gbps=copy_gbps, n_elements=n)
    quantize_rows = {
        "nvq NVFP4 quantize (amax + global scale + quantize, ops.nvfp4_quantize)": (
            "nvfp4 quantize", nvq_nvfp4, backend_is_cuda("nvfp4_quantize")),
        "nvq MXFP4 quantize": ("mxfp4 quantize", nvq_mxfp4, backend_is_cuda("mxfp4_quantize_packed")),
    }
    for name, (kind, fn, check) in quantize_rows.items():
        measure(results, shape_name, name, kind, lambda i, fn=fn: fn(inputs[i]), n_inputs, check=check, **common)

    # Dequantize inputs: enough distinct (codes, scales) sets to rotate past the L2 as well.
    n_sets = buffers_needed(0.5625 * n, device)
    nv_sets = [nvq_nvfp4(inputs[j % n_inputs]) for j in range(n_sets)]
    mx_sets = [nvq_mxfp4(inputs[j % n_inputs]) for j in range(n_sets)]
    measure(results, shape_name, "nvq NVFP4 dequantize -> bf16", "nvfp4 dequantize",
            lambda i: ops.nvfp4_dequantize_packed(*nv_sets[i], DTYPE), n_sets,
            check=backend_is_cuda("nvfp4_dequantize_packed"), **common)
    measure(results, shape_name, "nvq MXFP4 dequantize -> bf16", "mxfp4 dequantize",
            lambda i: ops.mxfp4_dequantize_packed(*mx_sets[i], DTYPE), n_sets,
            check=backend_is_cuda("mxfp4_dequantize_packed"), **common)
    free_memory(device)

    for name, (kind, fn) in peers.items():
        measure(results, shape_name, name, kind, lambda i, fn=fn: fn(inputs[i]), n_inputs, **common)
        free_memory(device)

    reference_rows = {
        "torch reference NVFP4 quantize (nvq.formats)": ("nvfp4 quantize", lambda i: reference_nvfp4(inputs[i]), n_inputs),
        "torch reference MXFP4 quantize (nvq.formats)": ("mxfp4 quantize", lambda i: reference_mxfp4(inputs[i]), n_inputs),
        "torch reference NVFP4 dequantize -> bf16": (
            "nvfp4 dequantize", lambda i: reference_nvfp4_dequantize(*nv_sets[i]), n_sets),
        "torch reference MXFP4 dequantize -> bf16": (
            "mxfp4 dequantize", lambda i: reference_mxfp4_dequantize(*mx_sets[i]), n_sets),
    }
    for name, (kind, fn, count) in ({} if NO_REFERENCE else reference_rows).items():
        measure(results, shape_name, name, kind, fn, count, **common)
        free_memory(device)
    return results, verification  # the buffers are freed on return; main() empties the cache


def bench_experts(stack, device, clock, copy_gbps, expect_cuda) -> tuple[list[Result], Verification]:
    """One MoE expert stack [E, N, K]: the batched ops (one call for the stack, per-expert global
    scales) against one call of the 2-D ops per expert, and their bytes against each other."""
    experts, rows, cols = stack
    n = experts * rows * cols
    name = f"{experts}x{rows}x{cols}"
    n_inputs = buffers_needed(2 * n, device)
    inputs = random_weights(stack, n_inputs, device, seed=experts + rows + cols)
    # Experts of different magnitudes, so that each has its own global scale.
    spread = torch.linspace(0.1, 10, experts, device=device).view(-1, 1, 1)
    inputs = [(w.float() * spread).to(DTYPE) for w in inputs]
    print(f"\n## expert stack {name}: {n:,} elements, {n_inputs} input buffers", flush=True)

    v = Verification(f"expert stack {name}")
    w = inputs[0]
    packed, block_scale, g = ops.nvfp4_quantize_experts(w)
    one = [nvq_nvfp4_three_ops(w[e]) for e in range(experts)]
    v.checks["NVFP4 batched == per expert: codes"] = compare(packed, torch.stack([o[0] for o in one]))
    v.checks["NVFP4 batched == per expert: block scales"] = compare(block_scale, torch.stack([o[1] for o in one]))
    v.checks["NVFP4 batched == per expert: global scales"] = compare(g, torch.cat([o[2] for o in one]))
    for e in (0, experts - 1):
        ref = reference_nvfp4(w[e])
        v.checks[f"NVFP4 expert {e} == reference"] = compare(packed[e], ref[0])
    mx_packed, mx_scale = ops.mxfp4_quantize_experts(w)
    mx_one = [nvq_mxfp4(w[e]) for e in range(experts)]
    v.checks["MXFP4 batched == per expert"] = compare(
        torch.cat([mx_packed.flatten(), mx_scale.flatten()]),
        torch.cat([torch.stack([o[0] for o in mx_one]).flatten(), torch.stack([o[1] for o in mx_one]).flatten()]))
    del packed, block_scale, g, one, mx_packed, mx_scale, mx_one
    print(f"verify {v.shape}: " + ", ".join(f"{k} {c}" for k, c in v.checks.items()), flush=True)

    def cuda_backend(*op_names):
        def check():
            used = {op: ops.backend(op) for op in op_names}
            if expect_cuda and set(used.values()) != {"cuda"}:
                raise AssertionError(f"expected the cuda backend, got {used}")
        return check

    results: list[Result] = []
    common = dict(clock=clock, copy_gbps=copy_gbps, n_elements=n)
    rows_to_time = {
        f"nvq NVFP4 quantize, expert stack in one call ({experts} global scales)": (
            "nvfp4 quantize", lambda x: ops.nvfp4_quantize_experts(x), cuda_backend("nvfp4_quantize_experts")),
        f"nvq NVFP4 quantize, one call per expert ({experts} x tensor_amax, global_scale, quantize_packed)": (
            "nvfp4 quantize", lambda x: [nvq_nvfp4_three_ops(x[e]) for e in range(experts)],
            cuda_backend("nvfp4_quantize_packed")),
        "nvq MXFP4 quantize, expert stack in one call": (
            "mxfp4 quantize", lambda x: ops.mxfp4_quantize_experts(x), cuda_backend("mxfp4_quantize_experts")),
        f"nvq MXFP4 quantize, one call per expert ({experts} calls)": (
            "mxfp4 quantize", lambda x: [nvq_mxfp4(x[e]) for e in range(experts)], cuda_backend("mxfp4_quantize_packed")),
    }
    for row_name, (kind, fn, check) in rows_to_time.items():
        measure(results, name, row_name, kind, lambda i, fn=fn: fn(inputs[i]), n_inputs, check=check, **common)
        free_memory(device)
    return results, v


# --- verification ---------------------------------------------------------------------------


def compare(got: torch.Tensor, want: torch.Tensor) -> str:
    """'OK' when the raw bytes are equal, else how many differ and where the first is."""
    got, want = raw_bytes(got).cpu(), raw_bytes(want).cpu()
    if got.shape != want.shape:
        return f"MISMATCH: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    bad = (got != want).nonzero()
    if bad.numel() == 0:
        return "OK"
    first = bad[0].tolist()
    return f"MISMATCH: {bad.shape[0]} of {got.numel()} bytes differ, first at {first}"


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def verify(shape_name: str, w: torch.Tensor, peers: dict) -> Verification:
    """nvq (ops) against the torch reference on the same device, byte for byte."""
    v = Verification(shape_name)
    nv_got, nv_want = nvq_nvfp4(w), reference_nvfp4(w)
    three = nvq_nvfp4_three_ops(w)
    v.checks["NVFP4 three ops == one call"] = compare(torch.cat([t.flatten().view(torch.uint8) for t in three]),
                                                      torch.cat([t.flatten().view(torch.uint8) for t in nv_got]))
    v.checks["NVFP4 global scale"] = compare(nv_got[2], nv_want[2])
    v.checks["NVFP4 block scales"] = compare(nv_got[1], nv_want[1])
    v.checks["NVFP4 codes"] = compare(nv_got[0], nv_want[0])
    mx_got, mx_want = nvq_mxfp4(w), reference_mxfp4(w)
    v.checks["MXFP4 scales"] = compare(mx_got[1], mx_want[1])
    v.checks["MXFP4 codes"] = compare(mx_got[0], mx_want[0])
    v.checks["NVFP4 dequantize"] = compare(
        ops.nvfp4_dequantize_packed(*nv_want, DTYPE), reference_nvfp4_dequantize(*nv_want))
    v.checks["MXFP4 dequantize"] = compare(
        ops.mxfp4_dequantize_packed(*mx_want, DTYPE), reference_mxfp4_dequantize(*mx_want))
    for name, (kind, fn) in peers.items():
        if name.startswith("compressed-tensors"):  # CT is the profile nvq reproduces
            out = fn(w)
            want = nv_want if kind == "nvfp4 quantize" else mx_want
            checks = [compare(out["weight_packed"], want[0]), compare(out["weight_scale"], want[1])]
            bad = [c for c in checks if c != "OK"]
            v.checks[f"peer {name} == reference"] = bad[0] if bad else "OK"
    del nv_got, nv_want, mx_got, mx_want
    free_memory(w.device)
    return v


def special_values(device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=gen) * STD
    w[0, :32] = 0.0  # zero blocks
    w[1, :32] = -0.0
    w[2, 5] = float("nan")
    w[3, 17] = float("inf")
    w[4, 40] = float("-inf")
    w[5, :16] = 1e-30  # far below the tensor amax
    w[6, 3] = 3e38  # near bf16 max
    return w.to(DTYPE).to(device)


def verify_special_values(device: torch.device) -> Verification:
    """The kernels on NaN/±Inf/zero blocks against the CPU reference (the spec of record)."""
    w = special_values(device)
    v = Verification("special values vs CPU reference")
    nv_got, nv_want = nvq_nvfp4(w), reference_nvfp4(w.cpu())
    for what, i in (("NVFP4 codes", 0), ("NVFP4 block scales", 1), ("NVFP4 global scale", 2)):
        v.checks[what] = compare(nv_got[i], nv_want[i])
    mx_got, mx_want = nvq_mxfp4(w), reference_mxfp4(w.cpu())
    for what, i in (("MXFP4 codes", 0), ("MXFP4 scales", 1)):
        v.checks[what] = compare(mx_got[i], mx_want[i])
    return v


# --- copy and report ------------------------------------------------------------------------


def copy_row(device: torch.device, clock: Clock, nbytes: int) -> Result:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = clock.median_ms(lambda i: dst.copy_(src), 1)
    gbps = 2 * nbytes / (ms * 1e-3) / 1e9
    return Result("-", f"device copy of {nbytes >> 20} MiB", "copy", 2.0, ms, gbps, 100.0, ms, "bytes read + written")


def format_row(r: Result) -> str:
    if r.ms is None:
        return f"| {r.shape} | {r.name} | {r.bytes_per_element:g} | - | - | - | - | {r.note} |"
    return (
        f"| {r.shape} | {r.name} | {r.bytes_per_element:g} | {r.ms:.3f} | {r.gbps:.1f} | "
        f"{r.pct_of_copy:.1f} | {r.floor_ms:.3f} | {r.note} |"
    )


LEGEND = (
    "B/elem counted (read + written once): NVFP4 2.5625 = 2 bf16 in + 0.5 codes + 1/16 E4M3 scales; "
    "MXFP4 2.53125 = 2 + 0.5 + 1/32 E8M0 scales; dequantize moves the same bytes the other way; the copy counts "
    "read + write. floor ms = least time at copy bandwidth; NVFP4 quantize needs the amax first, so its floor is "
    "two passes, 4.5625 B/elem. Input: bf16, std 0.02 random, rotated over enough buffers to exceed 2x L2.\n"
)
TABLE_HEADER = (
    "| shape | what | B/elem counted | ms (median) | effective GB/s | % of copy | floor ms | note |\n"
    "|---|---|---|---|---|---|---|---|"
)


def versions(device: torch.device) -> dict:
    def version_of(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    nvcc = ops.find_nvcc()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvcc": ops.nvcc_release(ops.nvcc_version(str(nvcc))) if nvcc else "not found",
        "nvq": nvq_version,
        "compressed-tensors": version_of("compressed-tensors"),
        "torchao": version_of("torchao"),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"sm_count": props.multi_processor_count, "l2_bytes": l2_bytes(device), "driver": driver_version()}
    return info


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def print_report(meta, results, verifications, notes) -> None:
    print("\n# nvq kernels benchmark")
    print(" · ".join(f"{k} {v}" for k, v in meta.items()))
    for note in notes:
        print(f"- {note}")
    print(LEGEND)
    print(TABLE_HEADER)
    for r in results:
        print(format_row(r))
    print("\n| bytes checked | nvq vs torch reference | compressed-tensors vs reference |\n|---|---|---|")
    for v in verifications:
        print(f"| {v.shape} | {summarize(v, peer=False)} | {summarize(v, peer=True)} |")


def summarize(v: Verification, peer: bool) -> str:
    """'OK (n checks)', or each failed check with its outcome."""
    checks = {k: c for k, c in v.checks.items() if k.startswith("peer") == peer}
    if not checks:
        return "-"
    bad = [f"{k}: {c}" for k, c in checks.items() if c != "OK"]
    return "; ".join(bad) if bad else f"OK ({len(checks)} checks)"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few reps: checks the script itself")
    parser.add_argument("--shapes", type=parse_shapes, help="e.g. 8192x28672,4096x4096")
    parser.add_argument("--experts", help="MoE expert stack ExNxK, e.g. 128x704x2816; 'none' skips it")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per row (median; >= 20 on the GPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="calls per timed sample, back to back (default 1)")
    parser.add_argument("--no-reference", action="store_true", help="skip the torch-reference rows")
    args = parser.parse_args(argv)

    global NO_REFERENCE
    NO_REFERENCE = args.no_reference
    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes = args.shapes or (DRY_RUN_SHAPES if args.dry_run else GPU_SHAPES)
    reps, warmup = (3, 1) if args.dry_run else (args.reps, args.warmup)
    if not args.dry_run:
        if not torch.cuda.is_available():
            print("no CUDA device: run on the GPU machine, or pass --dry-run", file=sys.stderr)
            return 2
        if reps < 20:
            print("--reps must be >= 20 on the GPU", file=sys.stderr)
            return 2
        print(f"kernel library: {ops.build_library()}", flush=True)  # fail loudly, before any fallback
        if not ops.kernels_available():
            return 2

    meta = versions(device)
    print(json.dumps(meta), flush=True)
    clock = Clock(device, reps, warmup, batch=args.batch)
    meta["calls per timed sample"] = args.batch
    peers, notes = load_peers()
    for note in notes:
        print(note, flush=True)

    copy = copy_row(device, clock, DRY_RUN_COPY_BYTES if args.dry_run else COPY_BYTES)
    free_memory(device)
    print(TABLE_HEADER + "\n" + format_row(copy), flush=True)
    results, verifications = [copy], [verify_special_values(device)]
    for shape in shapes:
        shape_results, verification = bench_shape(shape, device, clock, copy.gbps, peers, expect_cuda=not args.dry_run)
        results += shape_results
        verifications.append(verification)
        free_memory(device)

    if args.experts != "none":
        stack = parse_shapes(args.experts)[0] if args.experts else (
            DRY_RUN_EXPERT_STACK if args.dry_run else EXPERT_STACK)
        expert_results, verification = bench_experts(stack, device, clock, copy.gbps, expect_cuda=not args.dry_run)
        results += expert_results
        verifications.append(verification)
        free_memory(device)

    print_report(meta, results, verifications, notes)
    if out := os.environ.get("OUT"):
        payload = {"meta": meta, "notes": notes, "results": [asdict(r) for r in results],
                   "verification": [{"shape": v.shape, **v.checks} for v in verifications]}
        Path(out, "kernels.json").write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {Path(out, 'kernels.json')}")
    nvq_failed = [r.name for r in results if r.name.startswith("nvq") and r.ms is None]
    return 1 if nvq_failed or not all(v.ok for v in verifications) else 0


if __name__ == "__main__":
    sys.exit(main())
