"""GGUF block byte layouts for MXFP4 (ggml type 39) and NVFP4 (type 40), formats.md §2c, §3.4.

Only byte placement lives here; the codes and scales come from `nvq.formats`. Rows map to
GGUF rows (ne0 = K innermost), so a [N, K] weight becomes a uint8 [N, K/32·17] or
[N, K/64·36] array, which is what gguf-py's writer takes with raw_dtype=MXFP4 / NVFP4.

* MXFP4, 32 elements in 17 bytes: [e8m0][qs 16 bytes], qs[j] = code(j) | code(j+16) << 4.
* NVFP4, 64 elements in 36 bytes: [4 x UE4M3, one per 16-element sub-block][qs 32 bytes],
  qs[8s+j] = code(16s+j) | code(16s+8+j) << 4. There is no tensor scale inside the block:
  llama.cpp stores the multiplier as a separate F32 tensor `<name>.scale`.
"""

import numpy as np
import torch
from torch import Tensor

from nvq.formats.constants import (
    GGUF_MXFP4_BLOCK,
    GGUF_MXFP4_HALF_BLOCK,
    GGUF_NVFP4_BLOCK,
    GGUF_NVFP4_HALF_SUB_BLOCK,
    GGUF_NVFP4_SUB_BLOCKS,
    NIBBLE_MASK,
    NIBBLE_SHIFT,
    UE4M3_SIGN_MASK,
)
from nvq.formats.mxfp4 import MXFP4Quantized
from nvq.formats.nvfp4 import NVFP4Quantized, global_scale_from_scale_2, weight_scale_2
from nvq.formats.scales import fp8_e4m3_bits

__all__ = ["mxfp4_to_blocks", "mxfp4_from_blocks", "nvfp4_to_blocks", "nvfp4_from_blocks"]

_MXFP4_ELEMENTS, _MXFP4_BYTES = GGUF_MXFP4_BLOCK
_NVFP4_ELEMENTS, _NVFP4_BYTES = GGUF_NVFP4_BLOCK


def _split_halves(codes: Tensor, half: int) -> Tensor:
    """[..., 2·half] codes -> [..., half] bytes: element j low nibble, element j+half high."""
    pairs = codes.unflatten(-1, (2, half))
    return pairs[..., 0, :] | (pairs[..., 1, :] << NIBBLE_SHIFT)


def _join_halves(qs: Tensor) -> Tensor:
    """Inverse of `_split_halves`: [..., half] bytes -> [..., 2·half] codes."""
    return torch.cat([qs & NIBBLE_MASK, qs >> NIBBLE_SHIFT], dim=-1)


def _require_multiple(n_cols: int, block: int, fmt: str) -> None:
    if n_cols % block:
        raise ValueError(f"GGUF {fmt} needs K % {block} == 0, got K={n_cols}")


def _as_block_rows(blocks: np.ndarray, n_cols: int, elements: int, size: int, fmt: str) -> Tensor:
    """uint8 [N, K/elements·size] -> tensor [N, K/elements, size], with shape checks."""
    _require_multiple(n_cols, elements, fmt)
    array = np.asarray(blocks)
    row_bytes = n_cols // elements * size
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != row_bytes:
        raise ValueError(
            f"GGUF {fmt} blocks for K={n_cols} must be uint8 [N, {row_bytes}], "
            f"got {array.dtype} {array.shape}"
        )
    rows = torch.from_numpy(np.ascontiguousarray(array))
    return rows.reshape(array.shape[0], n_cols // elements, size)


def mxfp4_to_blocks(q: MXFP4Quantized) -> np.ndarray:
    """MXFP4 codes + E8M0 scales -> GGUF MXFP4 blocks, uint8 [N, K/32·17]."""
    n_rows, n_cols = q.codes.shape
    _require_multiple(n_cols, _MXFP4_ELEMENTS, "MXFP4")
    codes = q.codes.reshape(n_rows, n_cols // _MXFP4_ELEMENTS, _MXFP4_ELEMENTS)
    qs = _split_halves(codes, GGUF_MXFP4_HALF_BLOCK)
    blocks = torch.cat([q.scale.unsqueeze(-1), qs], dim=-1)
    return blocks.reshape(n_rows, n_cols // _MXFP4_ELEMENTS * _MXFP4_BYTES).cpu().numpy()


def mxfp4_from_blocks(blocks: np.ndarray, n_cols: int) -> MXFP4Quantized:
    """GGUF MXFP4 blocks uint8 [N, K/32·17] -> MXFP4Quantized with K = n_cols."""
    rows = _as_block_rows(blocks, n_cols, _MXFP4_ELEMENTS, _MXFP4_BYTES, "MXFP4")
    codes = _join_halves(rows[..., 1:]).reshape(rows.shape[0], n_cols)
    return MXFP4Quantized(codes=codes, scale=rows[..., 0].clone())


def nvfp4_to_blocks(q: NVFP4Quantized) -> tuple[np.ndarray, float]:
    """NVFP4 -> (GGUF NVFP4 blocks uint8 [N, K/64·36], the `<name>.scale` multiplier).

    The sub-block scales are the E4M3 bits with the sign bit cleared (UE4M3); the multiplier
    is `nvfp4.weight_scale_2(q)`, i.e. fp32(1/g) for compressed-tensors data (§3.4).
    """
    n_rows, n_cols = q.codes.shape
    _require_multiple(n_cols, _NVFP4_ELEMENTS, "NVFP4")
    n_super = n_cols // _NVFP4_ELEMENTS
    sub_block = 2 * GGUF_NVFP4_HALF_SUB_BLOCK
    codes = q.codes.reshape(n_rows, n_super, GGUF_NVFP4_SUB_BLOCKS, sub_block)
    qs = _split_halves(codes, GGUF_NVFP4_HALF_SUB_BLOCK)
    qs = qs.reshape(n_rows, n_super, GGUF_NVFP4_SUB_BLOCKS * GGUF_NVFP4_HALF_SUB_BLOCK)
    ue4m3 = fp8_e4m3_bits(q.block_scale) & UE4M3_SIGN_MASK
    scales = ue4m3.reshape(n_rows, n_super, GGUF_NVFP4_SUB_BLOCKS)
    blocks = torch.cat([scales, qs], dim=-1).reshape(n_rows, n_super * _NVFP4_BYTES)
    return blocks.cpu().numpy(), float(weight_scale_2(q))


def nvfp4_from_blocks(blocks: np.ndarray, n_cols: int, scale: float) -> NVFP4Quantized:
    """GGUF NVFP4 blocks + the `<name>.scale` multiplier -> NVFP4Quantized with K = n_cols.

    GGUF keeps a multiplier, so the result carries it exactly as `weight_scale_2` (ModelOpt
    convention) and `global_scale` = fp32(1/scale). UE4M3 bytes become E4M3 bytes unchanged.
    """
    rows = _as_block_rows(blocks, n_cols, _NVFP4_ELEMENTS, _NVFP4_BYTES, "NVFP4")
    n_rows, n_super = rows.shape[:2]
    scale_bytes = rows[..., :GGUF_NVFP4_SUB_BLOCKS].reshape(n_rows, n_super * GGUF_NVFP4_SUB_BLOCKS)
    qs = rows[..., GGUF_NVFP4_SUB_BLOCKS:].unflatten(
        -1, (GGUF_NVFP4_SUB_BLOCKS, GGUF_NVFP4_HALF_SUB_BLOCK)
    )
    codes = _join_halves(qs).reshape(n_rows, n_cols)
    scale_2 = torch.tensor(scale, dtype=torch.float32)
    return NVFP4Quantized(
        codes=codes,
        block_scale=scale_bytes.clone().view(torch.float8_e4m3fn),
        global_scale=global_scale_from_scale_2(scale_2),
        weight_scale_2=scale_2,
    )
