"""ggml-cpu's arithmetic inside nvq's fp32 reference forward, so that llama.cpp can be compared
with it op for op instead of through quantization-sized noise.

Two roundings separate llama.cpp's CPU backend from exact fp32 math (oracle.md §3, gemma4.md §5.3):

* a mat-mul with NVFP4 (or Q4_0/Q5_0/Q8_0/MXFP4) weights first quantizes its activations to Q8_0
  (``quantize_row_q8_0``): per 32-element block, d = amax/127 stored as fp16, q = round-half-even
  (x·127/amax). That alone moves every such mat-mul by 0.6–3 % (rel-L2);
* GELU and GEGLU read an fp16 lookup table (``GGML_GELU_FP16``): gelu(fp16(z)) rounded to fp16
  for −10 < z < 10, 0 below, z above.

:func:`ggml_cpu_arithmetic` applies both to ``torch.nn.functional.linear`` / ``gelu``, which nvq's
forwards call; the mat-muls it rounds are those whose weight shares storage with one of the given
tensors (the checkpoint's quantized weights, expert slices included).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

Q8_0_BLOCK = 32
GELU_TABLE_RANGE = 10.0  # ggml_vec_gelu_f32: |z| ≥ 10 bypasses the table


def q8_0_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x as ggml-cpu's Q8_0 activation blocks hold it (quantize_row_q8_0, then q·fp16(d))."""
    blocks = x.float().reshape(*x.shape[:-1], -1, Q8_0_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = (amax / 127).half().float()
    inv = torch.where(amax != 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * d).reshape(x.shape).to(x.dtype)


def gelu_fp16_table(z: torch.Tensor, exact_gelu=F.gelu) -> torch.Tensor:
    """ggml_vec_gelu_f32 with GGML_GELU_FP16: the tanh GELU of fp16(z), rounded to fp16."""
    table = exact_gelu(z.half().float(), approximate="tanh").half().to(z.dtype)
    return torch.where(
        z <= -GELU_TABLE_RANGE, torch.zeros_like(z), torch.where(z >= GELU_TABLE_RANGE, z, table)
    )


@contextmanager
def ggml_cpu_arithmetic(quantized_weights: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, F.linear rounds its input to Q8_0 when the weight is (a view of) one of
    `quantized_weights`, and F.gelu(approximate="tanh") uses ggml's fp16 table."""
    storages = {w.untyped_storage().data_ptr() for w in quantized_weights}
    exact_linear, exact_gelu = F.linear, F.gelu

    def linear(x, weight, bias=None):
        if weight.untyped_storage().data_ptr() in storages:
            x = q8_0_roundtrip(x)
        return exact_linear(x, weight, bias)

    def gelu(z, approximate="none"):
        if approximate != "tanh":  # ggml's table is the tanh approximation only
            return exact_gelu(z, approximate=approximate)
        return gelu_fp16_table(z, exact_gelu)

    F.linear, F.gelu = linear, gelu
    try:
        yield
    finally:
        F.linear, F.gelu = exact_linear, exact_gelu
