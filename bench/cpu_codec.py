"""MB/s of input for the NVFP4/MXFP4 quantize ops on CPU: the reference codecs vs the native codec.

    python bench/cpu_codec.py [--rows 8192] [--k 4096] [--dtype bfloat16] [--repeat 3]

Prints the best of `repeat` runs per op and backend (the machine is shared: the best run is the
least disturbed one), and checks that both backends wrote the same bytes.
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
    g = ops.nvfp4_global_scale(ops.tensor_amax(w), dtype)
    cases = {
        "tensor_amax": lambda: ops.tensor_amax(w),
        "nvfp4_quantize_packed": lambda: ops.nvfp4_quantize_packed(w, g),
        "mxfp4_quantize_packed": lambda: ops.mxfp4_quantize_packed(w),
    }
    print(f"{args.rows}x{args.k} {args.dtype} ({mb:.0f} MB), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.repeat}")
    for op, fn in cases.items():
        results = {}
        for switch in ("0", "1"):
            os.environ["NVQ_CPU_KERNELS"] = switch
            seconds, out = best_seconds(fn, args.repeat)
            results[ops.backend(op)] = (seconds, out)
        line = [f"{op:<24}"]
        for name, (seconds, _) in results.items():
            line.append(f"{name} {mb / seconds:8.0f} MB/s ({seconds:.3f} s)")
        outs = [out for _, out in results.values()]
        same = all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                   for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in outs)))
        ratio = results["reference"][0] / results["cpu"][0] if "cpu" in results else float("nan")
        print("  ".join(line) + f"  x{ratio:.0f}  {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
