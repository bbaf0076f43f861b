"""Per-tensor plan: the architecture's name table and default policy, overridden by a recipe.

The plan is complete before a byte is written: every source tensor is quantized, kept, split
into per-expert modules, or dropped on purpose, and every impossible request is an error here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from nvq import schemes
from nvq.errors import RecipeError, TensorError
from nvq.io.hf import Checkpoint
from nvq.io.safetensors import OutputTensor
from nvq.layouts import vllm_names
from nvq.models import Architecture, config_rules, for_config
from nvq.models.base import EXPERT_ROLES, QUANTIZABLE_ROLES, Mapped, Role
from nvq.quant.recipe import Recipe, Rule

FLOAT_DTYPES = ("BF16", "F16", "F32")
# How one expert's slice of a fused stack is named: HF module suffix and GGUF stem (§3.2, §4.2).
EXPERT_PARTS = {
    Role.EXPERTS_GATE_UP: (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps")),
    Role.EXPERTS_DOWN: (("down_proj", "ffn_down_exps"),),
    Role.EXPERTS_GATE: (("gate_proj", "ffn_gate_exps"),),
    Role.EXPERTS_UP: (("up_proj", "ffn_up_exps"),),
}


@dataclass(frozen=True)
class Unit:
    """One weight of the output: a whole source tensor, or one expert's slice of a fused stack."""

    source: str  # source tensor name
    rows: tuple[int, int] | None  # row range in the source's 2-D view; None = whole tensor
    shape: tuple[int, ...]  # logical shape of this unit
    dtype: str  # source safetensors dtype
    role: Role
    canonical: str | None  # GGUF name (expert slices: the per-expert stem plus [e])
    out: str  # output tensor name when kept; module path when quantized
    scheme: str | None  # None = kept dense
    group: str | None  # fusion group: members share one NVFP4 global scale
    rule: int | None = None  # recipe rule that decided, if any

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
    source: str
    arch: Architecture
    scheme: str
    recipe: Recipe
    units: list[Unit]
    dropped: list[Mapped]
    warnings: list[str] = field(default_factory=list)
    layout: schemes.Layout | None = None

    @property
    def group_size(self) -> int:
        return self.layout.group_size

    @property
    def quantized(self) -> list[Unit]:
        return [u for u in self.units if u.scheme]

    @property
    def kept(self) -> list[Unit]:
        return [u for u in self.units if not u.scheme]

    def groups(self) -> list[list[Unit]]:
        """Units in plan order, fusion-group members together (quantized first in their group)."""
        by_key: OrderedDict[str, list[Unit]] = OrderedDict()
        for u in self.units:
            key = u.group if (u.scheme and u.group) else f"\0{u.source}:{u.out}"
            by_key.setdefault(key, []).append(u)
        return list(by_key.values())

    def output_tensors(self) -> list[OutputTensor]:
        out: list[OutputTensor] = []
        for u in self.units:
            if u.scheme:
                out.extend(self.layout.output_tensors(u.out, u.shape))
            else:
                out.append(OutputTensor(u.out, u.dtype, u.shape))
        return out

    def dense_modules(self) -> list[str]:
        """Linear modules (and routers) kept dense, by HF module name."""
        return sorted({u.out.rsplit(".", 1)[0] for u in self.kept if u.role in (Role.LINEAR, Role.ROUTER)})

    def dense_expert_stacks(self) -> list[str]:
        """Fused expert stacks kept dense, by HF module name ("….layers.0.experts")."""
        return sorted({u.out.rsplit(".", 1)[0] for u in self.kept if u.role in EXPERT_ROLES})

    def linear_modules(self) -> set[str]:
        """Every Linear module of the output, quantized or dense."""
        return {u.out if u.scheme else u.out.rsplit(".", 1)[0] for u in self.units if u.role is Role.LINEAR}

    def ignore_list(self) -> list[str]:
        """Dense modules a compressed-tensors config must name (all else is quantized): dense
        Linears with the shards vLLM fuses them with that the checkpoint lacks, dense expert
        stacks as patterns of vLLM's names for them, and the architecture's towers."""
        dense = self.dense_modules()
        placeholders = vllm_names.absent_siblings(dense, self.linear_modules())
        stacks = [f"re:{vllm_names.expert_stack_regex(m)}" for m in self.dense_expert_stacks()]
        named = sorted(set(dense) | set(placeholders))
        return ["lm_head", *[m for m in named if m != "lm_head"], *stacks, *self.arch.ignore_patterns]


def build_plan(ckpt: Checkpoint, scheme: str, recipe: Recipe, group_size: int | None = None) -> Plan:
    layout = schemes.quantizing(scheme).layout(group_size)
    if ckpt.config.get("quantization_config", None) is not None:
        raise TensorError(
            f"{ckpt.path}: the checkpoint is already quantized (config.json has a quantization_config); "
            "convert takes a dense checkpoint."
        )
    arch = for_config(ckpt.config)
    mapped = arch.table.resolve_all(ckpt.tensors, arch.config)
    config_rules.check_tensors(ckpt.path, arch.config,
                               {m.canonical: ckpt.tensors[m.source].shape for m in mapped if m.canonical})
    units: list[Unit] = []
    used_rules: set[int] = set()
    for m in mapped:
        if m.dropped:
            continue
        info = ckpt.tensors[m.source]
        rule = _decide(m, recipe) if m.role in QUANTIZABLE_ROLES else None
        quantize = m.role in QUANTIZABLE_ROLES and (rule is None or rule.scheme is not None)
        if rule is not None:
            used_rules.add(rule.index)
            if rule.scheme is not None and rule.scheme != scheme:
                raise RecipeError(
                    f"recipe {recipe.name}, rule {rule.index} asks for {rule.scheme} on {m.canonical} "
                    f"but this run writes {scheme}; one checkpoint holds one scheme (use null to keep dense)."
                )
        picked = scheme if quantize else None
        units.extend(_units(m, info.shape, info.dtype, picked, rule))
    for u in units:
        if u.scheme:
            _check_quantizable(u, ckpt, layout)
    _check_fusion_groups(units)
    warnings = [
        f"recipe {recipe.name}, rule {r.index} ('{r.pattern.pattern}') matched no quantizable tensor"
        for r in recipe.rules
        if r.index not in used_rules
    ]
    dropped = [m for m in mapped if m.dropped]
    return Plan(str(ckpt.path), arch, scheme, recipe, units, dropped, warnings, layout)


def _decide(m: Mapped, recipe: Recipe) -> Rule | None:
    return recipe.first_match((m.canonical or "", m.source))


def _units(m: Mapped, shape: tuple[int, ...], dtype: str, scheme: str | None, rule: Rule | None) -> list[Unit]:
    rule_index = rule.index if rule else None
    if m.role not in EXPERT_ROLES or scheme is None:
        # A kept expert stack stays fused and keeps its name: transformers loads it as it was.
        group = f"{m.module.rsplit('.', 1)[0]}:{m.fuse}" if (m.fuse and m.module) else None
        out = m.module if scheme else m.source
        return [Unit(m.source, None, tuple(shape), dtype, m.role, m.canonical, out, scheme, group, rule_index)]
    if len(shape) != 3:
        raise TensorError(f"{m.source}: expected a 3-D expert stack [experts, rows, cols], found shape {list(shape)}.")
    n_experts, rows, cols = shape
    parts = EXPERT_PARTS[m.role]
    part_rows = rows // len(parts)
    stem = m.canonical.rsplit(".", 2)[0]  # "blk.N"
    experts = m.source.rsplit(".", 1)[0]  # "….experts": per-expert modules hang below it
    units = []
    for e in range(n_experts):
        for p, (hf_suffix, gguf_stem) in enumerate(parts):
            start = e * rows + p * part_rows
            units.append(
                Unit(
                    source=m.source,
                    rows=(start, start + part_rows),
                    shape=(part_rows, cols),
                    dtype=dtype,
                    role=m.role,
                    canonical=f"{stem}.{gguf_stem}.weight[{e}]",
                    out=f"{experts}.{e}.{hf_suffix}",
                    scheme=scheme,
                    # each expert's gate (w1) and up (w3) share one global scale (formats.md §1.3)
                    group=f"{experts}.{e}:gate_up" if m.role is Role.EXPERTS_GATE_UP else None,
                    rule=rule_index,
                )
            )
    return units


def _check_quantizable(u: Unit, ckpt: Checkpoint, layout: schemes.Layout) -> None:
    where = f"{ckpt.tensors[u.source].path.name}: tensor {u.source}"
    if u.dtype not in FLOAT_DTYPES:
        raise TensorError(f"{where} has dtype {u.dtype}; only {', '.join(FLOAT_DTYPES)} weights can be quantized.")
    if len(u.shape) != 2:
        raise TensorError(f"{where} has shape {list(u.shape)}; a quantized weight must be 2-D [out, in].")
    problem = layout.shape_problem(u.shape)
    if problem:
        raise TensorError(f"{where}: {problem}; keep it dense with a recipe rule (scheme: null).")


def _check_fusion_groups(units: list[Unit]) -> None:
    # vLLM fuses q/k/v and gate/up into one layer: its shards must all be quantized or all dense.
    status: dict[str, set[bool]] = {}
    for u in units:
        if u.role is Role.LINEAR and u.group:
            status.setdefault(u.group, set()).add(bool(u.scheme))
    mixed = sorted(k for k, v in status.items() if len(v) > 1)
    if mixed:
        raise RecipeError(
            f"fusion group {mixed[0]} mixes quantized and dense members; vLLM fuses them into one layer, "
            "so a recipe must keep all of them or quantize all of them."
        )
