"""End-to-end demo on an embedded default model: no download, no transformers needed.

Builds a SmolLM2-shaped Llama checkpoint (8 layers, random bf16 weights, ~56 M parameters),
prints nvq's plan for it, converts it to NVFP4 and to MXFP4, and prints each summary.

    python examples/quickstart.py [WORK_DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from nvq.io.safetensors import OutputTensor, ShardedWriter

# SmolLM2-135M's shapes (oracle.md §2) with fewer layers.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def demo_tensors(cfg: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_out, kv_out = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.self_attn.q_proj.weight": w(q_out, h),
            f"{p}.self_attn.k_proj.weight": w(kv_out, h),
            f"{p}.self_attn.v_proj.weight": w(kv_out, h),
            f"{p}.self_attn.o_proj.weight": w(h, q_out),
            f"{p}.mlp.gate_proj.weight": w(f, h),
            f"{p}.mlp.up_proj.weight": w(f, h),
            f"{p}.mlp.down_proj.weight": w(h, f),
            f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
    return tensors


def build_demo_checkpoint(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tensors = demo_tensors(CONFIG)
    writer = ShardedWriter(out, [OutputTensor(n, "BF16", tuple(t.shape)) for n, t in tensors.items()], 10**10)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    return out


def nvq(*args: str) -> None:
    print(f"$ nvq {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "nvq", *args], check=True)


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "out/quickstart")
    src = build_demo_checkpoint(work / "demo-llama")
    print(f"built {src} ({sum(t.numel() for t in demo_tensors(CONFIG).values()) / 1e6:.1f} M parameters)")
    nvq("inspect", str(src))
    nvq("plan", str(src), "--scheme", "nvfp4")
    for scheme in ("nvfp4", "mxfp4"):
        nvq("convert", str(src), str(work / f"demo-llama-{scheme}"), "--scheme", scheme, "--force")
    nvq("inspect", str(work / "demo-llama-nvfp4"))


if __name__ == "__main__":
    main()
