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

from nvq.io.gguf_cells import Cells
from nvq.schemes import GlobalScale, storing
from nvq.verify.candidate import Scheme

DEFAULT_DRAWS = 2


def fits(w: torch.Tensor, s: Scheme) -> bool:
    """Whether the scheme can store a tensor of this shape (else it is compared as it is)."""
    if not s.quantized:
        return True
    return w.dim() >= 2 and w.shape[-1] % storing(s.name).scale_block(s, w.shape[-1]) == 0 \
        and w.shape[-2] % s.row_parts == 0


def apply_scheme(
    w: torch.Tensor,
    scheme: Scheme,
    groups: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """w as the candidate's scheme would store it. Quantized formats work per 2-D block: per
    expert of a stack, whose gate and up rows share the expert's NVFP4 global scale as nvq and
    llm-compressor write them. `groups`: the candidate's g_idx ([K], or [E, parts, K] for an expert
    stack) where it is not k // G; `global_scale`: a fusion group's shared NVFP4 divisor."""
    fn = storing(scheme.name).expected
    if not scheme.quantized:
        return fn(w, scheme, None, None)
    if not fits(w, scheme):
        return w.float()
    if w.dim() == 2:
        return fn(w, scheme, groups, global_scale)
    mats = w.reshape(-1, *w.shape[-2:])
    if groups is None:  # a per-expert global scale [E, 1]: the expert's gate and up stacks share it
        out = [fn(m, scheme, None, None if global_scale is None else global_scale[e]) for e, m in enumerate(mats)]
    else:  # [E, parts, K]: each part (gate, up) is its own module with its own g_idx
        parts = groups.reshape(len(mats), -1, groups.shape[-1])
        out = [torch.cat([fn(p, scheme, g, None) for p, g in zip(m.chunk(parts.shape[1]), parts[e], strict=True)])
               for e, m in enumerate(mats)]
    return torch.stack(out).reshape(w.shape)


_MIX = (-4658895280553007687, -7723592293110705685)  # splitmix64's multipliers as int64


def uniform_field(seed: int, first_row: int, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """U[0, 1) per element, a pure function of (seed, flat position): any row block of a tensor
    draws exactly what the whole tensor would, on any device (the streamed verifier reads
    embeddings and LM heads in row blocks)."""
    row = shape[-1] if len(shape) > 1 else 1
    n = 1
    for d in shape:
        n *= d
    start = first_row * row + seed
    x = torch.arange(start, start + n, dtype=torch.int64, device=device).mul_(_MIX[0])
    x.bitwise_xor_(x >> 29).mul_(_MIX[1])  # in place: the field is memory-bound, 2.6× faster so
    x.bitwise_right_shift_(40).bitwise_and_(0xFFFFFF)
    return x.float().mul_(1.0 / (1 << 24)).reshape(shape)


def plausible_original(values: torch.Tensor, cells: Cells, seed: int, first_row: int = 0) -> torch.Tensor:
    u = uniform_field(seed, first_row, tuple(values.shape), values.device)
    return values.float() + cells.lower + cells.width() * u


def draw_seed(name: str, draw: int, seed: int = 0) -> int:
    return zlib.crc32(f"{seed}:{draw}:{name}".encode())


def original_draw(
    name: str, oracle: torch.Tensor, cells: Cells | None, draw: int, dtype: torch.dtype, first_row: int = 0
) -> torch.Tensor:
    """Draw `draw` of the original behind an oracle tensor (or of its rows from `first_row` on),
    in the candidate's source dtype. Draw 0 is nominal: the oracle's values themselves."""
    w = oracle.float()
    if draw > 0 and cells is not None:
        w = plausible_original(w, cells, draw_seed(name, draw), first_row)
    return w.to(dtype)


def expected_draw(
    oracle: Mapping[str, torch.Tensor],
    schemes: Mapping[str, Scheme],
    cells: Mapping[str, Cells],
    draw: int,
    dtype: torch.dtype = torch.float32,
    fusion: Mapping[str, str] | None = None,
    groups: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Draw `draw` of the expected candidate, every tensor. Originals are drawn in the candidate's
    source `dtype` (what nvq quantized from); fusion-group members (`fusion`: name -> group key)
    share one NVFP4 global scale from the group's amax, as nvq convert writes them. Tensors the
    candidate lacks stay plausible originals."""
    fusion, groups = fusion or {}, groups or {}
    originals = {n: original_draw(n, w, cells.get(n), draw, dtype) for n, w in oracle.items()}
    shared = fusion_scales(originals, schemes, fusion, dtype)
    out = {}
    for n, w in originals.items():
        s = schemes.get(n)
        out[n] = apply_scheme(w, s, groups.get(n), shared.get(fusion.get(n))) if s is not None else w.float()
    return out


def fusion_scales(originals, schemes, fusion, dtype) -> dict[str, torch.Tensor]:
    """Fusion group key -> the global scale its members share (from the group's amax), for schemes
    that have one (NVFP4); a group of one keeps the tensor's own scale. Members that are expert
    stacks ([E, N, K], Qwen3-MoE's gate and up) share one scale per expert, [E, 1]."""
    amax: dict[str, list[torch.Tensor]] = {}
    reference: dict[str, object] = {}
    for n, key in fusion.items():
        s = schemes.get(n)
        w = originals.get(n)
        shared = _shared_scale(s)
        if w is not None and w.dim() in (2, 3) and shared is not None and fits(w, s):
            amax.setdefault(key, []).append(w.abs().amax() if w.dim() == 2 else w.abs().flatten(1).amax(1))
            reference[key] = shared.reference
    out = {}
    for k, a in amax.items():
        if len(a) > 1 and len({t.shape for t in a}) == 1:
            group, scale = torch.stack(a).amax(0).to(dtype), reference[k]
            out[k] = scale(group, dtype) if group.dim() == 0 else torch.stack([scale(g, dtype) for g in group])
    return out


def _shared_scale(s: Scheme | None) -> GlobalScale | None:
    stream = storing(s.name).stream if s is not None and s.quantized else None
    return stream.global_scale if stream is not None else None


def fusion_groups(table, names) -> dict[str, str]:
    """Canonical name -> fusion group key ("blk.3:qkv") for the names a name table fuses."""
    import re

    out = {}
    for row in table.rows:
        if not row.fuse:
            continue
        pattern = re.compile(re.escape(row.gguf).replace(re.escape("{bid}"), r"(?P<bid>\d+)"))
        for n in names:
            m = pattern.fullmatch(n)
            if m:
                out[n] = f"blk.{m['bid']}:{row.fuse}" if "bid" in m.groupdict() else row.fuse
    return out


def draws_needed(cells: Mapping[str, Cells], requested: int = DEFAULT_DRAWS) -> int:
    """Dithered draws worth running: none differ from the nominal one when the oracle is exact."""
    return requested if cells else 0
