"""Peak memory and time of `nvq convert` on a synthetic checkpoint holding one 1 GiB weight.

Target (issue: foundation): under 2.5 GiB peak RSS. Peer in the same run: compressed-tensors
0.20.0 compressing the same weight the way its own entry points do (the whole tensor loaded with
`safetensors.torch.load_file`, then `NVFP4PackedCompressor.compress`), and torch's import floor.

    python bench/convert_memory.py [WORK_DIR]

Each measurement runs in a fresh child process; peak RSS is the child's ru_maxrss.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, COLS = 8192, 65536  # bf16: exactly 1 GiB

BUILD = """
import json, sys, torch
from pathlib import Path
from nvq.io.safetensors import OutputTensor, ShardedWriter
out = Path(sys.argv[1]); out.mkdir(parents=True)
R, C = {rows}, {cols}
small = {{
    "model.embed_tokens.weight": (256, 1024), "model.norm.weight": (1024,),
    "model.layers.0.input_layernorm.weight": (1024,), "model.layers.0.post_attention_layernorm.weight": (1024,),
}}
big = "model.layers.0.mlp.down_proj.weight"
w = ShardedWriter(out, [OutputTensor(n, "BF16", s) for n, s in small.items()] + [OutputTensor(big, "BF16", (R, C))], 1 << 40)
g = torch.Generator().manual_seed(0)
for n, s in small.items():
    w.write(n, (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16))
step = 512
for a in range(0, R, step):
    w.write(big, (torch.randn(step, C, generator=g) * 0.02).to(torch.bfloat16))
w.close()
cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=C,
           num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, vocab_size=256)
(out / "config.json").write_text(json.dumps(cfg))
"""

PEER_CT = """
import sys, torch
from safetensors.torch import load_file
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
w = load_file(sys.argv[1] + "/model.safetensors")["model.layers.0.mlp.down_proj.weight"]
scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
amax = w.abs().amax()
g = generate_gparam(-amax, amax)
blocks = w.reshape(w.shape[0], -1, 16)
scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), scheme.weights, global_scale=g)
sd = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale.to(w.dtype), "weight_global_scale": g,
                                     "weight_zero_point": zp}, scheme)
print(sorted(sd))
"""

TORCH_FLOOR = "import torch, nvq.quant.pipeline"


# A fresh launcher per measurement: its RUSAGE_CHILDREN peak is exactly its one child's.
LAUNCHER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{proc.stderr[-2000:]}")
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    return {"peak_rss_gib": round(peak_kib / 2**20, 3), "seconds": round(seconds, 1)}


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="nvq-bench-"))
    src = work / "synthetic-1gib"
    if not src.exists():
        subprocess.run([sys.executable, "-c", BUILD.format(rows=ROWS, cols=COLS), str(src)], check=True)
    rows = []
    py = sys.executable
    runs = [
        ("torch + nvq import (floor)", [py, "-c", TORCH_FLOOR]),
        ("nvq convert --scheme mxfp4", [py, "-m", "nvq", "convert", str(src), str(work / "mx"), "--scheme", "mxfp4", "--device", "cpu", "--force"]),
        ("nvq convert --scheme nvfp4", [py, "-m", "nvq", "convert", str(src), str(work / "nv"), "--scheme", "nvfp4", "--device", "cpu", "--force"]),
        ("compressed-tensors 0.20.0 NVFP4 compress (whole tensor)", [py, "-c", PEER_CT, str(src)]),
    ]
    for label, cmd in runs:
        r = measure(cmd)
        rows.append((label, r))
        print(f"{label:58s} peak RSS {r['peak_rss_gib']:6.3f} GiB   {r['seconds']:6.1f} s", flush=True)
    info = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "tensor": f"{ROWS}x{COLS} bf16 (1 GiB)"}
    print(json.dumps({"info": info, "rows": {k: v for k, v in rows}}, indent=1))
    if len(sys.argv) <= 1:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
