"""`nvq diff`: what changed between two certificates, e.g. the last release's and this one's.

Compares the verdicts, the logit statistics, and per layer the worst tap and the worst weight
error (each against its own limit), so a release-to-release regression is named by layer even
when both releases still pass. Comparable only when both were verified the same way (same
oracle, tokens and mode); otherwise the differences are listed first, as they explain the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# logit statistic -> True when a larger value is worse
LOGIT_STATS = {"mean_kld": True, "kld_p99": True, "kld_max": True, "top1_agreement": False, "rms_dp": True}
# what must match for the numbers to be comparable: (label, path into the certificate)
SETUP = (
    ("oracle", ("inputs", "oracle", "sha256")),
    ("tokens", ("inputs", "tokens", "sha256")),
    ("mode", ("mode",)),
    ("served as", ("served_as", "name")),
    ("precision", ("precision",)),
    ("nvq version", ("nvq_version",)),
)


@dataclass(frozen=True)
class Change:
    what: str  # "tap", "weight", "logits", "verdict"
    layer: int | None
    name: str  # the worst tap / weight of the layer in B, or the statistic
    a: float | str | None
    b: float | str | None
    ratio: float | None  # b / a, when both are numbers
    regressed: bool  # worse by more than the allowed ratio, or a check that passed now fails


@dataclass
class CertDiff:
    setup: list[str]  # comparability differences, e.g. "oracle: 1a2b… → 3c4d…"
    changes: list[Change]
    changed_files: list[str]

    @property
    def regressed(self) -> bool:
        return any(c.regressed for c in self.changes)

    def as_dict(self) -> dict:
        return {"setup": self.setup, "changed_files": self.changed_files, "regressed": self.regressed,
                "changes": [asdict(c) for c in self.changes]}


def _get(cert: dict, path: tuple[str, ...]):
    for key in path:
        cert = cert.get(key) if isinstance(cert, dict) else None
    return cert


def _worst_by_layer(rows: list[dict]) -> dict[int, dict]:
    """Per layer, the row using most of its limit (rel_l2 / limit), a failed row first."""
    def load(r: dict) -> float:
        if not r.get("ok", True):
            return math.inf
        rel, limit = r.get("rel_l2"), r.get("limit")
        return (rel / limit) if rel is not None and limit else (rel or 0.0)

    worst: dict[int, dict] = {}
    for r in rows:
        layer = r.get("layer")
        layer = -1 if layer is None else layer
        if layer not in worst or load(r) > load(worst[layer]):
            worst[layer] = r
    return worst


def _ratio(a, b) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
        return b / a
    return None


def diff(a: dict, b: dict, max_ratio: float = math.inf) -> CertDiff:
    """B against A. A per-layer worst error (or a logit statistic) that grows by more than
    `max_ratio`, or a check that passed in A and fails in B, is a regression."""
    setup = []
    for label, path in SETUP:
        va, vb = _get(a, path), _get(b, path)
        if va != vb:
            setup.append(f"{label}: {str(va)[:16]} → {str(vb)[:16]}")
    changes: list[Change] = []
    if a.get("verdict") != b.get("verdict"):
        changes.append(Change("verdict", None, "verdict", a.get("verdict"), b.get("verdict"), None,
                              a.get("verdict") == "pass" and b.get("verdict") != "pass"))
    la, lb = a.get("logits", {}), b.get("logits", {})
    for stat, larger_is_worse in LOGIT_STATS.items():
        va, vb = la.get(stat), lb.get(stat)
        if va is None and vb is None:
            continue
        r = _ratio(va, vb)
        worse = r is not None and ((r > max_ratio) if larger_is_worse else (r < 1 / max_ratio))
        changes.append(Change("logits", None, stat, va, vb, r, worse))
    if la.get("ok", True) and not lb.get("ok", True):
        changes.append(Change("logits", None, "ok", True, False, None, True))
    for kind, key in (("tap", "taps"), ("weight", "weights")):
        wa, wb = _worst_by_layer(a.get(key, [])), _worst_by_layer(b.get(key, []))
        for layer in sorted(set(wa) | set(wb)):
            ra, rb = wa.get(layer, {}), wb.get(layer, {})
            va, vb = ra.get("rel_l2"), rb.get("rel_l2")
            r = _ratio(va, vb)
            newly_failed = ra.get("ok", True) and not rb.get("ok", True) and bool(rb)
            changes.append(Change(kind, None if layer < 0 else layer, rb.get("name") or ra.get("name", "?"),
                                  va, vb, r, newly_failed or (r is not None and r > max_ratio)))
    fa = _get(a, ("inputs", "candidate", "files")) or {}
    fb = _get(b, ("inputs", "candidate", "files")) or {}
    changed = sorted(n for n in set(fa) | set(fb) if fa.get(n) != fb.get(n))
    return CertDiff(setup, changes, changed)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "—" if x is None else str(x)


def to_text(d: CertDiff, all_rows: bool = False) -> str:
    """The comparability notes, then the changes (regressions marked), largest ratio first."""
    lines = []
    if d.setup:
        lines.append("not verified the same way (compare with care):")
        lines += [f"  {s}" for s in d.setup]
    if d.changed_files:
        shown = ", ".join(d.changed_files[:6]) + (f" and {len(d.changed_files) - 6} more" if len(d.changed_files) > 6 else "")
        lines.append(f"candidate files changed: {shown}")
    rows = sorted(d.changes, key=lambda c: (not c.regressed, -(c.ratio or 0.0)))
    if not all_rows:
        rows = [c for c in rows if c.regressed or c.what in ("verdict", "logits") or (c.ratio or 1.0) > 1.1]
    lines.append(f"{'':2}{'what':8}{'layer':>6}  {'name':44}{'A':>12}{'B':>12}{'B/A':>8}")
    for c in rows:
        mark = "! " if c.regressed else "  "
        layer = "" if c.layer is None else str(c.layer)
        ratio = "" if c.ratio is None else f"{c.ratio:.2f}"
        lines.append(f"{mark}{c.what:8}{layer:>6}  {c.name[:44]:44}{_fmt(c.a):>12}{_fmt(c.b):>12}{ratio:>8}")
    lines.append("regressed" if d.regressed else "no regression")
    return "\n".join(lines)
