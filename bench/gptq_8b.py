"""GPTQ time and peak GPU memory on an 8B-shaped random checkpoint (Llama-3.1-8B shapes: 32 layers,
hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256), calibrated on 128 × 2048 tokens.

Target (issue: GPTQ-int4): under 10 minutes on one H100. Peers, published (perf-anchors.md §3):
llm-compressor GPTQ W4A16 745 s on one GPU with 512 × 2048 tokens; AutoRound W4G128 12 min on an
A100 with 128 × 2048. The same run also times round-to-nearest (`--method rtn`) as the floor.

    python bench/gptq_8b.py WORK_DIR [--layers N] [--samples S] [--seq-len L]

Weights are N(0, 0.02) in bf16 (norms 1); the calibration text is the embedded corpus through a
small byte-level tokenizer (ids index the first rows of the embedding; the GPTQ work per token is
the same). Prints one JSON object; `output_sha256` digests the written shards, so two checkouts
can be compared byte for byte, and `seconds_per_layer` leaves out layer 0 (warm-up).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvq.io.safetensors import OutputTensor, ShardedWriter  # noqa: E402
from nvq.quant.gptq_write import GPTQSettings  # noqa: E402
from nvq.quant.pipeline import convert  # noqa: E402
from tests.support.tiny_models import build_tokenizer  # noqa: E402

SHAPES = dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, vocab=128256)


def build(out: Path, layers: int) -> None:
    h, i, hd = SHAPES["hidden"], SHAPES["inter"], SHAPES["head_dim"]
    q, kv = SHAPES["heads"] * hd, SHAPES["kv"] * hd
    tensors = {"model.embed_tokens.weight": (SHAPES["vocab"], h), "model.norm.weight": (h,),
               "lm_head.weight": (SHAPES["vocab"], h)}
    for b in range(layers):
        p = f"model.layers.{b}."
        tensors.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    out.mkdir(parents=True)
    vocab = build_tokenizer(out)
    w = ShardedWriter(out, [OutputTensor(n, "BF16", s) for n, s in tensors.items()], 5 * 10**9)
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, s in tensors.items():
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g, device="cuda") * 0.02
        w.write(n, t.to(torch.bfloat16).cpu())
    w.close()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": SHAPES["heads"],
           "num_key_value_heads": SHAPES["kv"], "head_dim": hd, "vocab_size": SHAPES["vocab"],
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
           "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    assert vocab <= SHAPES["vocab"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def timed(src: Path, out: Path, settings: GPTQSettings) -> dict:
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    layer_times = []

    def layer_done(stats, n):
        layer_times.append((stats.layer, time.perf_counter() - started, stats.mean))
        print(f"  layer {stats.layer + 1}/{n}: error {stats.mean:.3e} at {layer_times[-1][1]:.1f} s", flush=True)

    s = convert(src, out, "gptq", device="cuda", force=True, gptq=settings, layer_progress=layer_done)
    seconds = time.perf_counter() - started
    result = {"method": settings.method, "seconds": round(seconds, 1),
              "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
              "bytes_written": s.bytes_written, "group_size": s.gptq.group_size,
              "output_sha256": _digest(out)}
    if len(layer_times) > 1:
        result["seconds_per_layer"] = round((layer_times[-1][1] - layer_times[0][1]) / (len(layer_times) - 1), 2)
    if settings.method == "gptq":
        r = s.gptq.report
        result.update(calibration=s.gptq.calibration, mean_error=r.mean_error,
                      worst_layer=r.worst_layer.layer, worst_error=r.worst_layer.mean)
    return result


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--methods", default="rtn,gptq", help="comma-separated: rtn, gptq")
    ap.add_argument("--park-budget-gib", type=float, default=None,
                    help="GiB of parked calibration activations kept on the GPU (default: nvq's)")
    args = ap.parse_args()
    if args.park_budget_gib is not None:
        from nvq.quant import calibrate
        calibrate.DEFAULT_BUDGET = int(args.park_budget_gib * 2**30)
    src = args.work / "rand8b"
    if not src.exists():
        t = time.perf_counter()
        build(src, args.layers)
        print(f"built {src} in {time.perf_counter() - t:.1f} s", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "layers": args.layers, "samples": args.samples, "seq_len": args.seq_len,
              "park_budget_gib": args.park_budget_gib,
              "date": time.strftime("%Y-%m-%d")}
    settings = {"rtn": GPTQSettings(method="rtn"), "gptq": GPTQSettings(samples=args.samples, seq_len=args.seq_len)}
    for method in args.methods.split(","):
        report[method] = timed(src, args.work / method, settings[method])
        shutil.rmtree(args.work / method)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
