"""GPTQ checkpoints as GPTQModel writes them, written from formats.md §4 with no nvq code, so that
nvq's reader is tested against the spec and not against its own writer.

Round-to-nearest stands in for the GPTQ solver (no calibration): act-order still permutes the
columns (§4.3 step 4), groups are runs of G *permuted* columns, and g_idx[perm[j]] = j // G
(step 8); packing follows step 9 and §4.1 (v1 zeros stored as z − 1 by a word-wise subtraction
of 0x11111111, as GPTQModel does; v2 stores z). Without a Hessian, each column's own
squared norm stands in for diag H.

`with_salient_channels` makes a dense source whose input channels differ in size, as real models'
do: there act-order groups channels of like size, and reading a channel in the wrong group shows.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MAXQ = 15
V1_WORD_OFFSET = 0x11111111
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fit_group(x: np.ndarray, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """§4.3 step 7 (AutoGPTQ `find_params`) per row of x [N, G]: fp32 scale and integer zero."""
    xmin = np.minimum(x.min(axis=1), 0).astype(np.float32)
    xmax = np.maximum(x.max(axis=1), 0).astype(np.float32)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(dead, -1, xmin), np.where(dead, 1, xmax)
    scale = ((xmax - xmin) / MAXQ).astype(np.float32)
    zero = np.full_like(scale, (MAXQ + 1) // 2) if sym else np.round(-xmin / scale)
    return scale, zero.astype(np.float32)


def pack_along_rows(v: np.ndarray) -> np.ndarray:
    """[R, C] values 0..15 → [R/8, C] int32: nibble i of word (r, c) = v[8r + i, c] (qweight)."""
    v = v.astype(np.uint64)
    words = sum(v[i::8] << np.uint64(4 * i) for i in range(8))
    return words.astype(np.uint32).view(np.int32)


def quantize_module(w: np.ndarray, group_size: int, sym: bool, desc_act: bool, fmt: str) -> dict[str, np.ndarray]:
    """One Linear weight [N, K] → qweight, qzeros, scales, g_idx (by suffix)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    # step 4 sorts by diag H = Σ x_k²; without calibration, each column's own Σ w² stands in
    salience = (w.astype(np.float64) ** 2).sum(axis=0)
    perm = np.argsort(-salience, kind="stable") if desc_act else np.arange(k)
    wp = w[:, perm].astype(np.float32)
    codes_p = np.empty((n, k), dtype=np.int64)
    scales = np.empty((k // g, n), dtype=np.float32)
    zeros = np.empty((k // g, n), dtype=np.int64)
    for j in range(k // g):
        x = wp[:, j * g:(j + 1) * g]
        s, z = fit_group(x, sym)
        q = np.clip(np.round(x / s[:, None]) + z[:, None], 0, MAXQ)
        wq = s[:, None] * (q - z[:, None])  # the fake-quantized weight the solver leaves
        # step 9: the packer recomputes the integers from Wq with the fp32 scales
        codes_p[:, j * g:(j + 1) * g] = np.clip(np.round((wq + z[:, None] * s[:, None]) / s[:, None]), 0, MAXQ)
        scales[j], zeros[j] = s, z
    codes = np.empty_like(codes_p)
    codes[:, perm] = codes_p  # back to the checkpoint's column order
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[perm] = np.arange(k) // g  # step 8
    qzeros = pack_along_rows(zeros.T).T.copy()  # packed along N: [K/G, N/8]
    if fmt == "gptq":  # v1: GPTQModel subtracts 0x11111111 from every word (borrows included)
        qzeros = (qzeros.view(np.uint32) - np.uint32(V1_WORD_OFFSET)).view(np.int32)
    return {"qweight": pack_along_rows(codes.T), "qzeros": qzeros, "scales": scales.astype(np.float16),
            "g_idx": g_idx}


def decode_spec(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray,
                fmt: str = "gptq") -> np.ndarray:
    """§4.1 read per nibble, as llama.cpp's converter does: nibble i of qweight word (r, n) is
    q[8r+i, n]; nibble i of qzeros word (g, c) is the stored zero of (g, 8c+i), z = stored + 1 in
    v1 and stored in v2; W[k, n] = scales[g_idx[k], n]·(q − z[g_idx[k], n]). Returns [N, K]."""
    words = qweight.astype(np.int64) & 0xFFFFFFFF
    k8, n = words.shape
    q = np.zeros((k8 * 8, n), dtype=np.int64)
    for i in range(8):
        q[i::8, :] = (words >> (4 * i)) & 0xF
    zw = qzeros.astype(np.int64) & 0xFFFFFFFF
    groups, n8 = zw.shape
    z = np.zeros((groups, n8 * 8), dtype=np.int64)
    for i in range(8):
        z[:, i::8] = ((zw >> (4 * i)) & 0xF) + (1 if fmt == "gptq" else 0)
    s = scales.astype(np.float32)
    return (s[g_idx] * (q - z[g_idx]).astype(np.float32)).T


def write_gptq(src: Path, dst: Path, group_size: int = 32, sym: bool = True, desc_act: bool = True,
               fmt: str = "gptq", model_dtype: str | None = None) -> Path:
    """Every decoder Linear of the dense checkpoint `src` as GPTQ int4 in `dst` (other tensors and
    side files copied); `model_dtype` overrides config.json's dtype."""
    shutil.copytree(src, dst)
    out = {}
    for name, t in load_file(dst / "model.safetensors").items():
        stem = name.removesuffix(".weight")
        if name.endswith(".weight") and stem.endswith(LINEAR_SUFFIXES):
            parts = quantize_module(t.float().numpy(), group_size, sym, desc_act, fmt)
            out |= {f"{stem}.{p}": torch.from_numpy(np.ascontiguousarray(v)) for p, v in parts.items()}
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": sym, "desc_act": desc_act,
        "static_groups": False, "true_sequential": True, "damp_percent": 0.05, "lm_head": False,
        "format": fmt, "checkpoint_format": fmt, "pack_dtype": "int32",
    }  # fmt: skip
    if model_dtype:
        cfg["dtype"] = model_dtype
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def with_salient_channels(src: Path, dst: Path, seed: int = 0, octaves: float = 2.0) -> Path:
    """A copy of a dense checkpoint whose decoder Linears have every input channel (column)
    multiplied by 2^u, u uniform in [−octaves, octaves)."""
    gen = torch.Generator().manual_seed(seed)
    edits = {}
    for name in sorted(load_file(src / "model.safetensors")):
        if name.endswith(".weight") and name.removesuffix(".weight").endswith(LINEAR_SUFFIXES):
            edits[name] = lambda w: w * 2.0 ** ((torch.rand(w.shape[1], generator=gen) * 2 - 1) * octaves)
    return edit_tensors(src, dst, edits)


def edit_tensors(ckpt: Path, dst: Path, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Path:
    """A copy of a checkpoint with some tensors rewritten (name → function of the old tensor)."""
    shutil.copytree(ckpt, dst)
    tensors = load_file(dst / "model.safetensors")
    for name, fn in edits.items():
        tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
