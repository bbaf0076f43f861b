"""Local damage: per-row and per-expert error, so that one bad row or one bad expert is not diluted
by the rest of a large tensor.

A weight is viewed as rows of its input dimension ([experts·N, K] for an expert stack). Per row,
the candidate's squared error d_r = ‖C_r − O_r‖² is compared with the expected one e_r (the mean
over the noise draws). Legitimate quantizers differ per scale block (a scale search, another
exponent rule), so a row's error ratio √(d_r / e_r) of a correct candidate scatters around 1 by
about √(2/B), B the row's scale blocks (K / block size). A row fails above

    factor · √(1 + z_rows · √(2 / B))

(`row_limit`); an expert is judged the same way on all its rows (N·B blocks). Rows where nothing
is expected (exact oracle, dense candidate) fail on any difference above the floor. GPTQ moves weights
to cancel output error, so there a row fails only past a multiple of its own energy (`min_rel_sq`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nvq.verify.metrics import row_sq_error, row_sq_norm

# spread allowance: against Q8_0 / Q4_0 oracles, clean NVFP4 rows stay under 1 + 2.3·√(2/K) and
# MXFP4 with the OCP floor rule reaches 1.67× on a 2-block row (1 + 0.9·√(2/B) in squares)
Z_ROWS = 4.0


@dataclass
class LocalDamage:
    """Where in a tensor the candidate leaves its band: rows (flat row index of the 2-D view),
    and experts for 3-D stacks."""

    rows: list[int] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)
    rows_total: int = 0
    worst_row: int | None = None
    worst_row_ratio: float = 0.0
    worst_expert: int | None = None
    worst_expert_ratio: float = 0.0

    @property
    def found(self) -> bool:
        return bool(self.rows or self.experts)

    def describe(self, rows_per_expert: int | None = None) -> str:
        parts = []
        if self.experts:
            parts.append(f"expert{'s' if len(self.experts) > 1 else ''} {_ranges(self.experts)}")
        if self.rows and not self.experts:
            rows = self.rows
            if rows_per_expert:
                by_expert = sorted({r // rows_per_expert for r in rows})
                parts.append(f"rows {_ranges([r % rows_per_expert for r in rows])} of expert{'s' if len(by_expert) > 1 else ''} {_ranges(by_expert)}")
            else:
                parts.append(f"row{'s' if len(rows) > 1 else ''} {_ranges(rows)} of {self.rows_total}")
        return ", ".join(parts)


def row_limit(factor: float, k: int) -> float:
    return factor * math.sqrt(1.0 + Z_ROWS * math.sqrt(2.0 / max(k, 1)))


def local_damage(
    candidate: torch.Tensor,
    oracle: torch.Tensor,
    expected_sq_rows: torch.Tensor,
    factor: float,
    floor: float,
    block: int = 1,
    min_rel_sq: float = 0.0,
) -> LocalDamage:
    """Rows and experts of `candidate` whose error exceeds their band. `expected_sq_rows` is the
    mean over draws of ‖E_r − O_r‖² per row of the 2-D view; `floor` is a rel-L2 floor; `block`
    the elements per scale of the candidate's scheme (1 for dense)."""
    if oracle.dim() < 2 or oracle.numel() == 0:
        return LocalDamage()
    k = oracle.shape[-1]
    d, ref = row_sq_error(candidate, oracle, k), row_sq_norm(oracle, k)
    experts = oracle.shape[0] if oracle.dim() == 3 else None
    return local_damage_from_sums(d, expected_sq_rows, ref, experts, factor, floor, max(k // max(block, 1), 1),
                                  min_rel_sq)


def local_damage_from_sums(
    d: torch.Tensor,
    e: torch.Tensor,
    ref: torch.Tensor,
    experts: int | None,
    factor: float,
    floor: float,
    blocks: int,
    min_rel_sq: float = 0.0,
) -> LocalDamage:
    """`local_damage` from per-row sums: d = ‖C_r − O_r‖², e = expected ‖E_r − O_r‖², ref =
    ‖O_r‖² (what the streamed verifier accumulates over row blocks); `blocks` scale blocks a row;
    `min_rel_sq` the least d / ref of a failing row or expert."""
    d, e, ref = d.double().reshape(-1).cpu(), e.double().reshape(-1).cpu(), ref.double().reshape(-1).cpu()
    scale = ref.mean().clamp(min=1e-300)  # a row of zeros gets the floor of an average row
    slack = floor**2 * torch.maximum(ref, scale)
    bad = torch.nonzero((d > row_limit(factor, blocks) ** 2 * e + slack) & (d >= min_rel_sq * ref)).flatten().tolist()
    ratio = (d / (e + slack)).sqrt()
    out = LocalDamage(rows=bad, rows_total=int(d.numel()))
    if ratio.numel():
        out.worst_row = int(ratio.argmax())
        out.worst_row_ratio = float(ratio.max())
    if experts:
        per = d.numel() // experts
        de, ee, re_ = (x.reshape(experts, -1).sum(-1) for x in (d, e, ref))
        slack_e = floor**2 * torch.maximum(re_, scale * per)
        out.experts = torch.nonzero((de > row_limit(factor, per * blocks) ** 2 * ee + slack_e)
                                    & (de >= min_rel_sq * re_)).flatten().tolist()
        ratio_e = (de / (ee + slack_e)).sqrt()
        out.worst_expert = int(ratio_e.argmax())
        out.worst_expert_ratio = float(ratio_e.max())
    return out


def _ranges(xs: list[int], shown: int = 6) -> str:
    xs = sorted(set(xs))
    spans, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            spans.append(str(start) if start == x else f"{start}–{x}")
            start = None
    text = ", ".join(spans[:shown])
    return text + (f" and {len(spans) - shown} more" if len(spans) > shown else "")
