"""The config fields that shape a model, checked in one place: first each field's type and range
(FIELD_RULES), then the parsed config against the tensors' presence and shapes (SHAPE_RULES).

Convert, plan and GGUF → bf16 all pass through `check_fields` (from `for_config`) and
`check_tensors`, so a config that disagrees with its weights is refused before anything is
written: transformers would otherwise load random weights for the layers that are missing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from nvq.errors import ConfigError

_INT, _FLOAT = "an integer", "a finite number"

# field → (kind, smallest, largest). The upper bounds are far above any published model; they
# exist so that 1e9 layers or a 300-digit integer fail here, not in an allocation.
FIELD_RULES: dict[str, tuple[str, float, float]] = {
    "num_hidden_layers": (_INT, 1, 4096),
    "hidden_size": (_INT, 1, 1 << 18),
    "num_attention_heads": (_INT, 1, 4096),
    "num_key_value_heads": (_INT, 1, 4096),
    "head_dim": (_INT, 1, 1 << 14),
    "global_head_dim": (_INT, 1, 1 << 14),
    "num_global_key_value_heads": (_INT, 1, 4096),
    "intermediate_size": (_INT, 1, 1 << 20),
    "moe_intermediate_size": (_INT, 0, 1 << 20),
    "vocab_size": (_INT, 1, 1 << 24),
    "num_experts": (_INT, 0, 1 << 14),
    "num_local_experts": (_INT, 0, 1 << 14),
    "num_experts_per_tok": (_INT, 0, 1 << 14),
    "decoder_sparse_step": (_INT, 1, 4096),
    "top_k_experts": (_INT, 0, 1 << 14),
    "num_kv_shared_layers": (_INT, 0, 4096),
    "hidden_size_per_layer_input": (_INT, 0, 1 << 18),
    "sliding_window": (_INT, 1, 1 << 30),
    "sliding_window_pattern": (_INT, 1, 4096),
    "max_position_embeddings": (_INT, 1, 1 << 30),
    "rms_norm_eps": (_FLOAT, 1e-30, 1.0),
    "rope_theta": (_FLOAT, 1.0, 1e15),
    "query_pre_attn_scalar": (_FLOAT, 1e-30, 1e15),
    "final_logit_softcapping": (_FLOAT, 1e-30, 1e15),
    "attn_logit_softcapping": (_FLOAT, 1e-30, 1e15),
}
# Inside rope_parameters / rope_scaling (one dict, or one per layer type for Gemma).
ROPE_RULES: dict[str, tuple[str, float, float]] = {
    "rope_theta": (_FLOAT, 1.0, 1e15),
    "factor": (_FLOAT, 1e-6, 1e6),
    "partial_rotary_factor": (_FLOAT, 1e-6, 1.0),
    "low_freq_factor": (_FLOAT, 1e-6, 1e6),
    "high_freq_factor": (_FLOAT, 1e-6, 1e6),
    "original_max_position_embeddings": (_INT, 1, 1 << 30),
}
ROPE_TYPES = ("default", "linear", "llama3", "proportional")

# Fields that must agree with each other: (field, other field, rule, what the rule says).
PAIR_RULES: list[tuple[str, str, Callable[[int, int], bool], str]] = [
    ("num_attention_heads", "num_key_value_heads", lambda a, b: a % b == 0, "a multiple of"),
    ("num_kv_shared_layers", "num_hidden_layers", lambda a, b: a < b, "smaller than"),
    ("top_k_experts", "num_experts", lambda a, b: a <= b, "at most"),
    ("num_experts_per_tok", "num_experts", lambda a, b: a <= b, "at most"),
    ("num_experts_per_tok", "num_local_experts", lambda a, b: a <= b, "at most"),
]


def check_fields(cfg) -> None:
    """Each shaping field of an HFConfig, where present and not null, is of its kind and range."""
    for key, rule in FIELD_RULES.items():
        value = cfg.get(key)
        if value is not None:
            _check(cfg.path, key, value, rule)
    for key, other, holds, says in PAIR_RULES:
        a, b = cfg.get(key), cfg.get(other)
        if a is not None and b is not None and not holds(a, b):
            raise ConfigError(f"{cfg.path}: field '{key}' is {a}; it must be {says} '{other}' ({b}).")
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise ConfigError(f"{cfg.path}: field '{key}' is {_show(rope)}; it must be a mapping.")
        nested = [(f"{key}.{k}", v) for k, v in rope.items() if isinstance(v, Mapping)]
        for where, params in nested or [(key, rope)]:
            _check_rope(cfg.path, where, params)


def _check_rope(path, where: str, params: Mapping) -> None:
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{path}: field '{where}.rope_type' is {_show(kind)}; nvq supports {', '.join(ROPE_TYPES)}.")
    for key, rule in ROPE_RULES.items():
        if params.get(key) is not None:
            _check(path, f"{where}.{key}", params[key], rule)


def _check(path, key: str, value: Any, rule: tuple[str, float, float]) -> None:
    kind, low, high = rule
    ok_type = isinstance(value, int) if kind is _INT else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (kind is _FLOAT and not math.isfinite(value)) \
            or not low <= value <= high:
        raise ConfigError(f"{path}: field '{key}' is {_show(value)}; it must be {kind} from {low:g} to {high:g}.")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


# ---------------------------------------------------------------------------------------------
# Against the tensors. `shapes` maps canonical (GGUF-style) names to HF-orientation shapes.

_BLOCK = re.compile(r"blk\.(\d+)\.")


def _per_layer(value: Any, bid: int) -> Any:
    return value[bid] if isinstance(value, tuple) else value


# (config field, tensor, dimension, expected size from the parsed config and layer id; None when
# the architecture has no such field).
# The first layer is enough for uniform fields; per-layer tuples are checked on every layer.
SHAPE_RULES: list[tuple[str, str, int, Callable[[Any, int], int]]] = [
    ("vocab_size", "token_embd.weight", 0, lambda c, b: c.vocab_size),
    ("hidden_size", "token_embd.weight", 1, lambda c, b: c.hidden_size),
    ("hidden_size", "output_norm.weight", 0, lambda c, b: c.hidden_size),
    ("hidden_size", "blk.{bid}.attn_q.weight", 1, lambda c, b: c.hidden_size),
    ("num_attention_heads × head_dim", "blk.{bid}.attn_q.weight", 0,
     lambda c, b: c.num_heads * _per_layer(c.head_dim, b)),
    ("num_key_value_heads × head_dim", "blk.{bid}.attn_k.weight", 0,
     lambda c, b: _per_layer(c.num_kv_heads, b) * _per_layer(c.head_dim, b)),
    ("hidden_size", "blk.{bid}.attn_output.weight", 0, lambda c, b: c.hidden_size),
    ("intermediate_size", "blk.{bid}.ffn_gate.weight", 0,
     lambda c, b: _per_layer(getattr(c, "mlp_width", c.intermediate_size), b)),
    ("intermediate_size", "blk.{bid}.ffn_up.weight", 0,
     lambda c, b: _per_layer(getattr(c, "mlp_width", c.intermediate_size), b)),
    ("hidden_size", "blk.{bid}.ffn_down.weight", 0, lambda c, b: c.hidden_size),
    ("num_experts", "blk.{bid}.ffn_gate_up_exps.weight", 0, lambda c, b: getattr(c, "num_experts", None)),
    ("num_experts", "blk.{bid}.ffn_down_exps.weight", 0, lambda c, b: getattr(c, "num_experts", None)),
    ("moe_intermediate_size", "blk.{bid}.ffn_down_exps.weight", 2,
     lambda c, b: getattr(c, "moe_intermediate_size", None)),
    # Qwen3-MoE: gate and up stacked apart, or one Linear per expert (expert 0 stands for all)
    *[(field, f"blk.{{bid}}.ffn_{part}_exps.weight", dim, fn)
      for part in ("gate", "up")
      for field, dim, fn in (("num_experts", 0, lambda c, b: getattr(c, "num_experts", None)),
                             ("moe_intermediate_size", 1, lambda c, b: getattr(c, "moe_intermediate_size", None)))],
    ("moe_intermediate_size", "blk.{bid}.ffn_gate_exps.weight[0]", 0,
     lambda c, b: getattr(c, "moe_intermediate_size", None)),
    ("hidden_size", "blk.{bid}.ffn_down_exps.weight[0]", 0, lambda c, b: c.hidden_size),
]
REQUIRED = ("token_embd.weight", "output_norm.weight")


def check_tensors(where, config: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The parsed config agrees with the tensors: every layer 0..num_layers-1 has tensors and no
    other does, REQUIRED tensors exist, and SHAPE_RULES hold for every tensor present."""
    for name in REQUIRED:
        if name not in shapes:
            raise ConfigError(f"{where}: tensor '{name}' is missing; every model of this architecture has one.")
    layers = config.num_layers
    seen = {int(m.group(1)) for n in shapes if (m := _BLOCK.match(n))}
    beyond = sorted(b for b in seen if b >= layers)
    if beyond:
        example = next(n for n in sorted(shapes) if n.startswith(f"blk.{beyond[0]}."))
        raise ConfigError(f"{where}: field 'num_hidden_layers' is {layers} but tensor '{example}' belongs to "
                          f"layer {beyond[0]}.")
    missing = [b for b in range(layers) if b not in seen]
    if missing:
        raise ConfigError(f"{where}: field 'num_hidden_layers' is {layers} but no tensor of layer {missing[0]} "
                          f"(blk.{missing[0]}.*) exists; {len(missing)} layer(s) have no weights.")
    for field, template, dim, expected in SHAPE_RULES:
        for bid in range(layers) if "{bid}" in template else [None]:
            name = template.format(bid=bid)
            shape = shapes.get(name)
            if shape is None or len(shape) <= dim:
                continue
            want = expected(config, bid)
            if want is not None and shape[dim] != want:
                raise ConfigError(f"{where}: field '{field}' gives {want} but tensor '{name}' has shape "
                                  f"{list(shape)} (dimension {dim} is {shape[dim]}).")
