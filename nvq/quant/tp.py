"""Tensor-parallel alignment of grouped formats (formats.md §5.2): a row-parallel weight splits
its input dimension K over N ranks, and each rank's slice must hold whole groups, K % (N·G) == 0
(for MoE: moe_intermediate / N % G == 0, the K of the expert down projections). GPTQ also packs
qzeros eight columns to a word, so a column-parallel output slice must be a multiple of 8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nvq import schemes
from nvq.errors import RecipeError
from nvq.quant.policy import Plan

# canonical weights whose input dimension engines split across ranks
ROW_PARALLEL = re.compile(r"blk\.\d+\.(attn_output|ffn_down|ffn_down_exps)\.weight(\[\d+\])?")


@dataclass(frozen=True)
class Misalignment:
    weight: str  # canonical name
    module: str  # output module
    reason: str


def misalignments(plan: Plan, tp: int, group_size: int | None = None) -> list[Misalignment]:
    """Every quantized weight that would break under `tp` ranks with this group size."""
    g = group_size or plan.group_size
    pack = schemes.get(plan.scheme).column_pack
    found = []
    for u in plan.quantized:
        n, k = u.shape
        if ROW_PARALLEL.fullmatch(u.canonical or ""):
            if k % (tp * g):
                found.append(Misalignment(u.canonical, u.out, f"K {k} / {tp} ranks = {k / tp:g} is not a multiple of group size {g}"))
        elif pack and n % (tp * pack[0]):
            found.append(Misalignment(u.canonical, u.out, f"N {n} / {tp} ranks = {n / tp:g} is not a multiple of {pack[0]} ({pack[1]})"))
    return found


def aligned_group_size(plan: Plan, tp: int) -> int | None:
    """The largest group size the plan's scheme may take that every weight aligns with, or None."""
    for g in schemes.get(plan.scheme).group_sizes:
        if all(u.shape[1] % g == 0 for u in plan.quantized) and not misalignments(plan, tp, g):
            return g
    return None


def check(plan: Plan, tp: int) -> None:
    """Refuse a plan that would be served wrongly (or not at all) with `tp` ranks."""
    if tp < 1:
        raise RecipeError(f"--tp {tp}: the tensor-parallel size is at least 1.")
    bad = misalignments(plan, tp)
    if not bad:
        return
    layers = ", ".join(f"{m.weight} ({m.reason})" for m in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    hint = ""
    sizes = schemes.get(plan.scheme).group_sizes
    if len(sizes) > 1:
        g = aligned_group_size(plan, tp)
        hint = f" --group-size {g} aligns every weight." if g else \
            f" No group size in {'/'.join(map(str, sizes))} aligns them; lower --tp."
    raise RecipeError(f"with --tp {tp}, {len(bad)} weight(s) would straddle rank boundaries: {layers}{more}.{hint}")
