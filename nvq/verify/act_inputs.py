"""Activation quantization that a candidate declares (compressed-tensors `input_activations`),
run by `nvq verify` in the candidate and every expected-noise draw, so the certificate describes
what is served.

* NVFP4 W4A4 (`NVFP4` preset: 4-bit float, tensor_group, 16, dynamic "local"): each Linear and
  expert quantizes its input per token in blocks of 16 with its own `input_global_scale` g_x, in
  vLLM's activation-path arithmetic (`nvfp4_emulation_utils.ref_nvfp4_quant`, the math of
  `scaled_fp4_quant`): s = fp8(g·(amax_b·(1/6))), x·1/(s·(1/g)) clamped to ±6, RNE to E2M1, back as
  code·(s/g). It multiplies by reciprocals where the compressed-tensors weight path divides, and
  keeps s = 0 (CT stores 0.125). vLLM's merged layers use one g per layer, the max over the shards
  (`CompressedTensorsW4A4Fp4`: `input_global_scale.max()`; MoE w13: the max over gate and up of
  each expert), so a fusion group runs with its members' max here too.
* MXFP4 inputs (`MXFP4` preset, group 32): the EVEN-rule round trip of `nvq.verify.serving`.

Which servings honour a declaration is `Serving.declared_inputs`: the checkpoint's own arithmetic
(compressed-tensors' forward) and vLLM on Blackwell do; vLLM before Blackwell serves FP4
weight-only through Marlin and ignores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import cache

import torch

from nvq.formats import e2m1
from nvq.models.layers import InputQuantized
from nvq.verify.serving import MXFP4Inputs, Serving

NVFP4_BLOCK = 16
E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0
INPUT_SCALE = "input_global_scale"


def _reciprocal(t: torch.Tensor) -> torch.Tensor:
    # vLLM's get_reciprocal: 1/x, with 0 for 0
    return torch.where(t == 0, torch.zeros_like(t), 1.0 / t)


def nvfp4_inputs(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """x quantized to NVFP4 per row (blocks of 16 along the last dim) with the per-tensor g, and
    back, in x's dtype (vLLM `ref_nvfp4_quant` then `dequantize_to_dtype`)."""
    g = global_scale.to(device=x.device, dtype=torch.float32).reshape(())
    k = x.shape[-1]
    blocks = x.reshape(-1, k // NVFP4_BLOCK, NVFP4_BLOCK).float()
    vec_max = blocks.abs().amax(dim=-1, keepdim=True)
    scale = g * (vec_max * (1.0 / E2M1_MAX))
    scale = scale.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    output_scale = _reciprocal(scale * _reciprocal(g))
    y = (blocks * output_scale).clamp(-E2M1_MAX, E2M1_MAX)
    q = e2m1.decode(e2m1.encode(y)).float()
    return (q * (scale / g)).reshape(x.shape).to(x.dtype)


class NVFP4Inputs(InputQuantized):
    """A weight whose Linear quantizes its input to NVFP4 with the class's `global_scale`."""

    global_scale = torch.ones(1)

    @classmethod
    def quantize_input(cls, x: torch.Tensor) -> torch.Tensor:
        return nvfp4_inputs(x, cls.global_scale)


@cache
def nvfp4_inputs_type(g: float) -> type[NVFP4Inputs]:
    """The InputQuantized type of one g_x value: the type, unlike attributes, survives casts."""
    return type(
        f"NVFP4Inputs_{g!r}",
        (NVFP4Inputs,),
        {"global_scale": torch.tensor([g], dtype=torch.float32)},
    )


def declared_inputs(qc: dict | None) -> str | None:
    """ "nvfp4" or "mxfp4" when every compressed-tensors config group declares that input
    quantization, else None."""
    if not qc or qc.get("quant_method") != "compressed-tensors":
        return None
    kinds = {
        _input_kind(g.get("input_activations"))
        for g in (qc.get("config_groups") or {}).values()
        if isinstance(g, dict)
    }
    return kinds.pop() if len(kinds) == 1 else None


def _input_kind(args: dict | None) -> str | None:
    if not isinstance(args, dict) or args.get("num_bits") != 4 or args.get("type") != "float":
        return None
    shape = (args.get("strategy"), args.get("group_size"))
    return {("tensor_group", 16): "nvfp4", ("group", 32): "mxfp4"}.get(shape)


def _scale(layout, module: str) -> float:
    name = f"{module}.{INPUT_SCALE}"
    if name not in layout.ckpt.tensors:
        raise KeyError(module)
    return float(layout.ckpt.read(name).float().reshape(-1)[0])


def nvfp4_module_types(layout, fusion: Mapping[str, str]) -> dict[str, object]:
    """Canonical name -> the NVFP4Inputs type of its g_x (an expert stack: a tuple, one per
    expert, each the max over the expert's gate and up); fusion groups take their members' max.
    A quantized module without input_global_scale is missing from the result."""
    out: dict[str, object] = {}
    for name, src in layout.sources.items():
        if not src.scheme.quantized:
            continue
        try:
            if src.experts:
                out[name] = tuple(
                    max(_scale(layout, leaf.module) for leaf in leaves) for leaves in src.experts
                )
            elif src.module is not None:
                out[name] = _scale(layout, src.module)
        except KeyError:
            continue
    group_max: dict[str, float] = {}
    for name, g in out.items():
        if name in fusion and not isinstance(g, tuple):
            group_max[fusion[name]] = max(group_max.get(fusion[name], g), g)
    types = {}
    for name, g in out.items():
        if isinstance(g, tuple):
            types[name] = tuple(nvfp4_inputs_type(v) for v in g)
        else:
            types[name] = nvfp4_inputs_type(group_max.get(fusion.get(name), g))
    return types


def for_candidate(serving: Serving, source, qc: dict | None, fusion: Mapping[str, str]) -> Serving:
    """The serving with the candidate's declared input quantization added, where it honours one."""
    kind = declared_inputs(qc)
    if kind is None or not serving.declared_inputs:
        return serving
    if kind == "nvfp4":
        types = nvfp4_module_types(source.layout, fusion)
        what = "; NVFP4 W4A4: each Linear and expert quantizes its input to NVFP4 with its input_global_scale"
    else:
        types = {n: MXFP4Inputs for n, s in source.layout.sources.items() if s.scheme.quantized}
        what = "; MXFP4 inputs: each Linear and expert quantizes its input to MXFP4 (EVEN rule)"
    return replace(serving, module_inputs=types, what=serving.what + what)
