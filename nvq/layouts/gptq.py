"""GPTQ v1 container (formats.md §4.1, §4.2): int4 codes packed eight to an int32 along K
(`qweight` [K/8, N]), zero points packed along N minus one (`qzeros` [K/G, N/8]), fp16 `scales`
[K/G, N] and `g_idx` [K]; plus the `quantization_config` vLLM and transformers read.

nvq writes symmetric, act-order-free (static groups) checkpoints only: `g_idx[k] = k // G`, every
stored zero nibble is 7, and `desc_act` is false, the one form current vLLM accepts (§4.4).
Reading is general and follows GPTQModel and llama.cpp's converter: W[k, n] =
scales[g_idx[k], n]·(q[k, n] − Z[g_idx[k], n]) with Z read from qzeros (v1 stored + 1, v2 stored),
symmetric or not, any g_idx (act-order) and any group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvq.formats.constants import GPTQ_PACK, GPTQ_V1_ZERO_OFFSET
from nvq.formats.int4 import Int4Quantized, check_g_idx
from nvq.io.safetensors import OutputTensor

NIBBLE_BITS = 4
_SHIFTS = torch.arange(GPTQ_PACK, dtype=torch.int64) * NIBBLE_BITS  # nibble i at bits 4i..4i+3
_WORD = 1 << 32
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# checkpoint_format → what a stored zero nibble means (§4.1)
ZERO_OFFSET = {"gptq": GPTQ_V1_ZERO_OFFSET, "gptq_v2": 0}
# checkpoint_format → the qzeros word that stores the symmetric zero 8 in every nibble (§4.1)
IMPLICIT_SYM_WORD = {"gptq": 0x77777777, "gptq_v2": 0x88888888}
_V1_OVERFLOW_NIBBLE = 0xF  # v1 stores z − 1: a zero point of 0 wraps to 15 with a borrow (§4.1)
_V1_WORD_OFFSET = 0x11111111  # GPTQModel reads v1 by adding this to each qzeros word (carries)


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
        "g_idx": (trivial_group_index(k, groups) if q.g_idx is None else q.g_idx).to(torch.int32),
    }


@dataclass(frozen=True, eq=False)
class GPTQModule:
    """One GPTQ Linear unpacked as GPTQModel and llama.cpp's converter read it (§4.1).

    codes [K, N] and zero [groups, N] are int64 (zero is Z, the stored value plus the format's
    offset); scales [groups, N] as stored; g_idx [K] int64 as stored, or k // G when absent.
    """

    codes: torch.Tensor
    zero: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    # v1 qzeros holding a nibble 15 (a zero point 0, which v1 cannot store): GPTQModel's reading,
    # a word-wise add that carries into the next nibble, where llama.cpp's adds 1 per nibble
    gptqmodel_zero: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    @property
    def group_size(self) -> int:
        return self.codes.shape[0] // self.groups

    def trivial_g_idx(self) -> torch.Tensor:
        return trivial_group_index(self.codes.shape[0], self.groups)

    @property
    def trivial(self) -> bool:
        """Whether g_idx is k // G, the grouping every client assumes without g_idx."""
        return torch.equal(self.g_idx, self.trivial_g_idx())

    def weight(self, g_idx: torch.Tensor | None = None, zero: torch.Tensor | None = None,
               scale_dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [N, K] float32 = scales[g(k), n]·(q[k, n] − Z[g(k), n]). The arguments replace the
        module's own g_idx, zero points or scale precision, to see what another reader serves."""
        g = self.g_idx if g_idx is None else g_idx
        z = self.zero if zero is None else zero
        s = self.scales if scale_dtype is None else self.scales.to(scale_dtype)
        return (s.float()[g] * (self.codes - z[g]).float()).t().contiguous()


def trivial_group_index(k: int, groups: int) -> torch.Tensor:
    """g(k) = k // G, G = K / groups: the grouping without act-order (§4.3 step 8)."""
    return torch.arange(k, dtype=torch.int64) // (k // groups)


def unpack(tensors: dict[str, torch.Tensor], checkpoint_format: str = "gptq") -> GPTQModule:
    """GPTQ tensors by suffix (qweight, qzeros, scales, optional g_idx) → a GPTQModule.

    The zero points come from qzeros for symmetric and asymmetric checkpoints alike: GPTQModel
    and llama.cpp read them (only vLLM assumes 8 for sym; see `nvq.verify.candidate`).
    """
    qweight, scales, qzeros = tensors["qweight"], tensors["scales"], tensors["qzeros"]
    k, n = qweight.shape[0] * GPTQ_PACK, qweight.shape[1]
    groups = scales.shape[0]
    if scales.dim() != 2 or scales.shape[1] != n or groups == 0 or k % groups:
        raise ValueError(f"scales {list(scales.shape)} do not fit qweight {list(qweight.shape)}")
    if tuple(qzeros.shape) != (groups, -(-n // GPTQ_PACK)):
        raise ValueError(f"qzeros {list(qzeros.shape)} do not fit scales {list(scales.shape)}")
    codes = _unpack_words(qweight).transpose(1, 2).reshape(k, n)  # [K, N]
    stored = _unpack_words(qzeros).reshape(groups, -1)[:, :n]
    g_idx = tensors.get("g_idx")
    g = trivial_group_index(k, groups) if g_idx is None else check_g_idx(g_idx, k, groups)
    carried = None
    if checkpoint_format == "gptq" and bool((stored == _V1_OVERFLOW_NIBBLE).any()):
        carried = _unpack_words((qzeros.to(torch.int64) + _V1_WORD_OFFSET) & (_WORD - 1)).reshape(groups, -1)[:, :n]
    return GPTQModule(codes, stored + ZERO_OFFSET[checkpoint_format], scales, g, carried)


def dequantize(tensors: dict[str, torch.Tensor], checkpoint_format: str = "gptq") -> torch.Tensor:
    """W [N, K] float32 from GPTQ tensors by suffix, with their g_idx and qzeros (§4.1)."""
    return unpack(tensors, checkpoint_format).weight()


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
