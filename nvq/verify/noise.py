"""The expected-noise model: what a correct candidate looks like next to this oracle.

The candidate C is the original W stored the candidate's way (scheme s_c); the oracle O is W stored
the GGUF's way (type t_o). Neither side has W, but O says where W lies: in the rounding cell of
each oracle value (`nvq.io.gguf_cells`). A draw picks a plausible original W' uniformly in those
cells and stores it the candidate's way:

    E_k = s_c(O + u_k),   u_k ~ U(cell)

so E_k − O = (s_c(W') − W') + (W' − O) carries the candidate scheme's noise, the oracle type's noise
and their correlation, exactly as C − O does. For an exact oracle (F32) every draw is s_c(O), and a
candidate made by nvq from the same weights equals it bit for bit (`nominal`).

Draws are seeded per tensor name, so the same inputs give the same figures.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from nvq.formats import int4, mxfp4, nvfp4
from nvq.io.gguf_cells import Cells
from nvq.verify.candidate import Scheme

DEFAULT_DRAWS = 2


def _nvfp4_2d(w: torch.Tensor, scheme: Scheme, groups: torch.Tensor | None) -> torch.Tensor:
    q = nvfp4.quantize(w, profile=nvfp4.Profile(scheme.profile or "ct"))
    return nvfp4.dequantize(q, torch.float32)


def _mxfp4_2d(w: torch.Tensor, scheme: Scheme, groups: torch.Tensor | None) -> torch.Tensor:
    return mxfp4.dequantize(mxfp4.quantize(w), torch.float32)


def _gptq_2d(w: torch.Tensor, scheme: Scheme, groups: torch.Tensor | None) -> torch.Tensor:
    # Round-to-nearest with the candidate's own groups: GPTQ trades a weight error of about this
    # size for a smaller output error, so RTN is the expected band for both.
    if groups is not None:
        return int4.dequantize_grouped(int4.quantize_grouped(w, groups), torch.float32)
    return int4.dequantize(int4.quantize(w, scheme.group_size or -1), torch.float32)


# scheme name -> what storing an fp32 [N, K] block in it does to the values
STORE = {
    "f32": lambda w, s, g: w,
    "f64": lambda w, s, g: w,
    "bf16": lambda w, s, g: w.to(torch.bfloat16).float(),
    "f16": lambda w, s, g: w.to(torch.float16).float(),
    "nvfp4": _nvfp4_2d,
    "mxfp4": _mxfp4_2d,
    "gptq": _gptq_2d,
}
BLOCK = {"nvfp4": 16, "mxfp4": 32}


def fits(w: torch.Tensor, s: Scheme) -> bool:
    """Whether the scheme can store a tensor of this shape (else it is compared as it is)."""
    block = BLOCK.get(s.name) or (s.group_size if s.name == "gptq" and (s.group_size or -1) > 0 else None)
    if not s.quantized:
        return True
    return w.dim() >= 2 and (block is None or w.shape[-1] % block == 0) and w.shape[-2] % s.row_parts == 0


def apply_scheme(w: torch.Tensor, scheme: Scheme, groups: torch.Tensor | None = None) -> torch.Tensor:
    """w as the candidate's scheme would store it. Quantized formats work per 2-D block with the
    block's own tensor scale: per expert, and per gate/up half of a fused gate_up stack. `groups`:
    the candidate's g_idx ([K], or [E, K] for an expert stack) where it is not k // G."""
    fn = STORE[scheme.name]
    w = w.float()
    if not scheme.quantized or not fits(w, scheme):
        return fn(w, scheme, None) if not scheme.quantized else w
    if w.dim() == 2 and scheme.row_parts == 1:
        return fn(w, scheme, groups)
    mats = w.reshape(-1, *w.shape[-2:])
    per_expert = groups.reshape(-1, groups.shape[-1]) if groups is not None and groups.dim() == 2 else None
    out = []
    for e, m in enumerate(mats):
        g = per_expert[e] if per_expert is not None else groups
        out.append(torch.cat([fn(p, scheme, g) for p in m.chunk(scheme.row_parts)]))
    return torch.stack(out).reshape(w.shape)


def plausible_original(values: torch.Tensor, cells: Cells, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(values.shape, generator=generator, dtype=torch.float32)
    return values.float() + cells.lower + cells.width() * u


def draw_seed(name: str, draw: int, seed: int = 0) -> int:
    return zlib.crc32(f"{seed}:{draw}:{name}".encode())


def expected_tensor(
    name: str,
    oracle: torch.Tensor,
    scheme: Scheme | None,
    cells: Cells | None,
    draw: int,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw `draw` of the expected candidate tensor. Draw 0 is nominal: no dither, s_c(O)."""
    w = oracle.float()
    if draw > 0 and cells is not None:
        w = plausible_original(w, cells, torch.Generator().manual_seed(draw_seed(name, draw)))
    return apply_scheme(w, scheme, groups) if scheme is not None else w


def expected_weights(
    oracle: Mapping[str, torch.Tensor],
    schemes: Mapping[str, Scheme],
    cells: Mapping[str, Cells] | None = None,
    draw: int = 0,
    groups: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every oracle tensor as draw `draw` of the expected candidate (tensors the candidate lacks
    are stored as the oracle stores them: dithered within their cells, or as they are)."""
    cells, groups = cells or {}, groups or {}
    return {
        name: expected_tensor(name, w, schemes.get(name), cells.get(name), draw, groups.get(name))
        for name, w in oracle.items()
    }


def draws_needed(cells: Mapping[str, Cells], requested: int = DEFAULT_DRAWS) -> int:
    """Dithered draws worth running: none differ from the nominal one when the oracle is exact."""
    return requested if cells else 0
