"""MB/s of input for the NVFP4/MXFP4 quantize ops on CPU: the reference codecs vs the native codec.

    python bench/cpu_codec.py [--rows 8192] [--k 4096] [--dtype bfloat16] [--repeat 3]

Prints the best of `repeat` runs per op and backend (the machine is shared: the best run is the
least disturbed one), and checks that both backends wrote the same bytes. With compressed-tensors
installed it also times the per-tensor work of llm-compressor's `model_free_ptq` (observer min/max,
tensor absmax, generate_gparam, calculate_qparams, `*PackedCompressor.compress`) on the same tensor,
amax included for NVFP4, and checks its bytes too.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nvq import ops


def best_seconds(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return min(times), out


def compressed_tensors_cases(w: torch.Tensor) -> dict:
    """op -> a callable doing what model_free_ptq does per weight (tests/formats/test_vs_compressed_tensors.py)."""
    try:
        from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
        from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
        from compressed_tensors.quantization import QuantizationScheme
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
        from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    except ImportError:
        return {}

    def run(preset, compressor, block, with_global):
        scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])
        blocks = w.reshape(w.shape[0], -1, block)
        g = None
        if with_global:
            absmax = w.abs().amax()
            g = generate_gparam(-absmax, absmax)
        scale, zero_point = calculate_qparams(blocks.amin(-1), blocks.amax(-1), scheme.weights, global_scale=g)
        state = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero_point}
        if g is not None:
            state["weight_global_scale"] = g
        out = compressor.compress(state, scheme)
        return out["weight_packed"], out["weight_scale"]

    return {
        "nvfp4_quantize_packed": lambda: run("NVFP4A16", NVFP4PackedCompressor, 16, True),
        "mxfp4_quantize_packed": lambda: run("MXFP4A16", MXFP4PackedCompressor, 32, False),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    w = (torch.randn(args.rows, args.k, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    mb = w.numel() * w.element_size() / 1e6
    cases = {
        "tensor_amax": lambda: ops.tensor_amax(w),
        # amax and global scale included: block scales need them first
        "nvfp4_quantize_packed": lambda: ops.nvfp4_quantize_packed(
            w, ops.nvfp4_global_scale(ops.tensor_amax(w), dtype)),
        "mxfp4_quantize_packed": lambda: ops.mxfp4_quantize_packed(w),
    }
    print(f"{args.rows}x{args.k} {args.dtype} ({mb:.0f} MB), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.repeat}")
    peers = compressed_tensors_cases(w)
    for op, fn in cases.items():
        results = {}
        if op in peers:
            results["compressed-tensors"] = best_seconds(peers[op], args.repeat)
        for switch in ("0", "1"):
            os.environ["NVQ_CPU_KERNELS"] = switch
            seconds, out = best_seconds(fn, args.repeat)
            results[ops.backend(op)] = (seconds, out)
        line = [f"{op:<24}"]
        for name, (seconds, _) in results.items():
            line.append(f"{name} {mb / seconds:8.0f} MB/s ({seconds:.3f} s)")
        outs = [out if isinstance(out, tuple) else (out,) for _, out in results.values()]
        same = all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                   for other in outs[1:] for a, b in zip(outs[0], other, strict=True))
        ratio = results["reference"][0] / results["cpu"][0] if "cpu" in results else float("nan")
        if "compressed-tensors" in results and "cpu" in results:
            line.append(f"native/compressed-tensors x{results['compressed-tensors'][0] / results['cpu'][0]:.1f}")
        print("  ".join(line) + f"  native/reference x{ratio:.0f}  {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
