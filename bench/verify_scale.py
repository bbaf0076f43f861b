"""`nvq verify` at release scale: time, peak host RSS and peak GPU memory of one verify run.

    python bench/verify_scale.py WORK_DIR --preset llama-1b [--layers N] [--device cpu|cuda]
                                 [--tokens 128] [--sequences 1] [--outtype f16] [--keep]

Builds (once, in WORK_DIR) a random bf16 checkpoint of the preset's shapes (N(0, 0.02) weights,
norms, scales and layer scalars 1, a synthetic tokenizer padded to the real vocabulary size; the
gemma4 presets save a text-only Gemma4ForCausalLM), converts it to NVFP4 with
`nvq convert`, makes the oracle GGUF with llama.cpp's converter (`--outtype`, default f16), then
runs `nvq verify CANDIDATE --oracle GGUF --tokens T` in a child process and reports its wall
time and ru_maxrss, and the certificate's verdict, peak GPU memory and figures. Prints one JSON
object. Targets (issue 11): llama-1b on 2 CPU cores ≤ 3 GiB RSS and ≤ 5 min; llama-8b on an
H200 ≤ 45 s, host RSS ≤ 6 GiB, GPU ≤ 24 GiB; gemma4-26b-a4b per layer, flat as layers double.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvq.io.safetensors import OutputTensor, ShardedWriter  # noqa: E402
from tests.support.tiny_models import build_tokenizer  # noqa: E402

# preset -> (config.json, per-layer tensor shapes) of the released model it is shaped like
PRESETS = {
    "llama-1b": dict(model_type="llama", hidden=2048, inter=8192, heads=32, kv=8, head_dim=64, layers=16,
                     vocab=128256, tie=True, rope_theta=500000.0),
    "llama-8b": dict(model_type="llama", hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, layers=32,
                     vocab=128256, tie=False, rope_theta=500000.0),
    # text decoder of google/gemma-4-26B-A4B (gemma4.md §7): MoE beside the dense MLP on every layer
    "gemma4-26b-a4b": dict(model_type="gemma4_text", hidden=2816, inter=2112, heads=16, kv=8, kv_full=2,
                           head_dim=256, head_dim_full=512, layers=30, vocab=262144, window=1024,
                           full_period=6, experts=128, top_k=8, moe_inter=704),
}
# same structure at toy sizes, to check the pipeline end to end on a CPU; left out of --help
PRESETS["gemma4-26b-a4b-mini"] = {**PRESETS["gemma4-26b-a4b"], **dict(
    hidden=256, inter=128, heads=4, kv=2, kv_full=1, head_dim=32, head_dim_full=64, vocab=4096,
    experts=8, top_k=2, moe_inter=64)}
HIDDEN_PRESETS = ("gemma4-26b-a4b-mini",)


def llama_tensors(p: dict, layers: int) -> dict[str, tuple[int, ...]]:
    h, i, hd = p["hidden"], p["inter"], p["head_dim"]
    q, kv = p["heads"] * hd, p["kv"] * hd
    out = {"model.embed_tokens.weight": (p["vocab"], h), "model.norm.weight": (h,)}
    if not p["tie"]:
        out["lm_head.weight"] = (p["vocab"], h)
    for b in range(layers):
        pre = f"model.layers.{b}."
        out.update({
            pre + "self_attn.q_proj.weight": (q, h), pre + "self_attn.k_proj.weight": (kv, h),
            pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, q),
            pre + "mlp.gate_proj.weight": (i, h), pre + "mlp.up_proj.weight": (i, h),
            pre + "mlp.down_proj.weight": (h, i),
            pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
        })
    return out


def llama_config(p: dict, layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p["hidden"],
            "intermediate_size": p["inter"], "num_hidden_layers": layers, "num_attention_heads": p["heads"],
            "num_key_value_heads": p["kv"], "head_dim": p["head_dim"], "vocab_size": p["vocab"],
            "rms_norm_eps": 1e-5, "rope_theta": p["rope_theta"], "tie_word_embeddings": p["tie"],
            "max_position_embeddings": 8192, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def gemma4_layer_types(p: dict, layers: int) -> list[str]:
    """The release's sliding/full pattern over the first `layers` layers; the last one is full, as
    transformers forces."""
    period = p["full_period"]
    types = ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(layers)]
    types[-1] = "full_attention"
    return types


def gemma4_tensors(p: dict, layers: int) -> dict[str, tuple[int, ...]]:
    """Gemma4ForCausalLM names (gemma4.md §3.1): k_eq_v full layers have no v_proj; no PLE."""
    h, i, e, ie = p["hidden"], p["inter"], p["experts"], p["moe_inter"]
    out = {"model.embed_tokens.weight": (p["vocab"], h), "model.norm.weight": (h,)}
    for b, kind in enumerate(gemma4_layer_types(p, layers)):
        full = kind == "full_attention"
        hd, kv = (p["head_dim_full"], p["kv_full"]) if full else (p["head_dim"], p["kv"])
        q = p["heads"] * hd
        pre = f"model.layers.{b}."
        out.update({
            pre + "self_attn.q_proj.weight": (q, h), pre + "self_attn.k_proj.weight": (kv * hd, h),
            pre + "self_attn.o_proj.weight": (h, q),
            pre + "self_attn.q_norm.weight": (hd,), pre + "self_attn.k_norm.weight": (hd,),
            pre + "mlp.gate_proj.weight": (i, h), pre + "mlp.up_proj.weight": (i, h),
            pre + "mlp.down_proj.weight": (h, i),
            pre + "router.proj.weight": (e, h), pre + "router.scale": (h,), pre + "router.per_expert_scale": (e,),
            pre + "experts.gate_up_proj": (e, 2 * ie, h), pre + "experts.down_proj": (e, h, ie),
            pre + "layer_scalar": (1,),
        })
        if not full:
            out[pre + "self_attn.v_proj.weight"] = (kv * hd, h)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2",
                     "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
            out[pre + norm + ".weight"] = (h,)
    return out


def gemma4_config(p: dict, layers: int) -> dict:
    """A gemma4_text config in Google's dialect (global_head_dim / num_global_key_value_heads)."""
    return {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "hidden_size": p["hidden"],
            "intermediate_size": p["inter"], "num_hidden_layers": layers, "layer_types": gemma4_layer_types(p, layers),
            "num_attention_heads": p["heads"], "num_key_value_heads": p["kv"],
            "num_global_key_value_heads": p["kv_full"], "head_dim": p["head_dim"],
            "global_head_dim": p["head_dim_full"], "attention_k_eq_v": True, "sliding_window": p["window"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0}},
            "enable_moe_block": True, "num_experts": p["experts"], "top_k_experts": p["top_k"],
            "moe_intermediate_size": p["moe_inter"], "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": p["vocab"], "num_kv_shared_layers": 0, "use_double_wide_mlp": False,
            "vocab_size": p["vocab"], "tie_word_embeddings": True, "final_logit_softcapping": 30.0,
            "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
            "max_position_embeddings": 262144, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


# model_type -> (tensor shapes, config.json) of a preset
FAMILIES = {"llama": (llama_tensors, llama_config), "gemma4_text": (gemma4_tensors, gemma4_config)}


def build(out: Path, preset: str, layers: int, device: str) -> None:
    p = PRESETS[preset]
    tensor_shapes, config = FAMILIES[p["model_type"]]
    tensors = tensor_shapes(p, layers)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    build_tokenizer(tmp, vocab_size=p["vocab"])
    w = ShardedWriter(tmp, [OutputTensor(n, "BF16", s) for n, s in tensors.items()], 5 * 10**9)
    g = torch.Generator(device=device).manual_seed(0)
    for n, s in tensors.items():
        # every 1-D tensor is a norm weight, a router/expert scale or a layer scalar: all 1
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g, device=device) * 0.02
        w.write(n, t.to(torch.bfloat16).cpu())
        del t
    w.close()
    (tmp / "config.json").write_text(json.dumps(config(p, layers), indent=2))
    tmp.rename(out)


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of one command (its own peak RSS is in the certificate it writes)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} … exited {proc.returncode}")
    return seconds, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    public = sorted(set(PRESETS) - set(HIDDEN_PRESETS))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b", metavar="{" + ",".join(public) + "}")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--outtype", default="f16")
    args = ap.parse_args()
    layers = args.layers or PRESETS[args.preset]["layers"]
    work = args.work / f"{args.preset}-L{layers}"
    src, cand, gguf = work / "bf16", work / "nvfp4", work / f"oracle-{args.outtype}.gguf"
    steps = {}
    if not src.exists():
        t0 = time.perf_counter()
        build(src, args.preset, layers, "cuda" if args.device == "cuda" else "cpu")
        steps["build_s"] = round(time.perf_counter() - t0, 1)
    py = sys.executable
    if not cand.exists():
        steps["convert_s"], _ = timed(
            [py, "-m", "nvq", "convert", str(src), str(cand), "--scheme", "nvfp4", "--device", args.device])
    if not gguf.exists():
        from tests.support.llamacpp import convert_to_gguf

        t0 = time.perf_counter()
        convert_to_gguf(src, gguf, args.outtype)
        steps["gguf_s"] = round(time.perf_counter() - t0, 1)
    cert_path = work / "cert.json"
    seconds, proc = timed([py, "-m", "nvq", "verify", str(cand), "--oracle", str(gguf), "--tokens",
                                str(args.tokens), "--sequences", str(args.sequences), "--device", args.device,
                                "--json", str(cert_path)])
    cert = json.loads(cert_path.read_text())
    lg = cert["logits"]
    print(json.dumps({
        "preset": args.preset, "layers": layers, "device": args.device, "tokens": args.tokens,
        "sequences": args.sequences, "oracle": args.outtype,
        "verify_wall_s": round(seconds, 1),
        "verify_peak_rss_gib": round(cert["resources"]["peak_rss_bytes"] / 2**30, 3),
        "peak_gpu_gib": round(cert["resources"].get("peak_gpu_bytes", 0) / 2**30, 3),
        "engine_s": cert["seconds"], "verdict": cert["verdict"], "level": cert["level"],
        "mean_kld": lg.get("mean_kld"), "expected_kld": lg["expected"].get("mean_kld"),
        "top1": lg.get("top1_agreement"), "weights": len(cert["weights"]), "taps": len(cert["taps"]),
        "first_divergence": cert["first_divergence"], "setup": steps,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "stderr_tail": proc.stderr[-400:],
    }, indent=2))


if __name__ == "__main__":
    main()
