"""Legitimate quantizations that are not byte-identical to nvq's: what other tools write.

Each variant re-quantizes the quantized modules of nvq's own output (same module list, same fusion
groups, same container) with another tool's arithmetic, so `nvq verify` must accept them as
clean (issue 10, item 5). Facts: spec/formats.md §0-§3.

* ``nvfp4-mse``: compressed-tensors NVFP4 whose per-16 block scale is searched: s·(1 - p) for p in
  MSE_SHRINK, keeping the one of least squared error (what MSE observers in llm-compressor and
  ModelOpt do).
* ``mxfp4-ocp-floor``: compressed-tensors MXFP4 with the OCP / ggml FLOOR rule for the shared
  exponent (formats.md §2d) instead of compressed-tensors' EVEN rule.
* ``nvfp4-bf16-input``: compressed-tensors NVFP4 of the weights first cast to bf16 (a tool that
  loads an fp32 checkpoint in bf16); only differs from nvq's for fp32 sources.
* ``nvfp4-modelopt``: ModelOpt's NVFP4 arithmetic (`nvq.formats.nvfp4.Profile.MODELOPT`) in
  ModelOpt's layout (``weight``, ``weight_scale``, ``weight_scale_2``; formats.md §3.1-§3.3).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nvq.formats import e2m1, mxfp4, nvfp4
from nvq.formats._blocks import split_blocks
from nvq.formats.constants import CT_ZERO_BLOCK_SCALE, E2M1_MAX, NVFP4_BLOCK
from nvq.formats.scales import ScaleRule, fp8_e4m3_encode
from nvq.io.hf import Checkpoint
from nvq.quant.pipeline import convert
from nvq.quant.policy import Unit, build_plan
from nvq.quant.recipe import load_recipe

__all__ = ["CLEAN_KINDS", "MSE_SHRINK", "VARIANTS", "Variant", "make_clean", "make_variant"]

MSE_SHRINK = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)  # block scale candidates s·(1 - p)

# One fusion group's source weights -> {tensor suffix: tensor} per member, in member order.
GroupQuantizer = Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Variant:
    scheme: str  # nvq scheme whose output supplies the module list and the config
    quantize_group: GroupQuantizer
    modelopt_layout: bool = False
    needs_fp32_source: bool = False


def _group_amax(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([nvfp4.tensor_amax(w) for w in weights]).amax()


def _ct_tensors(q: nvfp4.NVFP4Quantized) -> dict[str, torch.Tensor]:
    return {"weight_packed": e2m1.pack_pairs(q.codes), "weight_scale": q.block_scale,
            "weight_global_scale": q.global_scale.float().reshape(1)}


def _nvfp4_mse(w: torch.Tensor, g: torch.Tensor) -> nvfp4.NVFP4Quantized:
    """CT NVFP4 with global scale g, each block's FP8 scale the best of s·(1 - p), p in MSE_SHRINK."""
    blocks = split_blocks(w.float(), NVFP4_BLOCK)  # [N, B, 16]
    base = (g * (blocks.abs().amax(-1) / E2M1_MAX)).float()  # CT's unrounded scale, [N, B]
    shrink = torch.tensor(MSE_SHRINK).view(-1, 1, 1)
    scales = fp8_e4m3_encode(base.unsqueeze(0) * (1 - shrink)).float()  # [P, N, B]
    scales = torch.where(scales == 0, CT_ZERO_BLOCK_SCALE, scales)
    step = (scales / g).unsqueeze(-1)  # [P, N, B, 1]
    codes = e2m1.encode((blocks.unsqueeze(0) / step).clamp(-E2M1_MAX, E2M1_MAX), e2m1.Rounding.RNE)
    error = ((e2m1.decode(codes) * step - blocks.unsqueeze(0)) ** 2).sum(-1)  # [P, N, B]
    best = error.argmin(0)  # ties keep the smallest shrink, i.e. CT's own scale
    pick = best.unsqueeze(0)
    block_scale = fp8_e4m3_encode(scales.gather(0, pick)[0])
    chosen = codes.gather(0, pick.unsqueeze(-1).expand(1, *codes.shape[1:]))[0]
    return nvfp4.NVFP4Quantized(chosen.flatten(1), block_scale, g.float().reshape(1))


def _nvfp4_mse_group(weights):
    g = nvfp4.global_scale(_group_amax(weights), weights[0].dtype)
    return [_ct_tensors(_nvfp4_mse(w, g)) for w in weights]


def _nvfp4_bf16_group(weights):
    cast = [w.to(torch.bfloat16) for w in weights]
    g = nvfp4.global_scale(_group_amax(cast), torch.bfloat16)
    return [_ct_tensors(nvfp4.quantize(w, g)) for w in cast]


def _nvfp4_modelopt_group(weights):
    s2 = nvfp4.modelopt_scale_2(_group_amax(weights))  # fused members share one multiplier
    out = []
    for w in weights:
        q = nvfp4.quantize(w, profile=nvfp4.Profile.MODELOPT, weight_scale_2=s2)
        out.append({"weight": e2m1.pack_pairs(q.codes), "weight_scale": q.block_scale,
                    "weight_scale_2": q.weight_scale_2.float().reshape(())})
    return out


def _mxfp4_floor_group(weights):
    out = []
    for w in weights:
        q = mxfp4.quantize(w, ScaleRule.FLOOR, e2m1.Rounding.RNE)
        out.append({"weight_packed": e2m1.pack_pairs(q.codes), "weight_scale": q.scale})
    return out


VARIANTS = {
    "nvfp4-mse": Variant("nvfp4", _nvfp4_mse_group),
    "mxfp4-ocp-floor": Variant("mxfp4", _mxfp4_floor_group),
    "nvfp4-bf16-input": Variant("nvfp4", _nvfp4_bf16_group, needs_fp32_source=True),
    "nvfp4-modelopt": Variant("nvfp4", _nvfp4_modelopt_group, modelopt_layout=True),
}

_MODELOPT_CONFIG = {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4", "group_size": 16}


def _read_unit(ckpt: Checkpoint, u: Unit) -> torch.Tensor:
    first, last = u.rows if u.rows else (0, ckpt.tensors[u.source].num_rows)
    return ckpt.read_rows(u.source, first, last).reshape(u.shape)


def make_variant(src: str | Path, dst: str | Path, name: str) -> Path:
    """DST = the checkpoint SRC quantized by third-party variant `name` (a key of VARIANTS)."""
    variant = VARIANTS[name]
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint.open(src)
    dtypes = {i.dtype for i in ckpt.tensors.values()}
    if variant.needs_fp32_source and dtypes != {"F32"}:
        raise ValueError(f"variant {name} differs from nvq's output only for an fp32 source; {src} holds {dtypes}")
    convert(src, dst, variant.scheme, device="cpu")
    plan = build_plan(ckpt, variant.scheme, load_recipe(None))
    replaced: dict[str, torch.Tensor] = {}
    dropped: set[str] = set()
    for group in plan.groups():
        if not group[0].scheme:
            continue
        for u, tensors in zip(group, variant.quantize_group([_read_unit(ckpt, u) for u in group]), strict=True):
            replaced.update({f"{u.out}.{suffix}": t.clone().contiguous() for suffix, t in tensors.items()})
            dropped.update(f"{u.out}.{s}" for s in ("weight_packed", "weight_global_scale"))
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        names = set(tensors)
        kept = {n: t for n, t in tensors.items() if n not in dropped or n in replaced}
        kept.update({n: t for n, t in replaced.items() if n in names or n.rsplit(".", 1)[0] + ".weight_scale" in names})
        save_file(kept, f, metadata={"format": "pt"})
    if variant.modelopt_layout:
        path = dst / "config.json"
        cfg = json.loads(path.read_text())
        cfg["quantization_config"] = {**_MODELOPT_CONFIG, "ignore": cfg["quantization_config"]["ignore"]}
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def _nvq(scheme: str, **settings) -> Callable[[Path, Path], Path]:
    def make(src: Path, dst: Path) -> Path:
        convert(src, dst, scheme, device="cpu", **settings)
        return dst
    return make


def _gptq_rtn(src: Path, dst: Path) -> Path:
    from nvq.quant.gptq_write import GPTQSettings

    return _nvq("gptq", gptq=GPTQSettings(method="rtn"))(src, dst)


# Every clean candidate kind: nvq's own outputs, then the third-party variants.
CLEAN_KINDS: dict[str, Callable[[Path, Path], Path]] = {
    "nvq-nvfp4": _nvq("nvfp4"),
    "nvq-mxfp4": _nvq("mxfp4"),
    "nvq-gptq-rtn": _gptq_rtn,
    **{name: (lambda src, dst, name=name: make_variant(src, dst, name)) for name in VARIANTS},
}


def make_clean(src: str | Path, dst: str | Path, kind: str) -> Path:
    """DST = SRC quantized as clean candidate `kind` (a key of CLEAN_KINDS)."""
    return CLEAN_KINDS[kind](Path(src), Path(dst))
