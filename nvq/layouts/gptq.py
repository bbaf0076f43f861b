"""GPTQ v1 container (formats.md §4.1, §4.2): int4 codes packed eight to an int32 along K
(`qweight` [K/8, N]), zero points packed along N minus one (`qzeros` [K/G, N/8]), fp16 `scales`
[K/G, N] and `g_idx` [K]; plus the `quantization_config` vLLM and transformers read.

nvq writes symmetric, act-order-free (static groups) checkpoints only: `g_idx[k] = k // G`, every
stored zero nibble is 7, and `desc_act` is false, the one form current vLLM accepts (§4.4).
Reading is general: asymmetric zeros, v2 zero semantics and non-trivial `g_idx` decode too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvq.formats.constants import GPTQ_PACK, GPTQ_V1_ZERO_OFFSET, INT4_SYM_ZERO
from nvq.formats.int4 import Int4Quantized
from nvq.io.safetensors import OutputTensor

NIBBLE_BITS = 4
_SHIFTS = torch.arange(GPTQ_PACK, dtype=torch.int64) * NIBBLE_BITS  # nibble i at bits 4i..4i+3
_WORD = 1 << 32
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# checkpoint_format → what a stored zero nibble means (§4.1)
ZERO_OFFSET = {"gptq": GPTQ_V1_ZERO_OFFSET, "gptq_v2": 0}


@dataclass(frozen=True)
class GPTQLayout:
    group_size: int
    sym: bool = True

    def output_tensors(self, module: str, shape: tuple[int, int]) -> list[OutputTensor]:
        n, k = shape
        groups = k // self.group_size
        return [
            OutputTensor(f"{module}.qweight", "I32", (k // GPTQ_PACK, n)),
            OutputTensor(f"{module}.qzeros", "I32", (groups, n // GPTQ_PACK)),
            OutputTensor(f"{module}.scales", "F16", (groups, n)),
            OutputTensor(f"{module}.g_idx", "I32", (k,)),
        ]

    def shape_problem(self, shape: tuple[int, int]) -> str | None:
        return check_shape(shape, self.group_size)


def check_shape(shape: tuple[int, int], group_size: int) -> str | None:
    """Why a [N, K] weight cannot be stored as GPTQ with this group size, or None."""
    n, k = shape
    if k % group_size:
        return f"input dimension {k} is not a multiple of the group size {group_size}"
    if n % GPTQ_PACK or k % GPTQ_PACK:
        return f"shape [{n}, {k}] does not pack {GPTQ_PACK} codes per int32 word along both dimensions"
    return None


def _pack_words(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 → [...] int32, nibble i in bits 4i..4i+3 (two's complement)."""
    words = (nibbles.to(torch.int64) << _SHIFTS.to(nibbles.device)).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - _WORD, words).to(torch.int32)


def _unpack_words(words: torch.Tensor) -> torch.Tensor:
    """[...] int32 → [..., 8] values 0..15."""
    w = words.to(torch.int64) & (_WORD - 1)
    return (w[..., None] >> _SHIFTS.to(words.device)) & 0xF


def pack(q: Int4Quantized) -> dict[str, torch.Tensor]:
    """An int4 weight [N, K] as GPTQ v1 tensors (by suffix)."""
    n, k = q.shape
    reason = check_shape((n, k), q.group_size)
    if reason:
        raise ValueError(reason)
    codes_kn = q.codes.t().reshape(k // GPTQ_PACK, GPTQ_PACK, n).transpose(1, 2)  # [K/8, N, 8]
    stored_zero = q.zero.t().to(torch.int64) - GPTQ_V1_ZERO_OFFSET  # [K/G, N]
    if (stored_zero < 0).any():
        raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 (it stores z − 1)")
    groups = k // q.group_size
    return {
        "qweight": _pack_words(codes_kn),
        "qzeros": _pack_words(stored_zero.reshape(groups, n // GPTQ_PACK, GPTQ_PACK)),
        "scales": q.scale.t().contiguous().half(),
        "g_idx": (torch.arange(k, dtype=torch.int32) // q.group_size),
    }


def dequantize(tensors: dict[str, torch.Tensor], checkpoint_format: str = "gptq",
               sym: bool | None = None) -> torch.Tensor:
    """W [N, K] float32 = scales[g(k), n]·(q[k, n] − Z[g(k), n]) from GPTQ tensors by suffix.

    g(k) comes from `g_idx` when present (act-order checkpoints), else k // (K / groups).
    `sym=True` uses the implicit zero 8, as vLLM does, whatever qzeros holds.
    """
    qweight, scales = tensors["qweight"], tensors["scales"].float()
    k = qweight.shape[0] * GPTQ_PACK
    n = qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != n or k % groups:
        raise ValueError(f"scales {list(scales.shape)} do not fit qweight {list(qweight.shape)}")
    codes = _unpack_words(qweight).transpose(1, 2).reshape(k, n)  # [K, N]
    g_idx = tensors.get("g_idx")
    g = g_idx.long() if g_idx is not None else torch.arange(k) // (k // groups)
    if g.shape != (k,) or int(g.min()) < 0 or int(g.max()) >= groups:
        raise ValueError(f"g_idx must hold {k} group indices in [0, {groups})")
    if sym:
        zero = torch.full((groups, n), INT4_SYM_ZERO, dtype=torch.int64)
    else:
        zero = _unpack_words(tensors["qzeros"]).reshape(groups, -1)[:, :n] + ZERO_OFFSET[checkpoint_format]
    return (scales[g] * (codes - zero[g]).float()).t().contiguous()


def quantization_config(group_size: int, damp: float, act_order: bool, method: str) -> dict:
    """GPTQ v1 config that vLLM 0.33 and transformers (gptqmodel) accept (§4.2).

    `desc_act` stays false even with act-order: static groups keep `g_idx` trivial.
    """
    from nvq import __version__

    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "sym": True,
        "desc_act": False,
        "static_groups": act_order,
        "true_sequential": True,
        "damp_percent": damp,
        "lm_head": False,
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"nvq:{__version__}"], "method": method, "act_order": act_order},
    }
