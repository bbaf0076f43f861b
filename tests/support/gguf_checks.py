"""Checks of a GGUF that llama.cpp's converter made from one of nvq's NVFP4 outputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from nvq.formats import e2m1, nvfp4
from nvq.io.hf import Checkpoint
from nvq.quant.policy import build_plan
from nvq.quant.recipe import load_recipe
from tests.support.llamacpp import read_gguf


def nvq_dequant(tensors: dict, module: str) -> np.ndarray:
    q = nvfp4.NVFP4Quantized(
        e2m1.unpack_pairs(tensors[f"{module}.weight_packed"]),
        tensors[f"{module}.weight_scale"],
        tensors[f"{module}.weight_global_scale"],
    )
    return nvfp4.dequantize(q, torch.float32).numpy()


def unpermute_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    # gemma4.md §8: the converter interleaves each head's rotate-half pairs; this is the inverse
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def check_gguf_against_nvq(src: Path, nvq_out: Path, gguf_path: Path) -> int:
    """Every quantized weight of nvq's output is NVFP4 in the GGUF and gguf-py's dequantization
    times its `.scale` equals nvq's; every dense tensor passes through unchanged. Returns the
    number of quantized weights checked."""
    meta, gg, types = read_gguf(gguf_path)[:3]
    ours = load_file(nvq_out / "model.safetensors")
    plan = build_plan(Checkpoint.open(src), "nvfp4", load_recipe(None))
    cfg = plan.arch.config
    per_expert = {u.canonical: ours[u.source].float().numpy() for u in plan.kept
                  if u.canonical and u.canonical.endswith("ffn_down_exps.scale")}
    for u in plan.quantized:
        m = re.fullmatch(r"(?P<stem>.+)\.weight(\[(?P<e>\d+)\])?", u.canonical)
        stem, expert = m["stem"], m["e"]
        assert types[f"{stem}.weight"] == "NVFP4", f"{stem} was not kept as NVFP4 by the converter"
        w = gg[f"{stem}.weight"]
        scale = gg[f"{stem}.scale"].reshape(-1)
        expected = nvq_dequant(ours, u.out)
        if expert is not None:
            e = int(expert)
            w, scale = w[e], scale[e : e + 1]
            if f"{stem}.scale" in per_expert:  # Gemma-4 only; Qwen3-MoE has no per-expert scale
                # llama.cpp folds Gemma-4's per_expert_scale into each expert's down-proj scale
                expected = expected * per_expert[f"{stem}.scale"][e]
        got = w * scale[0]
        llama_gguf = plan.arch.gguf_arch == "llama"  # Mistral too
        if llama_gguf and stem.split(".")[-1] in ("attn_q", "attn_k"):
            got = unpermute_llama(got, cfg.num_heads if stem.endswith("attn_q") else cfg.num_kv_heads)
        # gguf multiplies by 1/g (rounded once in fp32) where nvq divides by g: at most 2 ulp apart
        np.testing.assert_allclose(got, expected, rtol=2.4e-7, atol=0, err_msg=u.canonical)
    for u in plan.kept:  # dense tensors pass through unchanged (norms, embeddings, router, scalars)
        if u.canonical in gg and not u.canonical.endswith("ffn_down_exps.scale"):
            np.testing.assert_array_equal(gg[u.canonical].reshape(u.shape), ours[u.out].float().numpy())
    return len(plan.quantized)
