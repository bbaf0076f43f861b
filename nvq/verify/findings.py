"""One checked fact about the candidate's config or tokenizer, and where it puts the first divergence.

Config findings name a parsed-config field (per-layer fields also the layer); tokenizer findings
name a token id or a special id. `verdict` is "fail" (the verification fails) or "note"
(reported, not judged).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FAIL, NOTE = "fail", "note"
_LAYER = re.compile(r".*-(\d+)$")


@dataclass(frozen=True)
class Finding:
    check: str  # "config" or "tokenizer"
    field: str  # "rope_full.theta", "head_dim", "token", "bos_token_id", "add_bos_token", ...
    candidate: Any
    oracle: Any
    verdict: str  # FAIL or NOTE
    message: str  # one sentence naming the field and both values
    source: str | None = None  # where the GGUF holds it ("gemma4.rope.freq_base", "tensor shapes", ...)
    layer: int | None = None  # per-layer config fields: the first differing layer
    token_id: int | None = None  # tokenizer findings: the first differing id

    @property
    def ok(self) -> bool:
        return self.verdict != FAIL

    def as_dict(self) -> dict:
        out = {"field": self.field, "layer": self.layer, "candidate": _plain(self.candidate),
               "oracle": _plain(self.oracle), "verdict": self.verdict, "ok": self.ok, "hint": self.message}
        if self.source is not None:
            out["source"] = self.source
        if self.token_id is not None:
            out["token_id"] = self.token_id
        return out


def _plain(x):
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    return x if x is None or isinstance(x, (bool, int, float, str)) else str(x)


def failing(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if not f.ok]


def first_divergence(current: dict | None, findings: list[Finding], tap_order: list[str]) -> dict | None:
    """The first divergence once failing findings count: a tokenizer finding comes before every
    tap (the ids themselves differ); a config finding of one layer sits at that layer's first
    tap, a global one at the first failing tap (`current`'s), else at the first tap. It replaces
    `current` unless `current` is strictly earlier."""
    position = {n: i for i, n in enumerate(tap_order)}
    current_tap = (current or {}).get("tap")

    def where(f: Finding) -> tuple[int, str | None]:
        if f.check == "tokenizer":
            return -1, None
        if f.layer is None and current_tap in position:
            return position[current_tap], current_tap
        tap = next((n for n in tap_order if f.layer is None or _tap_layer(n) == f.layer), None)
        return (position[tap], tap) if tap is not None else (len(tap_order), None)

    bad = failing(findings)
    if not bad:
        return current
    pos, tap, f = min(((*where(f), f) for f in bad), key=lambda x: x[0])
    if current_tap in position and position[current_tap] < pos:
        return current
    return {"tap": tap, "layer": f.layer, "tensor": None, "hint": f.message, "field": f.field}


def _tap_layer(name: str) -> int | None:
    m = _LAYER.fullmatch(name)
    return int(m.group(1)) if m else None
