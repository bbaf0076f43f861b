"""Bugs injected into a copy of a checkpoint, as real converters have made them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _edit(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(f)
    fn(tensors, json.loads((dst / "config.json").read_text()))
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


def _prefix(tensors: dict) -> str:
    return "model.language_model." if any(k.startswith("model.language_model.") for k in tensors) else "model."


def ffn_norm_replaced_by_ones(src: Path, dst: Path, layer: int) -> Path:
    """The pre-FFN RMSNorm of `layer` dropped (a weight of ones)."""
    def fn(t, cfg):
        p = _prefix(t) + f"layers.{layer}."
        name = p + ("pre_feedforward_layernorm.weight" if p + "pre_feedforward_layernorm.weight" in t
                    else "post_attention_layernorm.weight")
        t[name] = torch.ones_like(t[name])
    return _edit(src, dst, fn)


def qk_left_permuted(src: Path, dst: Path, layer: int) -> Path:
    """Llama q_proj of `layer` left in llama.cpp's interleaved RoPE row order (gemma4.md §8)."""
    def fn(t, cfg):
        name = _prefix(t) + f"layers.{layer}.self_attn.q_proj.weight"
        w = t[name]
        n = cfg["num_attention_heads"]
        t[name] = w.reshape(n, 2, w.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(w.shape).contiguous()
    return _edit(src, dst, fn)


def global_scale_inverted(src: Path, dst: Path, layer: int, module: str = "self_attn.o_proj") -> Path:
    """An NVFP4 weight_global_scale g of `layer` stored as 1/g."""
    def fn(t, cfg):
        name = _prefix(t) + f"layers.{layer}.{module}.weight_global_scale"
        t[name] = 1.0 / t[name]
    return _edit(src, dst, fn)


def left_at_ones(src: Path, dst: Path, layer: int, tensor: str) -> Path:
    """A multiplier of `layer` (layer_scalar, router.scale, router.per_expert_scale) left at its
    default of ones."""
    def fn(t, cfg):
        name = _prefix(t) + f"layers.{layer}.{tensor}"
        t[name] = torch.ones_like(t[name])
    return _edit(src, dst, fn)


def layer_scalar_left_at_one(src: Path, dst: Path, layer: int) -> Path:
    """Gemma-4 layer_scalar of `layer` left at its default 1.0."""
    return left_at_ones(src, dst, layer, "layer_scalar")


def full_head_dim_from_sliding(src: Path, dst: Path) -> Path:
    """Gemma-4 config whose full-attention layers take head_dim from the sliding layers."""
    shutil.copytree(src, dst)
    path = dst / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config") or cfg
    text["global_head_dim"] = text["head_dim"]
    path.write_text(json.dumps(cfg, indent=2))
    return dst


def config_edited(src: Path, dst: Path, edit) -> Path:
    """A copy of `src` whose config.json (its text_config where there is one) `edit(cfg)` changes."""
    shutil.copytree(src, dst)
    path = dst / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg.get("text_config") or cfg)
    path.write_text(json.dumps(cfg, indent=2))
    return dst


def tokenizer_edited(src: Path, dst: Path, tokenizer=None, tokenizer_config=None) -> Path:
    """A copy of `src` whose tokenizer.json / tokenizer_config.json the given functions change."""
    shutil.copytree(src, dst)
    for name, edit in (("tokenizer.json", tokenizer), ("tokenizer_config.json", tokenizer_config)):
        if edit is not None:
            path = dst / name
            data = json.loads(path.read_text(encoding="utf-8"))
            edit(data)
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return dst


def token_strings_swapped(src: Path, dst: Path, a: int, b: int) -> Path:
    """tokenizer.json with the strings of ids `a` and `b` exchanged."""
    def edit(tok):
        vocab = tok["model"]["vocab"]
        by_id = {i: t for t, i in vocab.items()}
        vocab[by_id[a]], vocab[by_id[b]] = b, a
    return tokenizer_edited(src, dst, tokenizer=edit)
