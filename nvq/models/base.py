"""Name tables: every source tensor of a checkpoint maps to a canonical (GGUF) name and a role.

Each architecture module declares its table as data (`Row`s with a `{bid}` placeholder) plus the
prefixes its text decoder lives under and the prefixes of towers that pass through untouched.
`NameTable.resolve` is total: a name is mapped, dropped on purpose, or reported as unmapped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from nvq.errors import UnmappedTensorError


class Role(str, Enum):
    LINEAR = "linear"  # 2-D nn.Linear weight: quantizable
    EXPERTS_GATE_UP = "experts_gate_up"  # fused 3-D [E, 2·Ie, H]: gate rows then up rows
    EXPERTS_DOWN = "experts_down"  # fused 3-D [E, H, Ie]
    EXPERTS_GATE = "experts_gate"  # 3-D [E, Ie, H] of gate rows only (llama.cpp's ffn_gate_exps)
    EXPERTS_UP = "experts_up"  # 3-D [E, Ie, H] of up rows only (ffn_up_exps)
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    NORM = "norm"
    ROUTER = "router"  # MoE router projection: engines load it dense only
    SCALAR = "scalar"  # layer_scalar, router.scale, per_expert_scale: multipliers, never quantized
    BIAS = "bias"
    TOWER = "tower"  # vision / audio towers and their embedders: copied untouched


EXPERT_ROLES = frozenset({Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN, Role.EXPERTS_GATE, Role.EXPERTS_UP})
QUANTIZABLE_ROLES = frozenset({Role.LINEAR, *EXPERT_ROLES})


@dataclass(frozen=True)
class Row:
    """One line of a name table: HF spelling (after the text prefix) ⇄ canonical GGUF name.
    `{bid}` stands for the layer; `{xid}` for the expert of a checkpoint that stores each expert
    as its own Linear (canonical `blk.N.ffn_gate_exps.weight[E]`: expert E of the GGUF stack)."""

    hf: str
    gguf: str
    role: Role
    fuse: str | None = None  # members of one fusion group share an NVFP4 global scale
    # Returns a reason when this tensor of layer `bid` is to be dropped on purpose.
    drop_when: Callable[[Any, int], str | None] | None = None


@dataclass(frozen=True)
class Mapped:
    """What the table says about one source tensor."""

    source: str
    canonical: str | None  # None for towers and drops
    role: Role | None  # None for drops
    bid: int | None = None
    module: str | None = None  # HF module path owning the weight (name without ".weight")
    fuse: str | None = None
    dropped: str | None = None  # reason, when dropped on purpose


@dataclass
class NameTable:
    rows: list[Row]
    text_prefixes: tuple[str, ...]  # tried in order; e.g. "model.language_model." before "model."
    tower_prefixes: tuple[str, ...] = ()
    top_level: dict[str, Row] = field(default_factory=dict)  # names outside the text prefix

    def __post_init__(self) -> None:
        self._compiled = [(_template_regex(r.hf), r) for r in self.rows]
        # canonical → row, for reading a GGUF back (top-level rows carry no text prefix)
        self._by_canonical = [(_template_regex(r.gguf), r, True) for r in self.rows]
        self._by_canonical += [(_template_regex(r.gguf), r, False) for r in self.top_level.values()]
        self._droppable = [(_template_regex(r.gguf), r) for r in self.rows if r.drop_when is not None]

    def drop_reason(self, canonical: str, arch_config: Any = None) -> str | None:
        """Why the table drops the tensor with this canonical (GGUF) name on purpose, or None.
        A GGUF converted from a checkpoint that holds such tensors (llama.cpp copies them) has
        them too, but they are no part of the model."""
        for regex, row in self._droppable:
            m = regex.fullmatch(canonical)
            if m and "bid" in m.groupdict():
                return row.drop_when(arch_config, int(m.group("bid")))
        return None

    def resolve(self, name: str, arch_config: Any = None) -> Mapped | None:
        if name.startswith(self.tower_prefixes):
            return Mapped(source=name, canonical=None, role=Role.TOWER)
        if name in self.top_level:
            return _mapped(name, self.top_level[name], None, arch_config)
        for prefix in self.text_prefixes:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            for regex, row in self._compiled:
                m = regex.fullmatch(rest)
                if m:
                    bid = int(m.group("bid")) if "bid" in m.groupdict() else None
                    return _mapped(name, row, bid, arch_config, m.groupdict().get("xid"))
        return None

    def to_hf(self, canonical: str, prefix: str, arch_config: Any = None) -> Mapped | None:
        """The table's row for a canonical (GGUF) name, read backwards: `source` is the HF name,
        the decoder's under `prefix` (one of `text_prefixes`); `dropped` says why the HF model has
        no place for it. None when no row names it."""
        for regex, row, in_text in self._by_canonical:
            m = regex.fullmatch(canonical)
            if m is None:
                continue
            bid = int(m["bid"]) if "bid" in regex.groupindex else None
            reason = row.drop_when(arch_config, bid) if row.drop_when and bid is not None else None
            hf = row.hf.format(bid=bid, xid=m.groupdict().get("xid")) if bid is not None else row.hf
            return Mapped(source=(prefix if in_text else "") + hf, canonical=canonical, role=row.role, bid=bid,
                          fuse=row.fuse, dropped=reason)
        return None

    def resolve_all(self, names: Iterable[str], arch_config: Any = None) -> list[Mapped]:
        mapped, unmapped = [], []
        for name in names:
            m = self.resolve(name, arch_config)
            (mapped if m is not None else unmapped).append(m or name)
        if unmapped:
            shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
            raise UnmappedTensorError(
                f"{len(unmapped)} tensor(s) have no row in the architecture's name table: {shown}; "
                "nvq maps every tensor or drops it on purpose, never silently."
            )
        return mapped


def _template_regex(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
    return re.compile(escaped.replace(re.escape("{xid}"), r"(?P<xid>\d+)"))


def _mapped(name: str, row: Row, bid: int | None, arch_config: Any, xid: str | None = None) -> Mapped:
    if row.drop_when is not None and bid is not None:
        reason = row.drop_when(arch_config, bid)
        if reason:
            return Mapped(source=name, canonical=None, role=None, bid=bid, dropped=reason)
    canonical = row.gguf.format(bid=bid, xid=xid) if bid is not None else row.gguf
    module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    return Mapped(source=name, canonical=canonical, role=row.role, bid=bid, module=module, fuse=row.fuse)


def linear_rows(pairs: Iterable[tuple[str, str, str | None]], with_bias: bool = True) -> list[Row]:
    """Rows for Linear modules: (HF module, GGUF stem, fusion group) → .weight (+ .bias) rows."""
    rows = []
    for hf, gguf, fuse in pairs:
        rows.append(Row(f"{hf}.weight", f"{gguf}.weight", Role.LINEAR, fuse))
        if with_bias:
            rows.append(Row(f"{hf}.bias", f"{gguf}.bias", Role.BIAS))
    return rows


def norm_rows(pairs: Iterable[tuple[str, str]]) -> list[Row]:
    return [Row(f"{hf}.weight", f"{gguf}.weight", Role.NORM) for hf, gguf in pairs]
