"""Rewrites of checkpoints for tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def as_modelopt_names(ct_dir: Path, dst: Path) -> Path:
    """The same bytes under ModelOpt's names (formats.md §3.1): weight_packed → weight, weight_global_scale
    g → weight_scale_2 = fp32(1/g) (0-d); compressed-tensors' own converter does the inverse."""
    shutil.copytree(ct_dir, dst)
    renamed = {}
    for name, t in load_file(dst / "model.safetensors").items():
        if name.endswith(".weight_packed"):
            renamed[name.removesuffix("_packed")] = t
        elif name.endswith(".weight_global_scale"):
            renamed[name.replace(".weight_global_scale", ".weight_scale_2")] = (1.0 / t.float()).reshape(())
        else:
            renamed[name] = t
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    ignore = cfg["quantization_config"]["ignore"]
    cfg["quantization_config"] = {
        "quant_method": "modelopt", "quant_algo": "W4A16_NVFP4", "group_size": 16, "ignore": ignore,
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


# llama.cpp's converter (llama-cpp-python 0.3.36) registers Gemma4UnifiedForConditionalGeneration
# but not Gemma4UnifiedForCausalLM, whose decoder it would convert exactly like Gemma4ForCausalLM's.
CONVERTER_ARCHITECTURES = {"Gemma4UnifiedForCausalLM": "Gemma4ForCausalLM"}


def as_llamacpp_convertible(src: Path, dst: Path) -> Path:
    """A copy of a Gemma-4 checkpoint (dense or quantized) that llama.cpp's converter accepts;
    tensors untouched, config.json edited only where the converter falls short:

    * the unified causal architecture gets the name of the class that converts it;
    * Gemma4Model.set_gguf_parameters requires an `moe_intermediate_size` key, which
      Gemma4UnifiedTextConfig never writes; null is what Gemma4TextConfig writes for dense models.
    """
    shutil.copytree(src, dst)
    path = dst / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = [CONVERTER_ARCHITECTURES.get(a, a) for a in cfg.get("architectures", [])]
    text = cfg.get("text_config") or cfg
    text.setdefault("moe_intermediate_size", None)
    path.write_text(json.dumps(cfg, indent=2))
    return dst


def with_mlp_width(d: Path, width: int) -> Path:
    """The Llama checkpoint in `d`, edited in place to an MLP `width` wide in every layer, config
    included (the config must keep agreeing with the tensors, or convert refuses it first)."""
    tensors = load_file(d / "model.safetensors")
    for name in list(tensors):
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            tensors[name] = tensors[name][:width].contiguous()
        elif name.endswith("mlp.down_proj.weight"):
            tensors[name] = tensors[name][:, :width].contiguous()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = width
    (d / "config.json").write_text(json.dumps(cfg))
    return d
