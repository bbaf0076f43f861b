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
PACKED = "weight_packed"  # E2M1 codes, two to a byte along K
GLOBAL_SCALE = "weight_global_scale"  # suffix of the per-tensor scale (a divisor, formats.md §1.1)


@dataclass(frozen=True)
class CTLayout:
    """One compressed-tensors scheme's container: its tensors per quantized Linear and its config
    group. The scheme modules (nvq.schemes) hold the instances."""

    scheme: str  # nvq's name for it, for messages
    format: str  # compressed-tensors format name
    group_size: int
    scale_dtype: str  # safetensors dtype of weight_scale
    has_global_scale: bool
    weights_args: dict  # the "weights" QuantizationArgs of the config group

    def output_tensors(self, module: str, shape: tuple[int, int]) -> list[OutputTensor]:
        """The tensors one quantized Linear of logical shape [N, K] becomes."""
        n, k = shape
        tensors = [
            OutputTensor(f"{module}.{PACKED}", "U8", (n, k // 2)),
            OutputTensor(f"{module}.weight_scale", self.scale_dtype, (n, k // self.group_size)),
        ]
        if self.has_global_scale:
            tensors.append(OutputTensor(f"{module}.{GLOBAL_SCALE}", "F32", (1,)))
        return tensors

    def shape_problem(self, shape: tuple[int, int]) -> str | None:
        if shape[1] % self.group_size:
            return f"input dimension {shape[1]} is not a multiple of the {self.scheme} group size {self.group_size}"
        return None


def packed_tensors(packed: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row-chunk tensors (by suffix) from codes already packed in pairs and their block scales
    (what nvq.ops returns): E4M3 for NVFP4, E8M0 bytes for MXFP4."""
    return {PACKED: packed, "weight_scale": scale}


def quantization_config(layout: CTLayout, ignore: list[str]) -> dict:
    """Weight-only (A16) config group targeting every Linear not listed in `ignore`."""
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
