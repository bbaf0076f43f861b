"""`nvq verify --html`: the certificate as one self-contained page (no script, no network).

The plot is inline SVG: per layer, the worst tap's rel-L2 and the worst weight's, each with the
limit it was judged against, on a log scale; failed layers are marked red. Below it: the first
divergence, the logit statistics, and the inputs with their hashes.
"""

from __future__ import annotations

import math
from html import escape

from nvq.verify.certificate import divergence_line, oracle_exactness

WIDTH, HEIGHT, PAD = 960, 340, 56
SERIES = (  # (rows key, colour of the measured line, colour of its limit)
    ("taps", "#1f77b4", "#9ecae1"),
    ("weights", "#d95f02", "#fdae6b"),
)


def _worst_per_layer(rows: list[dict]) -> dict[int, dict]:
    """Layer -> the row using most of its limit (global rows are left out of the plot)."""
    def load(r):
        if r.get("rel_l2") is None:
            return math.inf
        return r["rel_l2"] / r["limit"] if r.get("limit") else 0.0

    worst: dict[int, dict] = {}
    for r in rows:
        if r.get("layer") is None:
            continue
        if r["layer"] not in worst or load(r) > load(worst[r["layer"]]):
            worst[r["layer"]] = r
    return worst


def _plot(cert: dict) -> str:
    per = {key: _worst_per_layer(cert.get(key, [])) for key, _, _ in SERIES}
    layers = sorted(set().union(*per.values()))
    values = [v for rows in per.values() for r in rows.values() for v in (r.get("rel_l2"), r.get("limit"))
              if v is not None and v > 0 and math.isfinite(v)]
    if not layers or not values:
        return "<p>No per-layer rows to plot.</p>"
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    span = max(1, layers[-1] - layers[0])

    def x(layer: int) -> float:
        return PAD + (layer - layers[0]) / span * (WIDTH - 2 * PAD)

    def y(v: float | None) -> float:
        v = 10.0 ** hi if v is None or not math.isfinite(v) else max(v, 10.0 ** lo)
        return HEIGHT - PAD + (math.log10(v) - lo) / (hi - lo) * (2 * PAD - HEIGHT)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'aria-label="per-layer error against its limit">',
             f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>']
    for e in range(lo, hi + 1):  # decades
        parts.append(f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(10.0 ** e):.1f}" y2="{y(10.0 ** e):.1f}" '
                     f'stroke="#e5e5e5"/><text x="{PAD - 6}" y="{y(10.0 ** e) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">1e{e}</text>')
    for layer in layers[:: max(1, len(layers) // 16)]:
        parts.append(f'<text x="{x(layer):.1f}" y="{HEIGHT - PAD + 16}" font-size="11" '
                     f'text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" font-size="12" text-anchor="middle">layer</text>')
    parts.append(f'<text x="14" y="{HEIGHT / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {HEIGHT / 2})">rel-L2 (log scale)</text>')
    for key, colour, limit_colour in SERIES:
        rows = per[key]
        if not rows:
            continue
        pts = sorted(rows)
        limit = " ".join(f"{x(k):.1f},{y(rows[k].get('limit')):.1f}" for k in pts)
        got = " ".join(f"{x(k):.1f},{y(rows[k].get('rel_l2')):.1f}" for k in pts)
        parts.append(f'<polyline points="{limit}" fill="none" stroke="{limit_colour}" stroke-width="2" '
                     f'stroke-dasharray="6 4"/>')
        parts.append(f'<polyline points="{got}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for k in pts:
            r = rows[k]
            fill = colour if r.get("ok", True) else "#d62728"
            parts.append(f'<circle cx="{x(k):.1f}" cy="{y(r.get("rel_l2")):.1f}" r="{3 if r.get("ok", True) else 5}" '
                         f'fill="{fill}"><title>{escape(key[:-1])} {escape(r["name"])}: rel-L2 '
                         f'{_g(r.get("rel_l2"))}, limit {_g(r.get("limit"))}</title></circle>')
    legend = [(f"worst {key[:-1]}", c, "") for key, c, _ in SERIES] + \
             [(f"{key[:-1]} limit", c, ' stroke-dasharray="6 4"') for key, _, c in SERIES] + [("failed", "#d62728", "")]
    for i, (label, c, dash) in enumerate(legend):
        lx = PAD + i * 150
        parts.append(f'<line x1="{lx}" x2="{lx + 22}" y1="18" y2="18" stroke="{c}" stroke-width="3"{dash}/>'
                     f'<text x="{lx + 28}" y="22" font-size="12">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _g(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_g(c) if not isinstance(c, str) else escape(c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
h1{font-size:1.5em}.pass{color:#1a7f37}.fail{color:#cf222e}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f6f8fa}code{font-size:.9em}"""


def to_html(cert: dict) -> str:
    inp, lg = cert["inputs"], cert["logits"]
    verdict = cert["verdict"]
    stats = [(k, lg.get(k), lg["expected"].get(k)) for k in
             ("mean_kld", "kld_p99", "kld_max", "top1_agreement", "rms_dp") if k in lg or k in lg["expected"]]
    stats.append(("limit on mean_kld", lg.get("limit_mean_kld"), None))
    files = [(name, digest) for name, digest in sorted(inp["candidate"]["files"].items())]
    failed = [(t["name"], t["rel_l2"], t["limit"]) for t in cert["taps"] if not t["ok"]] + \
             [(w["name"], w["rel_l2"], w["limit"]) for w in cert["weights"] if not w["ok"]]
    policy = cert.get("policy")
    sections = [
        f"<h1>nvq verify: <span class=\"{verdict}\">{verdict.upper()}</span> ({escape(cert['level'])})</h1>",
        f"<p>{escape(inp['candidate']['path'])} ({escape(inp['candidate']['format'])}, "
        f"{escape(inp['candidate']['architecture'])}) against {escape(inp['oracle']['path'])}, "
        f"{escape(oracle_exactness(inp['oracle']))}; {inp['tokens']['count']} tokens, {escape(cert['mode'])}, "
        f"served as {escape(cert['served_as']['name'])}; nvq {escape(cert['nvq_version'])}.</p>",
        f"<p><b>First divergence:</b> {escape(divergence_line(cert))}</p>",
        "<h2>Per layer: worst error against its limit</h2>", _plot(cert),
    ]
    if failed:
        sections += ["<h2>Failed checks</h2>", _table(("tensor or tap", "rel-L2", "limit"), failed)]
    if policy:
        sections.append(f"<p><b>Policy</b> {escape(policy['path'])}: "
                        + ("met" if policy["ok"] else "not met: " + escape(" ".join(policy["problems"]))) + "</p>")
    sections += ["<h2>Logits</h2>", _table(("statistic", "candidate", "expected"), stats),
                 "<h2>Inputs</h2>",
                 _table(("input", "sha256"), [("oracle " + inp["oracle"]["path"], inp["oracle"]["sha256"]),
                                             ("tokens", inp["tokens"]["sha256"]), *files]),
                 f"<p>Certificate sha256 <code>{escape(str(cert.get('certificate_sha256', '—')))}</code>.</p>"]
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>nvq verify: "
            f"{verdict}</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
