"""MXFP4 (formats.md §2a): E2M1 codes and an E8M0 scale per 32, no tensor scale. nvq writes
compressed-tensors `mxfp4-pack-quantized`."""

from __future__ import annotations

import torch
from torch import Tensor

from nvq import ops, schemes
from nvq.formats.constants import MXFP4_BLOCK
from nvq.layouts import compressed_tensors as ct
from nvq.schemes import compressed_tensors as ct_schemes

NAME = "mxfp4"
LAYOUT = ct.CTLayout(
    scheme=NAME,
    format="mxfp4-pack-quantized",
    group_size=MXFP4_BLOCK,
    scale_dtype="U8",
    has_global_scale=False,
    weights_args={
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": MXFP4_BLOCK,
        "strategy": "group",
        "dynamic": False,
        # CT keys MX scale generation on this field (formats.md §2a); needs CT >= 0.13.
        "scale_dtype": "torch.uint8",
    },
)
SERVING_NOTE = (
    "vLLM serves compressed-tensors MXFP4 as W4A4 on Blackwell (SM100+): each Linear's input is "
    "quantized to MXFP4 there (weight-only elsewhere); `nvq verify --serve-as vllm-sm100` certifies that."
)


def quantize(w: Tensor, global_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return ops.mxfp4_quantize_packed(w)


def quantize_experts(stack: Tensor) -> tuple[Tensor, Tensor, None]:
    return (*ops.mxfp4_quantize_experts(stack), None)


def encode(w: Tensor, group_size: int = MXFP4_BLOCK) -> dict[str, Tensor]:
    return ct.packed_tensors(*ops.mxfp4_quantize_packed(w))


def decode(t: dict[str, Tensor]) -> Tensor:
    return ops.mxfp4_dequantize_packed(t["weight_packed"], t["weight_scale"], torch.float32)


def expected(w: Tensor, storage, groups: Tensor | None, g: Tensor | None) -> Tensor:
    packed, scale = ops.mxfp4_quantize_packed(w)
    return ops.mxfp4_dequantize_packed(packed, scale, torch.float32)


SPEC = schemes.register(
    schemes.SchemeSpec(
        name=NAME,
        summary="compressed-tensors mxfp4-pack-quantized: E2M1, E8M0 scale per 32",
        expected=expected,
        group_sizes=(MXFP4_BLOCK,),
        layout=schemes.fixed_group(NAME, LAYOUT),
        encode=encode,
        # a stack is one [E·N, K] launch of the 2-D op, which is the op whose backend ran
        stream=schemes.StreamOps(
            quantize,
            quantize_experts,
            ct.packed_tensors,
            "mxfp4_quantize_packed",
            "mxfp4_quantize_packed",
        ),
        decoders={"ct": ct_schemes.decoder(LAYOUT, decode)},
        scale_block=lambda storage, k: MXFP4_BLOCK,
        quantization_config=ct_schemes.config(LAYOUT),
        serving_notes=lambda model_dtype: [SERVING_NOTE],
    )
)
