"""GGUF rows decoded by torch, on the device that uses them: the float types and Q8_0, the types
release oracles are made in. Their values equal gguf-py's dequantization bit for bit (a cast, or
an f16 scale times an int8 code, exact in float32), and a GPU decodes an 8B model's 16 GB of F16
in a fraction of the time numpy takes on the host. Other types fall back to gguf-py.
"""

from __future__ import annotations

import torch

Q8_0_BLOCK, Q8_0_BYTES = 32, 34  # f16 scale d, then 32 int8 codes: x = d · q


def _float_rows(dtype: torch.dtype):
    return lambda raw, ne0: raw.view(dtype).float().reshape(raw.shape[0], ne0)


def _q8_0_blocks(raw: torch.Tensor, ne0: int) -> torch.Tensor:
    return raw.reshape(raw.shape[0], ne0 // Q8_0_BLOCK, Q8_0_BYTES)  # explicit: zero rows are allowed


def _q8_0_rows(raw: torch.Tensor, ne0: int) -> torch.Tensor:
    blocks = _q8_0_blocks(raw, ne0)
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(raw.shape[0], ne0)


def _q8_0_step(raw: torch.Tensor, ne0: int) -> torch.Tensor:
    blocks = _q8_0_blocks(raw, ne0)
    d = blocks[..., :2].contiguous().view(torch.float16).float().abs()
    return d.expand(-1, -1, Q8_0_BLOCK).reshape(raw.shape[0], ne0)


# ggml type name -> (uint8 rows [n, row_bytes], ne0) -> float32 values [n, ne0]
DECODERS = {
    "F32": _float_rows(torch.float32),
    "F16": _float_rows(torch.float16),
    "BF16": _float_rows(torch.bfloat16),
    "Q8_0": _q8_0_rows,
}
# ggml type name -> the grid step of every element (what dequantizing all-1 minus all-0 codes gives)
STEPS = {"Q8_0": _q8_0_step}


def decode_rows(raw: torch.Tensor, type_name: str, ne0: int) -> torch.Tensor:
    return DECODERS[type_name](raw, ne0)


def step_rows(raw: torch.Tensor, type_name: str, ne0: int) -> torch.Tensor:
    return STEPS[type_name](raw, ne0)
