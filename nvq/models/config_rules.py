"""The config fields that shape a model, checked in one place: first each field's type and range
(FIELD_RULES), then the parsed config against the tensors: which exist (PRESENCE_RULES) and their
shapes (SHAPE_RULES).

Convert, plan, GGUF → bf16 and verify (the candidate's own tensors) all pass through
`check_fields` (from `for_config`) and `check_tensors`, so a config that disagrees with its
weights is refused before anything is written: transformers would otherwise load random weights
for the layers that are missing.
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
    "vocab_size_per_layer_input": (_INT, 0, 1 << 24),
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
# Against the tensors. `shapes` maps canonical (GGUF-style) names to HF-orientation shapes. The
# accessors below read the parsed config of any architecture (llama, gemma3, gemma4): per-layer
# tuples are indexed by layer, and a field the architecture lacks reads as its neutral value.

_BLOCK = re.compile(r"blk\.(\d+)\.")
_FULL = "full_attention"


def _per_layer(value: Any, bid: int) -> Any:
    return value[bid] if isinstance(value, tuple) else value


def _owns_kv(c: Any, b: int) -> bool:
    # KV-shared layers (Gemma-4 E2B/E4B) read a donor's cache: K/V tensors there are unused.
    return b < getattr(c, "first_kv_shared", c.num_layers)


def _full_with_own_dims(c: Any, b: int) -> bool:
    """A Gemma-4 full-attention layer: its head dim and KV heads come from the global_* fields."""
    return isinstance(c.head_dim, tuple) and c.layer_types[b] == _FULL


def _head_dim(c: Any, b: int) -> int:
    return _per_layer(c.head_dim, b)


def _kv_rows(c: Any, b: int) -> int | None:
    return _per_layer(c.num_kv_heads, b) * _head_dim(c, b) if _owns_kv(c, b) else None


def _ffn(c: Any, b: int) -> int:
    return _per_layer(getattr(c, "mlp_width", c.intermediate_size), b)


def _experts(c: Any, b: int) -> int | None:
    return getattr(c, "num_experts", 0) or None


def _moe(c: Any, b: int) -> int | None:
    return getattr(c, "moe_intermediate_size", 0) or None


def _ple(c: Any, b: int) -> int | None:
    return getattr(c, "per_layer_input_size", 0) or None


def _times(f: Callable[[Any, int], int | None], k: Callable[[Any], int]) -> Callable[[Any, int], int | None]:
    return lambda c, b: None if f(c, b) is None else f(c, b) * k(c)


def _hidden(c: Any, b: int | None) -> int:
    return c.hidden_size


def _vocab(c: Any, b: int | None) -> int:
    return c.vocab_size


def _q_rows(c: Any, b: int) -> int:
    return c.num_heads * _head_dim(c, b)


def _k_head_dim(c: Any, b: int) -> int | None:
    return _head_dim(c, b) if _owns_kv(c, b) else None


def _ple_rows(c: Any, b: int | None) -> int | None:
    return getattr(c, "vocab_size_per_layer_input", 0) or None


def _hidden_if_own_kv(c: Any, b: int) -> int | None:
    return c.hidden_size if _owns_kv(c, b) else None


_ple_all = _times(_ple, lambda c: c.num_layers)

# Field names as the user's config.json spells them; Gemma-4 full-attention layers take their
# head dim and KV heads from the global_* fields (gemma4.md §1.2).
_HD_NAME = "{hd}"
_Q_NAME = "num_attention_heads × {hd}"
_KV_NAME = "{kv} × {hd}"
_FFN_NAME = "intermediate_size"
_PLE_NAME = "hidden_size_per_layer_input"
_BY_LAYER_TYPE = {_HD_NAME, _Q_NAME, _KV_NAME, "attention_k_eq_v"}
_PLE_ALL_NAME = "num_hidden_layers × hidden_size_per_layer_input"


def _names(c: Any, b: int | None) -> dict[str, str]:
    full = b is not None and _full_with_own_dims(c, b)
    kv_global = full and getattr(c, "has_v_proj", (True,) * (b + 1))[b] is False
    return {"hd": "global_head_dim" if full else "head_dim",
            "kv": "num_global_key_value_heads" if kv_global else "num_key_value_heads"}


# (config field, tensor, dimension, expected size from the parsed config and layer id; None
# when the architecture or layer has no such size). Every rule runs on every layer, so
# per-layer sizes (Gemma-4 head dims, double-wide MLPs) are all checked.
SHAPE_RULES: list[tuple[str, str, int, Callable[[Any, int], int | None]]] = [
    ("vocab_size", "token_embd.weight", 0, _vocab),
    ("hidden_size", "token_embd.weight", 1, _hidden),
    ("hidden_size", "output_norm.weight", 0, _hidden),
    ("vocab_size", "output.weight", 0, _vocab),
    ("hidden_size", "output.weight", 1, _hidden),
    ("hidden_size", "blk.{bid}.attn_q.weight", 1, _hidden),
    (_Q_NAME, "blk.{bid}.attn_q.weight", 0, _q_rows),
    (_KV_NAME, "blk.{bid}.attn_k.weight", 0, _kv_rows),
    ("hidden_size", "blk.{bid}.attn_k.weight", 1, _hidden_if_own_kv),
    (_KV_NAME, "blk.{bid}.attn_v.weight", 0, _kv_rows),
    ("hidden_size", "blk.{bid}.attn_v.weight", 1, _hidden_if_own_kv),
    ("hidden_size", "blk.{bid}.attn_output.weight", 0, _hidden),
    (_Q_NAME, "blk.{bid}.attn_output.weight", 1, _q_rows),
    (_Q_NAME, "blk.{bid}.attn_q.bias", 0, _q_rows),
    (_KV_NAME, "blk.{bid}.attn_k.bias", 0, _kv_rows),
    (_KV_NAME, "blk.{bid}.attn_v.bias", 0, _kv_rows),
    ("hidden_size", "blk.{bid}.attn_output.bias", 0, _hidden),
    (_HD_NAME, "blk.{bid}.attn_q_norm.weight", 0, _head_dim),
    (_HD_NAME, "blk.{bid}.attn_k_norm.weight", 0, _k_head_dim),
    (_FFN_NAME, "blk.{bid}.ffn_gate.weight", 0, _ffn),
    (_FFN_NAME, "blk.{bid}.ffn_up.weight", 0, _ffn),
    ("hidden_size", "blk.{bid}.ffn_down.weight", 0, _hidden),
    ("hidden_size", "blk.{bid}.ffn_gate.weight", 1, _hidden),
    ("hidden_size", "blk.{bid}.ffn_up.weight", 1, _hidden),
    (_FFN_NAME, "blk.{bid}.ffn_down.weight", 1, _ffn),
    (_FFN_NAME, "blk.{bid}.ffn_gate.bias", 0, _ffn),
    (_FFN_NAME, "blk.{bid}.ffn_up.bias", 0, _ffn),
    ("hidden_size", "blk.{bid}.ffn_down.bias", 0, _hidden),
    *[("hidden_size", f"blk.{{bid}}.{n}.weight", 0, _hidden) for n in (
        "attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm", "pre_ffw_norm_2",
        "post_ffw_norm_1", "post_ffw_norm_2", "post_norm")],
    # Gemma-4 MoE: router [E, H] and scale [H], experts [E, 2·Ie, H] and [E, H, Ie], per_expert_scale [E]
    ("num_experts", "blk.{bid}.ffn_gate_inp.weight", 0, _experts),
    ("hidden_size", "blk.{bid}.ffn_gate_inp.weight", 1, _hidden),
    ("hidden_size", "blk.{bid}.ffn_gate_inp.scale", 0, _hidden),
    ("num_experts", "blk.{bid}.ffn_down_exps.scale", 0, _experts),
    ("num_experts", "blk.{bid}.ffn_gate_up_exps.weight", 0, _experts),
    ("2 × moe_intermediate_size", "blk.{bid}.ffn_gate_up_exps.weight", 1, _times(_moe, lambda c: 2)),
    ("hidden_size", "blk.{bid}.ffn_gate_up_exps.weight", 2, _hidden),
    ("num_experts", "blk.{bid}.ffn_down_exps.weight", 0, _experts),
    ("hidden_size", "blk.{bid}.ffn_down_exps.weight", 1, _hidden),
    ("moe_intermediate_size", "blk.{bid}.ffn_down_exps.weight", 2, _moe),
    # Gemma-4 per-layer embeddings (PLE): table [Vp, L·P], projection [L·P, H], gate [P, H], proj [H, P]
    ("vocab_size_per_layer_input", "per_layer_token_embd.weight", 0, _ple_rows),
    (_PLE_ALL_NAME, "per_layer_token_embd.weight", 1, _ple_all),
    (_PLE_ALL_NAME, "per_layer_model_proj.weight", 0, _ple_all),
    ("hidden_size", "per_layer_model_proj.weight", 1, _hidden),
    (_PLE_NAME, "per_layer_proj_norm.weight", 0, _ple),
    (_PLE_NAME, "blk.{bid}.inp_gate.weight", 0, _ple),
    ("hidden_size", "blk.{bid}.inp_gate.weight", 1, _hidden),
    ("hidden_size", "blk.{bid}.proj.weight", 0, _hidden),
    (_PLE_NAME, "blk.{bid}.proj.weight", 1, _ple),
    # Qwen3-MoE: gate and up stacked apart [E, Ie, H], or one Linear per expert (expert 0 stands for all)
    *[(field, f"blk.{{bid}}.ffn_{part}_exps.weight", dim, fn)
      for part in ("gate", "up")
      for field, dim, fn in (("num_experts", 0, _experts), ("moe_intermediate_size", 1, _moe),
                             ("hidden_size", 2, _hidden))],
    ("moe_intermediate_size", "blk.{bid}.ffn_gate_exps.weight[0]", 0, _moe),
    ("moe_intermediate_size", "blk.{bid}.ffn_up_exps.weight[0]", 0, _moe),
    ("hidden_size", "blk.{bid}.ffn_gate_exps.weight[0]", 1, _hidden),
    ("hidden_size", "blk.{bid}.ffn_down_exps.weight[0]", 0, _hidden),
    ("moe_intermediate_size", "blk.{bid}.ffn_down_exps.weight[0]", 1, _moe),
]


def _dense_mlp(c: Any, b: int) -> bool | None:
    # Qwen3-MoE replaces the dense MLP on its MoE layers; Gemma-4 keeps both
    moe = getattr(c, "moe_layers", ())
    return None if moe and moe[b] else True


def _kv_tensor(c: Any, b: int, wanted: bool) -> bool | None:
    return wanted if _owns_kv(c, b) else None


# (config field, its value for the message, tensor, whether it must exist: True, must not: False,
# either: None). An absent tensor the config calls for would be random-initialized by
# transformers; a present one it does not call for would be silently ignored.
PRESENCE_RULES: list[tuple[str, Callable[[Any], Any], str, Callable[[Any, int], bool | None]]] = [
    ("num_hidden_layers", lambda c: c.num_layers, "blk.{bid}.attn_q.weight", lambda c, b: True),
    ("num_hidden_layers", lambda c: c.num_layers, "blk.{bid}.attn_output.weight", lambda c, b: True),
    *[("num_hidden_layers", lambda c: c.num_layers, f"blk.{{bid}}.ffn_{part}.weight", _dense_mlp)
      for part in ("gate", "up", "down")],
    ("num_hidden_layers", lambda c: c.num_layers, "blk.{bid}.attn_k.weight",
     lambda c, b: None if hasattr(c, "first_kv_shared") else _kv_tensor(c, b, True)),
    # Gemma-4 KV-shared layers own no K/V; every other layer does
    ("num_kv_shared_layers", lambda c: c.num_layers - c.first_kv_shared, "blk.{bid}.attn_k.weight",
     lambda c, b: _kv_tensor(c, b, True) if hasattr(c, "first_kv_shared") else None),
    ("num_hidden_layers", lambda c: c.num_layers, "blk.{bid}.attn_v.weight",
     lambda c, b: None if hasattr(c, "has_v_proj") else _kv_tensor(c, b, True)),
    # Gemma-4 k_eq_v full layers have no v_proj (V is the raw K projection): absent there only
    ("attention_k_eq_v", lambda c: not all(c.has_v_proj), "blk.{bid}.attn_v.weight",
     lambda c, b: _kv_tensor(c, b, c.has_v_proj[b]) if hasattr(c, "has_v_proj") else None),
    ("num_experts", lambda c: getattr(c, "num_experts", 0), "blk.{bid}.ffn_gate_inp.weight",
     lambda c, b: bool(_experts(c, b))),
    ("num_experts", lambda c: getattr(c, "num_experts", 0), "blk.{bid}.ffn_gate_up_exps.weight",
     lambda c, b: bool(_experts(c, b)) if not hasattr(c, "moe_layers") else None),
    ("num_experts", lambda c: getattr(c, "num_experts", 0), "blk.{bid}.ffn_down_exps.weight",
     lambda c, b: bool(_experts(c, b)) if not hasattr(c, "moe_layers") else None),
    *[(_PLE_NAME, lambda c: getattr(c, "per_layer_input_size", 0), name, lambda c, b: bool(_ple(c, b)))
      for name in ("per_layer_token_embd.weight", "per_layer_model_proj.weight", "blk.{bid}.inp_gate.weight",
                   "blk.{bid}.proj.weight")],
    ("tie_word_embeddings", lambda c: getattr(c, "tie_word_embeddings", True), "output.weight",
     lambda c, b: True if getattr(c, "tie_word_embeddings", True) is False else None),
]
REQUIRED = ("token_embd.weight", "output_norm.weight")


def check_tensors(where, config: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The parsed config agrees with the tensors: every layer 0..num_layers-1 has tensors and no
    other does, REQUIRED tensors exist, PRESENCE_RULES and SHAPE_RULES hold."""
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
    for field, value, template, wanted in PRESENCE_RULES:
        for bid in range(layers) if "{bid}" in template else [0]:
            name = template.format(bid=bid)
            must = wanted(config, bid)
            if must is None or (name in shapes) == must:
                continue
            state = "is missing" if must else "exists"
            raise ConfigError(f"{where}: field '{field}' is {_show(value(config))} but tensor '{name}' {state}; "
                              f"the config and the weights describe different models.{_layer_type(config, bid, field)}")
    for field, template, dim, expected in SHAPE_RULES:
        for bid in range(layers) if "{bid}" in template else [None]:
            name = template.format(bid=bid)
            shape = shapes.get(name)
            if shape is None or len(shape) <= dim:
                continue
            want = expected(config, bid)
            if want is not None and shape[dim] != want:
                raise ConfigError(f"{where}: field '{field.format(**_names(config, bid))}' gives {want} but tensor "
                                  f"'{name}' has shape {list(shape)} (dimension {dim} is {shape[dim]})."
                                  f"{_layer_type(config, bid, field)}")


def _layer_type(config: Any, bid: int | None, field: str) -> str:
    # Gemma-4 attention sizes differ by layer type, so a shifted layer_types shows up here.
    if bid is None or not isinstance(config.head_dim, tuple) or field not in _BY_LAYER_TYPE:
        return ""
    return f" Layer {bid} is {config.layer_types[bid]} in layer_types."
