"""What a failing weight's difference looks like: the bug behind it, in words.

Each check looks for one signature of a known converter bug and returns a sentence, or None.
`HINTS` is tried in order; the first that explains the difference wins. Tensor-level signatures
come first (all ones, RoPE order, transpose, values of another tensor, a constant factor or
offset), then local ones (experts or rows swapped, zeroed, negated or scaled).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from nvq.verify.damage import LocalDamage, _ranges
from nvq.verify.metrics import rel_l2


@dataclass
class Evidence:
    name: str
    got: torch.Tensor  # candidate, float32
    ref: torch.Tensor  # oracle
    limit: float  # rel-L2 band of the tensor
    oracle: Mapping[str, torch.Tensor]  # every oracle tensor, for "holds another tensor's values"
    damage: LocalDamage


def _all_ones(ev: Evidence) -> str | None:
    if torch.all(ev.got == 1) and not torch.all(ev.ref == 1):
        what = ("norm missing or replaced by ones" if "norm" in ev.name
                else "scalar left at its default 1.0" if ev.ref.numel() == 1 else "scale left at its default of ones")
        return f"equal to all ones where the oracle's is not: {what}"
    return None


def _rope_permuted(ev: Evidence) -> str | None:
    if not re.search(r"\.attn_[qk]\.(weight|bias)$", ev.name) or ev.ref.dim() < 1:
        return None
    rows = ev.ref.shape[0]
    for d in range(4, rows + 1, 2):
        if rows % d:
            continue
        heads = ev.ref.reshape(rows // d, 2, d // 2, *ev.ref.shape[1:])
        permuted = heads.transpose(1, 2).reshape(ev.ref.shape)  # llama.cpp's LlamaModel.permute
        if rel_l2(ev.got, permuted) <= ev.limit:
            return (f"rows in llama.cpp's interleaved RoPE order (head_dim {d}): the GGUF Q/K "
                    f"permutation was left in (not undone)")
    return None


def _transposed(ev: Evidence) -> str | None:
    if ev.ref.dim() == 2 and ev.ref.shape[0] == ev.ref.shape[1] and rel_l2(ev.got, ev.ref.T) <= ev.limit:
        return "equals the oracle's weight transposed: [in, out] stored where [out, in] is expected"
    return None


def _another_tensor(ev: Evidence) -> str | None:
    for other, w in ev.oracle.items():
        if other != ev.name and w.shape == ev.ref.shape and rel_l2(ev.got, w) <= ev.limit:
            return f"holds the values of '{other}': the two tensors are swapped or mis-named"
    return None


def _constant_factor(ev: Evidence) -> str | None:
    if ev.ref.numel() < 2:
        return None
    mats = [(None, ev.got, ev.ref)] if ev.ref.dim() < 3 else [(e, ev.got[e], ev.ref[e]) for e in range(ev.ref.shape[0])]
    for e, g, r in mats:
        rr, gg = r.double().flatten(), g.double().flatten()
        denom = (rr @ rr).item()
        if denom == 0:
            continue
        alpha = (gg @ rr).item() / denom
        if abs(alpha - 1) > 0.05 and rel_l2(g, alpha * r) <= ev.limit + 0.05:
            where = "" if e is None else f" (expert {e})"
            return (f"off by a constant factor ×{alpha:.4g}{where}: a global or per-expert scale read "
                    f"as a multiplier instead of a divisor (or stored inverted)")
    return None


def _constant_offset(ev: Evidence) -> str | None:
    delta = (ev.got.double() - ev.ref.double()).flatten()
    if delta.numel() < 2:
        return None
    mean = delta.mean().item()
    if abs(mean) > 0.05 and (delta - mean).norm().item() <= ev.limit * ev.ref.double().norm().item() + 1e-6:
        return f"off by a constant {mean:+.4g}: a (1 + w) norm shift applied twice or not undone"
    return None


def _experts_swapped(ev: Evidence) -> str | None:
    experts = ev.damage.experts
    if ev.ref.dim() != 3 or not experts:
        return None
    found = []
    for e in experts:
        match = next((f for f in range(ev.ref.shape[0]) if f != e and rel_l2(ev.got[e], ev.ref[f]) <= ev.limit), None)
        if match is None:
            return None
        found.append((e, match))
    pairs = sorted({tuple(sorted(p)) for p in found})
    if all((b, a) in found for a, b in pairs):
        return f"experts {', '.join(f'{a} and {b}' for a, b in pairs)} swapped (each holds the other's weights)"
    return "; ".join(f"expert {e} holds the oracle's expert {f}" for e, f in found)


# row signature -> how a bad candidate row relates to the oracle
_ROW_KINDS: list[tuple[str, Callable[[torch.Tensor, torch.Tensor], bool]]] = [
    ("zero", lambda c, o: bool(torch.all(c == 0)) and bool(torch.any(o != 0))),
    ("negated", lambda c, o: rel_l2(c, -o) < 0.5 * rel_l2(c, o)),
]


def _rows(ev: Evidence) -> str | None:
    rows = ev.damage.rows
    if not rows or ev.ref.dim() < 2:
        return None
    k = ev.ref.shape[-1]
    got, ref = ev.got.reshape(-1, k), ev.ref.reshape(-1, k)
    where = f"row{'s' if len(rows) > 1 else ''} {_ranges(rows)} of {ref.shape[0]}"
    for kind, test in _ROW_KINDS:
        if all(test(got[r], ref[r]) for r in rows):
            return f"{where} {'are' if len(rows) > 1 else 'is'} {kind} where the oracle's are not"
    if len(rows) <= 64:
        moved = {}
        for r in rows:
            err = (got[r].double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1).clamp(min=1e-30)
            j = int(err.argmin())
            if j != r and err[j].item() <= max(ev.limit, 0.05) * 2:
                moved[r] = j
        if len(moved) == len(rows):
            pairs = sorted({tuple(sorted((a, b))) for a, b in moved.items() if moved.get(b) == a})
            if len(pairs) * 2 == len(moved):
                return f"rows swapped: {', '.join(f'{a} ↔ {b}' for a, b in pairs)} (of {ref.shape[0]}): rows permuted"
            return f"{where} hold other rows of the oracle ({', '.join(f'{a} ← {b}' for a, b in list(moved.items())[:6])}): rows permuted"
    alphas = []
    for r in rows:
        o = ref[r].double()
        n = (o @ o).item()
        alphas.append((got[r].double() @ o).item() / n if n else math.nan)
    if all(math.isfinite(a) and abs(a - 1) > 0.2 for a in alphas) and max(alphas) - min(alphas) < 0.05 * max(abs(a) for a in alphas):
        return f"{where} scaled by ×{sum(alphas) / len(alphas):.3g}: a block or row scale is off"
    worst = ev.damage.worst_row_ratio
    return f"{where} leave their band (worst row {ev.damage.worst_row} at {worst:.3g}× its expected error)"


HINTS: list[Callable[[Evidence], str | None]] = [
    _all_ones, _rope_permuted, _transposed, _another_tensor, _constant_factor, _constant_offset,
    _experts_swapped, _rows,
]


def weight_hint(ev: Evidence) -> str:
    for check in HINTS:
        hint = check(ev)
        if hint:
            return hint
    err = rel_l2(ev.got, ev.ref)
    return f"differs from the oracle by {err / max(ev.limit, 1e-30):.3g}× its band (rel-L2 {err:.3g})"
