"""NVFP4 (formats.md §1): E2M1 codes, an FP8 E4M3 scale per 16 and an fp32 global scale (a
divisor) that fusion groups share. nvq writes compressed-tensors `nvfp4-pack-quantized`; verify
also reads ModelOpt NVFP4, whose arithmetic differs (the `modelopt` profile, §3.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from nvq import ops, schemes
from nvq.formats import e2m1, nvfp4
from nvq.formats.constants import NVFP4_BLOCK, NVFP4_GLOBAL_NUMERATOR
from nvq.layouts import compressed_tensors as ct
from nvq.schemes import compressed_tensors as ct_schemes

NAME = "nvfp4"
FP16_MAX = 65504.0
LAYOUT = ct.CTLayout(
    scheme=NAME,
    format="nvfp4-pack-quantized",
    group_size=NVFP4_BLOCK,
    scale_dtype="F8_E4M3",
    has_global_scale=True,
    weights_args={
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": NVFP4_BLOCK,
        "strategy": "tensor_group",
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn",
    },
)


def group_global_scale(amax: Tensor) -> tuple[Tensor, torch.dtype]:
    """(global scale, dtype to quantize in) for a fusion group's amax, in the weights' dtype."""
    dtype = amax.dtype
    # compressed-tensors computes 1/amax·2688 in fp16 for fp16 weights; below amax ≈ 0.041 that
    # overflows, g falls back to 1 and every block flushes to zero (formats.md §1.5). nvq computes
    # such groups in fp32 instead of writing an all-zero weight, and the summary says so.
    if dtype == torch.float16 and float(amax) < NVFP4_GLOBAL_NUMERATOR / FP16_MAX:
        dtype = torch.float32
    return ops.nvfp4_global_scale(amax.to(dtype), dtype), dtype


def encode(w: Tensor, group_size: int = NVFP4_BLOCK) -> dict[str, Tensor]:
    g, dtype = group_global_scale(ops.tensor_amax(w))
    packed, scale = ops.nvfp4_quantize_packed(w.to(dtype), g)
    return {**ct.packed_tensors(packed, scale), ct.GLOBAL_SCALE: g.reshape(1)}


def decode_ct(t: dict[str, Tensor]) -> Tensor:
    # compressed-tensors: W = e2m1 · s / g, g the divisor `weight_global_scale` (formats.md §1.1)
    return ops.nvfp4_dequantize_packed(
        t["weight_packed"], t["weight_scale"], t[ct.GLOBAL_SCALE].float().reshape(1), torch.float32
    )


def decode_modelopt(t: dict[str, Tensor]) -> Tensor:
    # ModelOpt: W = e2m1 · s · s2, s2 the MULTIPLIER `weight_scale_2` (formats.md §3.1)
    s2 = t["weight_scale_2"].float().reshape(())
    q = nvfp4.NVFP4Quantized(
        e2m1.unpack_pairs(t["weight"]), t["weight_scale"], nvfp4.global_scale_from_scale_2(s2), s2
    )
    return nvfp4.dequantize(q, torch.float32)


def expected(w: Tensor, storage, groups: Tensor | None, g: Tensor | None) -> Tensor:
    """w [N, K] stored as the candidate's profile stores it; g: a fusion group's shared divisor."""
    profile = nvfp4.Profile(storage.profile or "ct")
    if profile is nvfp4.Profile.MODELOPT:
        s2 = 1.0 / g if g is not None else None
        return nvfp4.dequantize(
            nvfp4.quantize(w, profile=profile, weight_scale_2=s2), torch.float32
        )
    # the compressed-tensors arithmetic, by the CUDA kernels on a GPU (ops falls back to the reference)
    g = ops.nvfp4_global_scale(ops.tensor_amax(w), w.dtype) if g is None else g
    packed, block_scale = ops.nvfp4_quantize_packed(w, g)
    return ops.nvfp4_dequantize_packed(packed, block_scale, g, torch.float32)


SPEC = schemes.register(
    schemes.SchemeSpec(
        name=NAME,
        summary="compressed-tensors nvfp4-pack-quantized: E2M1, FP8 E4M3 scale per 16, fp32 global scale",
        expected=expected,
        group_sizes=(NVFP4_BLOCK,),
        layout=schemes.fixed_group(NAME, LAYOUT),
        encode=encode,
        stream=schemes.StreamOps(
            quantize=ops.nvfp4_quantize_packed,
            quantize_experts=ops.nvfp4_quantize_experts,
            pack=ct.packed_tensors,
            op="nvfp4_quantize_packed",
            experts_op="nvfp4_quantize_experts",
            global_scale=schemes.GlobalScale(
                ct.GLOBAL_SCALE, group_global_scale, nvfp4.global_scale
            ),
        ),
        decoders={
            "ct": ct_schemes.decoder(LAYOUT, decode_ct, optional=("input_global_scale",)),  # W4A4 (verify/act_inputs.py)
            "modelopt": schemes.Decoder(
                "weight_scale_2",
                ("weight", "weight_scale", "weight_scale_2"),
                decode_modelopt,
                schemes.pairs_shape("weight"),
                optional=("input_scale",),
            ),
        },
        scale_block=lambda storage, k: NVFP4_BLOCK,
        quantization_config=ct_schemes.config(LAYOUT),
    )
)
