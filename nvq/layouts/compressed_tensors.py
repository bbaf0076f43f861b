"""compressed-tensors container: tensor names, dtypes and shapes per quantized module, packing of
codes into them, and the `quantization_config` that compressed-tensors, transformers and vLLM read.

Facts: spec/formats.md §1.1, §1.4 (NVFP4) and §2a (MXFP4). The codecs live in nvq.formats; this
module only lays their codes and scales out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvq.io.safetensors import OutputTensor

# The compressed-tensors release whose arithmetic and config schema nvq reproduces.
CT_VERSION = "0.20.0"


@dataclass(frozen=True)
class SchemeLayout:
    format: str  # compressed-tensors format name
    group_size: int
    scale_dtype: str  # safetensors dtype of weight_scale
    has_global_scale: bool
    weights_args: dict  # the "weights" QuantizationArgs of the config group


LAYOUTS = {
    "nvfp4": SchemeLayout(
        format="nvfp4-pack-quantized",
        group_size=16,
        scale_dtype="F8_E4M3",
        has_global_scale=True,
        weights_args={
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": 16,
            "strategy": "tensor_group",
            "dynamic": False,
            "scale_dtype": "torch.float8_e4m3fn",
        },
    ),
    "mxfp4": SchemeLayout(
        format="mxfp4-pack-quantized",
        group_size=32,
        scale_dtype="U8",
        has_global_scale=False,
        weights_args={
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": 32,
            "strategy": "group",
            "dynamic": False,
            # CT keys MX scale generation on this field (formats.md §2a); needs CT >= 0.13.
            "scale_dtype": "torch.uint8",
        },
    ),
}


def output_tensors(module: str, shape: tuple[int, int], scheme: str) -> list[OutputTensor]:
    """The tensors one quantized Linear of logical shape [N, K] becomes."""
    layout = LAYOUTS[scheme]
    n, k = shape
    tensors = [
        OutputTensor(f"{module}.weight_packed", "U8", (n, k // 2)),
        OutputTensor(f"{module}.weight_scale", layout.scale_dtype, (n, k // layout.group_size)),
    ]
    if layout.has_global_scale:
        tensors.append(OutputTensor(f"{module}.weight_global_scale", "F32", (1,)))
    return tensors


def packed_tensors(packed: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row-chunk tensors (by suffix) from codes already packed in pairs and their block scales
    (what nvq.ops returns): E4M3 for NVFP4, E8M0 bytes for MXFP4."""
    return {"weight_packed": packed, "weight_scale": scale}


def quantization_config(scheme: str, ignore: list[str]) -> dict:
    """Weight-only (A16) config group targeting every Linear not listed in `ignore`."""
    layout = LAYOUTS[scheme]
    return {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "format": layout.format,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "ignore": ignore,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": layout.format,
                "weights": dict(layout.weights_args),
                "input_activations": None,
                "output_activations": None,
            }
        },
    }
