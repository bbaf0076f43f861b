"""Per-architecture facts for reading a GGUF back into Hugging Face terms, kept as data.

For every `general.architecture` nvq reads, an `ArchSpec` says:
- which HF class and model_type the dense checkpoint is written as, and under which prefix the
  decoder's tensors live (the architecture module's name table supplies the rest of each name);
- `keys`: GGUF metadata key → HF config field, one row each (scalars that copy over);
- `derived`: small named functions for HF fields that need several keys or the tensors
  (vocab size from token_embd rows, layer_types from the sliding-window pattern, Gemma-4's
  proportional RoPE factor from `rope_freqs`, ...);
- `fixes`: the converter-side value transforms to undo (gemma4.md §8: Llama Q/K row
  permutation, Gemma-1..3 norm weights stored as 1 + w). Gemma-4 has none.
- `consumed`: GGUF tensors that are not HF weights (llama.cpp generates `rope_freqs`).

Hyper-parameters that the GGUF does not hold are taken from llama.cpp's own hard-coded values
(oracle.md §1 "converter-side transforms", gemma4.md §4.3) and listed in `constants`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nvq.errors import ConfigError
from nvq.io.gguf import GGUFFile

REQUIRED = object()  # Key.default: the key must be present
OMIT = object()  # Key.default: leave the HF field out (transformers' default applies)

FULL = "full_attention"
SLIDING = "sliding_attention"


def f32(value: Any) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (9.9999997e-06 → 1e-05)."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class Key:
    """One GGUF metadata key copied into one HF config field."""

    gguf: str  # without the "{arch}." prefix; keys starting "general." / "tokenizer." are global
    hf: str
    kind: Callable[[Any], Any] = int
    default: Any = REQUIRED


class Meta:
    """The GGUF as the config tables see it: metadata with the arch prefix resolved, tensor names."""

    def __init__(self, gf: GGUFFile, arch: str):
        self.gf, self.arch = gf, arch

    def full_key(self, key: str) -> str:
        return key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"

    def has(self, key: str) -> bool:
        return self.full_key(key) in self.gf.metadata

    def get(self, key: str, default: Any = None) -> Any:
        return self.gf.metadata.get(self.full_key(key), default)

    def require(self, key: str) -> Any:
        full = self.full_key(key)
        if full not in self.gf.metadata:
            raise ConfigError(f"{self.gf.path} has no '{full}' metadata key, which {self.arch} needs.")
        return self.gf.metadata[full]

    def scalar(self, key: str, default: Any = REQUIRED) -> Any:
        value = self.require(key) if default is REQUIRED else self.get(key, default)
        if isinstance(value, list):
            raise ConfigError(
                f"{self.gf.path}: '{self.full_key(key)}' is a per-layer array; nvq expects one value there."
            )
        return value

    def per_layer(self, key: str, n_layers: int, default: Any = REQUIRED) -> list:
        """A key that may be one value or one per layer, as a list of n_layers values."""
        value = self.require(key) if default is REQUIRED else self.get(key, default)
        if not isinstance(value, list):
            return [value] * n_layers
        if len(value) != n_layers:
            raise ConfigError(
                f"{self.gf.path}: '{self.full_key(key)}' has {len(value)} entries for {n_layers} layers."
            )
        return value

    def has_tensor(self, name: str) -> bool:
        return name in self.gf.tensors

    def rows(self, name: str) -> int:
        """Leading (numpy) dimension of a tensor: the vocabulary of an embedding table."""
        return self.gf.info(name).shape[0]


# ---------------------------------------------------------------------------------------------
# Conventions to undo, one chunk of rows at a time (converters stream big tensors)


@dataclass(frozen=True)
class Unpermute:
    """Undo `LlamaModel.permute` (gemma4.md §8): per head, GGUF row 2j = HF row j and GGUF row
    2j+1 = HF row j + d/2. `heads` is "q" (n_head) or "k" (n_head_kv); works on weights and
    biases."""

    heads: str
    description: str = "Llama Q/K row permutation undone"

    def group_rows(self, dims: tuple[int, int, int]) -> int:
        return dims[2]  # one head: head_dim rows

    def __call__(self, chunk: torch.Tensor, dims: tuple[int, int, int]) -> torch.Tensor:
        d = dims[2]
        if chunk.shape[0] % d or d % 2:
            raise ConfigError(
                f"a chunk of {chunk.shape[0]} rows cannot be un-permuted in heads of {d} rows."
            )
        n = chunk.shape[0] // d
        rest = chunk.shape[1:]
        return chunk.reshape(n, d // 2, 2, *rest).transpose(1, 2).reshape(chunk.shape).contiguous()


@dataclass(frozen=True)
class Shift:
    """Add `delta` to every element (Gemma-1..3 norms: GGUF stores 1 + w, HF w)."""

    delta: float
    description: str = "norm weight stored as 1 + w; 1 subtracted"

    def group_rows(self, dims: tuple[int, int, int]) -> int:
        return 1

    def __call__(self, chunk: torch.Tensor, dims: tuple[int, int, int]) -> torch.Tensor:
        return chunk + self.delta


@dataclass(frozen=True)
class Fix:
    pattern: str  # full match on the canonical tensor name
    transform: Unpermute | Shift

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


# ---------------------------------------------------------------------------------------------
# Derived fields


def _vocab(m: Meta, cfg: dict) -> None:
    cfg["vocab_size"] = m.rows("token_embd.weight")


def _tied(m: Meta, cfg: dict) -> None:
    cfg["tie_word_embeddings"] = not m.has_tensor("output.weight")


def _special_ids(m: Meta, cfg: dict) -> None:
    for what in ("bos", "eos", "pad"):
        key = "tokenizer.ggml." + ("padding" if what == "pad" else what) + "_token_id"
        if m.has(key):
            cfg[f"{what}_token_id"] = int(m.scalar(key))


def _heads(m: Meta, cfg: dict) -> None:
    heads = cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = int(m.scalar("attention.head_count_kv", heads))
    head_dim = m.scalar("attention.key_length", None)
    cfg["head_dim"] = int(head_dim) if head_dim is not None else cfg["hidden_size"] // heads


def _llama_rope(m: Meta, cfg: dict) -> None:
    if m.has_tensor("rope_freqs.weight"):
        raise ConfigError(
            f"{m.gf.path} carries rope_freqs (Llama-3-style RoPE scaling), whose parameters the "
            f"GGUF does not keep; nvq cannot rebuild its HF config."
        )
    rope_dims = m.scalar("rope.dimension_count", cfg["head_dim"])
    if rope_dims != cfg["head_dim"]:
        raise ConfigError(
            f"{m.gf.path}: rope.dimension_count is {rope_dims} but head_dim is {cfg['head_dim']}; "
            f"HF Llama rotates whole heads."
        )
    cfg["rope_parameters"] = _rope(m, f32(m.scalar("rope.freq_base", 10000.0)))


def _rope(m: Meta, theta: float) -> dict:
    kind = m.scalar("rope.scaling.type", "none")
    if kind in ("none", None):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "factor": f32(m.scalar("rope.scaling.factor")), "rope_theta": theta}
    raise ConfigError(
        f"{m.gf.path}: rope.scaling.type is '{kind}'; nvq rebuilds 'none' and 'linear' only."
    )


def _biases(m: Meta, cfg: dict) -> None:
    cfg["attention_bias"] = m.has_tensor("blk.0.attn_q.bias") or m.has_tensor("blk.0.attn_qkv.bias")
    cfg["mlp_bias"] = m.has_tensor("blk.0.ffn_up.bias")


def _attention_bias(m: Meta, cfg: dict) -> None:
    cfg["attention_bias"] = m.has_tensor("blk.0.attn_q.bias") or m.has_tensor("blk.0.attn_qkv.bias")


def _qwen3_moe(m: Meta, cfg: dict) -> None:
    # llama.cpp's qwen3moe graph runs every layer as MoE with renormalized top-k weights.
    cfg["num_experts"] = int(m.scalar("expert_count"))
    cfg["num_experts_per_tok"] = int(m.scalar("expert_used_count"))
    cfg["moe_intermediate_size"] = int(m.scalar("expert_feed_forward_length"))
    cfg["intermediate_size"] = int(m.scalar("feed_forward_length", cfg["moe_intermediate_size"]))


def _gemma3_layers(m: Meta, cfg: dict) -> None:
    n = cfg["num_hidden_layers"]
    if m.has("attention.sliding_window_pattern"):
        pattern = m.per_layer("attention.sliding_window_pattern", n)
        cfg["layer_types"] = [SLIDING if s else FULL for s in pattern]
    else:
        # Not in gemma3 GGUFs: llama.cpp hard-codes pattern 6 (il % 6 < 5 is sliding).
        cfg["layer_types"] = [SLIDING if i % 6 < 5 else FULL for i in range(n)]


def _gemma3_attention(m: Meta, cfg: dict) -> None:
    # Not in the GGUF: llama.cpp uses 1/√head_dim, and 1/√(H/Hq) on the 62-layer 27B.
    if cfg["num_hidden_layers"] == 62:
        cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    else:
        cfg["query_pre_attn_scalar"] = cfg["head_dim"]


def _gemma3_rope(m: Meta, cfg: dict) -> None:
    cfg["rope_parameters"] = {
        # Older GGUFs lack freq_base_swa; llama.cpp's default is 10000.
        SLIDING: {"rope_type": "default", "rope_theta": f32(m.scalar("rope.freq_base_swa", 10000.0))},
        FULL: _rope(m, f32(m.scalar("rope.freq_base", 1000000.0))),
    }


def _gemma4_layers(m: Meta, cfg: dict) -> None:
    pattern = m.per_layer("attention.sliding_window_pattern", cfg["num_hidden_layers"])
    if not all(isinstance(s, bool) for s in pattern):
        raise ConfigError(f"{m.gf.path}: gemma4.attention.sliding_window_pattern must be a bool array.")
    cfg["layer_types"] = [SLIDING if s else FULL for s in pattern]


def _gemma4_attention(m: Meta, cfg: dict) -> None:
    n, types = cfg["num_hidden_layers"], cfg["layer_types"]
    cfg["head_dim"] = int(m.scalar("attention.key_length_swa"))
    cfg["global_head_dim"] = int(m.scalar("attention.key_length"))
    kv = [int(k) for k in m.per_layer("attention.head_count_kv", n)]
    swa_kv = {k for k, t in zip(kv, types, strict=True) if t == SLIDING}
    full_kv = {k for k, t in zip(kv, types, strict=True) if t == FULL}
    if len(swa_kv) > 1 or len(full_kv) > 1:
        raise ConfigError(
            f"{m.gf.path}: gemma4.attention.head_count_kv {kv} varies within a layer type; "
            f"Gemma-4 configs have one value per type."
        )
    cfg["num_key_value_heads"] = next(iter(swa_kv or full_kv))
    # k_eq_v: a full layer that owns its KV (not shared) but has no attn_v (gemma4.md §9).
    first_shared = n - cfg["num_kv_shared_layers"]
    k_eq_v = any(
        t == FULL and i < first_shared and not _has_v(m, i) for i, t in enumerate(types)
    )
    cfg["attention_k_eq_v"] = k_eq_v
    global_kv = next(iter(full_kv or swa_kv))
    if k_eq_v:
        cfg["num_global_key_value_heads"] = global_kv
    elif global_kv != cfg["num_key_value_heads"]:
        raise ConfigError(
            f"{m.gf.path}: full layers have {global_kv} KV heads and sliding layers "
            f"{cfg['num_key_value_heads']} without k_eq_v, which a Gemma-4 HF config cannot express."
        )


def _has_v(m: Meta, bid: int) -> bool:
    return m.has_tensor(f"blk.{bid}.attn_v.weight") or m.has_tensor(f"blk.{bid}.attn_qkv.weight")


def _gemma4_mlp(m: Meta, cfg: dict) -> None:
    n = cfg["num_hidden_layers"]
    widths = [int(w) for w in m.per_layer("feed_forward_length", n)]
    first_shared = n - cfg["num_kv_shared_layers"]
    base = widths[0]
    double = any(w != base for w in widths)
    expected = [base * (2 if double and i >= first_shared else 1) for i in range(n)]
    if widths != expected:
        raise ConfigError(
            f"{m.gf.path}: gemma4.feed_forward_length {widths} is neither one width nor the "
            f"double-wide pattern of the KV-shared layers."
        )
    cfg["intermediate_size"] = base
    cfg["use_double_wide_mlp"] = double


def _gemma4_moe(m: Meta, cfg: dict) -> None:
    experts = int(m.scalar("expert_count", 0) or 0)
    cfg["enable_moe_block"] = experts > 0
    cfg["num_experts"] = experts or None
    cfg["top_k_experts"] = int(m.scalar("expert_used_count")) if experts else None
    cfg["moe_intermediate_size"] = int(m.scalar("expert_feed_forward_length")) if experts else None


def _gemma4_rope(m: Meta, cfg: dict) -> None:
    # rope_freqs = [1.0]·(rotated pairs) + [1e30]·rest over global_head_dim/2 (gemma4.md §4.1).
    if m.has_tensor("rope_freqs.weight"):
        freqs = m.gf.read("rope_freqs.weight").reshape(-1)
        rotated = int((freqs == 1.0).sum())
        factor = f32(2 * rotated / cfg["global_head_dim"])
    else:
        factor = 1.0
    cfg["rope_parameters"] = {
        SLIDING: {"rope_type": "default", "rope_theta": f32(m.scalar("rope.freq_base_swa", 10000.0))},
        FULL: {
            "rope_type": "proportional",
            "partial_rotary_factor": factor,
            "rope_theta": f32(m.scalar("rope.freq_base", 1000000.0)),
        },
    }


def _gemma4_ple(m: Meta, cfg: dict) -> None:
    cfg["hidden_size_per_layer_input"] = int(m.scalar("embedding_length_per_layer_input", 0) or 0)
    ple = "per_layer_token_embd.weight"
    cfg["vocab_size_per_layer_input"] = m.rows(ple) if m.has_tensor(ple) else cfg["vocab_size"]


# ---------------------------------------------------------------------------------------------
# Per-layer attention shapes, (n_head, n_kv_head, head_dim), for Q/K un-permutation and for
# splitting a fused attn_qkv.


def _uniform_dims(cfg: dict, bid: int) -> tuple[int, int, int]:
    return cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]


def _gemma4_dims(cfg: dict, bid: int) -> tuple[int, int, int]:
    if cfg["layer_types"][bid] == FULL:
        kv = cfg.get("num_global_key_value_heads") if cfg.get("attention_k_eq_v") else None
        return cfg["num_attention_heads"], kv or cfg["num_key_value_heads"], cfg["global_head_dim"]
    return _uniform_dims(cfg, bid)


# ---------------------------------------------------------------------------------------------
# The tables


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    module: str  # nvq.models.<module> holds the name table
    architecture: str  # HF class written to config.json "architectures"
    model_type: str
    hf_prefix: str  # decoder prefix of the causal-LM class's tensor names
    keys: tuple[Key, ...]
    derived: tuple[Callable[[Meta, dict], None], ...]
    constants: Mapping[str, Any] = field(default_factory=dict)
    fixes: tuple[Fix, ...] = ()
    consumed: Mapping[str, str] = field(default_factory=dict)  # tensor → why it is not written
    attn_dims: Callable[[dict, int], tuple[int, int, int]] = _uniform_dims


_COMMON_KEYS = (
    Key("block_count", "num_hidden_layers"),
    Key("embedding_length", "hidden_size"),
    Key("attention.head_count", "num_attention_heads"),
    Key("context_length", "max_position_embeddings", int, OMIT),
    Key("attention.layer_norm_rms_epsilon", "rms_norm_eps", f32),
)

_LLAMA = ArchSpec(
    gguf_arch="llama",
    module="llama",
    architecture="LlamaForCausalLM",
    model_type="llama",
    hf_prefix="model.",
    keys=(*_COMMON_KEYS, Key("feed_forward_length", "intermediate_size")),
    derived=(_vocab, _tied, _special_ids, _heads, _llama_rope, _biases),
    constants={"hidden_act": "silu"},
    fixes=(
        Fix(r"blk\.\d+\.attn_q\.(weight|bias)", Unpermute("q")),
        Fix(r"blk\.\d+\.attn_k\.(weight|bias)", Unpermute("k")),
    ),
)

_GEMMA3 = ArchSpec(
    gguf_arch="gemma3",
    module="gemma3",
    architecture="Gemma3ForCausalLM",
    model_type="gemma3_text",
    hf_prefix="model.",
    keys=(
        *_COMMON_KEYS,
        Key("feed_forward_length", "intermediate_size"),
        Key("attention.sliding_window", "sliding_window"),
        Key("final_logit_softcapping", "final_logit_softcapping", f32, None),
    ),
    derived=(_vocab, _tied, _special_ids, _heads, _gemma3_attention, _gemma3_layers, _gemma3_rope),
    constants={"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None},
    fixes=(Fix(r".*norm\.weight", Shift(-1.0)),),
)

_GEMMA4 = ArchSpec(
    gguf_arch="gemma4",
    module="gemma4",
    architecture="Gemma4ForCausalLM",
    model_type="gemma4_text",
    hf_prefix="model.",
    keys=(
        *_COMMON_KEYS,
        Key("attention.sliding_window", "sliding_window"),
        Key("attention.shared_kv_layers", "num_kv_shared_layers", int, 0),
        # Absent means None here; llama.cpp would apply 30 (oracle.md §1): say what the file says.
        Key("final_logit_softcapping", "final_logit_softcapping", f32, None),
    ),
    derived=(
        _vocab, _tied, _special_ids, _gemma4_layers, _gemma4_attention, _gemma4_mlp,
        _gemma4_moe, _gemma4_rope, _gemma4_ple,
    ),  # fmt: skip
    constants={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
    consumed={
        "rope_freqs.weight": "generated by llama.cpp's converter; its content is "
        "rope_parameters.full_attention.partial_rotary_factor",
    },
    attn_dims=_gemma4_dims,
)

# Qwen3 uses NEOX RoPE in llama.cpp, so its converter leaves Q/K rows in HF order: no fixes.
_QWEN3 = ArchSpec(
    gguf_arch="qwen3",
    module="qwen3",
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    hf_prefix="model.",
    keys=(*_COMMON_KEYS, Key("feed_forward_length", "intermediate_size")),
    derived=(_vocab, _tied, _special_ids, _heads, _llama_rope, _attention_bias),
    constants={"hidden_act": "silu"},
)

_QWEN3_MOE = ArchSpec(
    gguf_arch="qwen3moe",
    module="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    hf_prefix="model.",
    keys=_COMMON_KEYS,
    derived=(_vocab, _tied, _special_ids, _heads, _llama_rope, _attention_bias, _qwen3_moe),
    # not in the GGUF: llama.cpp's graph hard-codes both (src/models/qwen3moe.cpp)
    constants={"hidden_act": "silu", "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
)

SPECS: dict[str, ArchSpec] = {s.gguf_arch: s for s in (_LLAMA, _GEMMA3, _GEMMA4, _QWEN3, _QWEN3_MOE)}


def spec_for(gf: GGUFFile) -> ArchSpec:
    arch = gf.architecture
    try:
        return SPECS[arch]
    except KeyError:
        raise ConfigError(
            f"{gf.path} is a '{arch}' GGUF; nvq reads {', '.join(sorted(SPECS))}."
        ) from None


def hf_config(gf: GGUFFile, spec: ArchSpec | None = None) -> dict:
    """The HF config.json (text decoder, causal-LM class) that the GGUF's metadata implies."""
    spec = spec or spec_for(gf)
    m = Meta(gf, spec.gguf_arch)
    cfg: dict[str, Any] = {"architectures": [spec.architecture], "model_type": spec.model_type}
    for key in spec.keys:
        if key.default is REQUIRED or m.has(key.gguf):
            value = m.scalar(key.gguf)
            cfg[key.hf] = None if value is None else key.kind(value)
        elif key.default is not OMIT:
            cfg[key.hf] = key.default
    cfg.update(spec.constants)
    for derive in spec.derived:
        derive(m, cfg)
    if "token_embd.weight" not in gf.tensors:
        raise ConfigError(f"{gf.path} has no token_embd.weight tensor.")
    return cfg


def head_rows(dims: tuple[int, int, int]) -> tuple[int, int, int]:
    """Rows of q, k, v in a fused attn_qkv of a layer with these (n_head, n_kv, head_dim)."""
    n_head, n_kv, d = dims
    return n_head * d, n_kv * d, n_kv * d

