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
