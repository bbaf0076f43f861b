"""The machinery for reading a GGUF back into Hugging Face terms; each architecture module
(nvq.models.<arch>, member GGUF_SPEC) declares its own facts with it, as data.

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


def vocab(m: Meta, cfg: dict) -> None:
    cfg["vocab_size"] = m.rows("token_embd.weight")


def tied(m: Meta, cfg: dict) -> None:
    cfg["tie_word_embeddings"] = not m.has_tensor("output.weight")


def special_ids(m: Meta, cfg: dict) -> None:
    for what in ("bos", "eos", "pad"):
        key = "tokenizer.ggml." + ("padding" if what == "pad" else what) + "_token_id"
        if m.has(key):
            cfg[f"{what}_token_id"] = int(m.scalar(key))


def head_counts(m: Meta, cfg: dict) -> None:
    heads = cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = int(m.scalar("attention.head_count_kv", heads))
    head_dim = m.scalar("attention.key_length", None)
    cfg["head_dim"] = int(head_dim) if head_dim is not None else cfg["hidden_size"] // heads


def rope_parameters(m: Meta, theta: float) -> dict:
    kind = m.scalar("rope.scaling.type", "none")
    if kind in ("none", None):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "factor": f32(m.scalar("rope.scaling.factor")), "rope_theta": theta}
    raise ConfigError(
        f"{m.gf.path}: rope.scaling.type is '{kind}'; nvq rebuilds 'none' and 'linear' only."
    )


# ---------------------------------------------------------------------------------------------
# Per-layer attention shapes, (n_head, n_kv_head, head_dim), for Q/K un-permutation and for
# splitting a fused attn_qkv.


def uniform_dims(cfg: dict, bid: int) -> tuple[int, int, int]:
    return cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]


# ---------------------------------------------------------------------------------------------
# The tables


@dataclass(frozen=True)
class ArchSpec:
    architecture: str  # HF class written to config.json "architectures"
    model_type: str
    hf_prefix: str  # decoder prefix of the causal-LM class's tensor names
    keys: tuple[Key, ...]
    derived: tuple[Callable[[Meta, dict], None], ...]
    constants: Mapping[str, Any] = field(default_factory=dict)
    fixes: tuple[Fix, ...] = ()
    consumed: Mapping[str, str] = field(default_factory=dict)  # tensor → why it is not written
    attn_dims: Callable[[dict, int], tuple[int, int, int]] = uniform_dims


COMMON_KEYS = (
    Key("block_count", "num_hidden_layers"),
    Key("embedding_length", "hidden_size"),
    Key("attention.head_count", "num_attention_heads"),
    Key("context_length", "max_position_embeddings", int, OMIT),
    Key("attention.layer_norm_rms_epsilon", "rms_norm_eps", f32),
)
# derived fields every architecture reads the same way
COMMON_DERIVED = (vocab, tied, special_ids)


def hf_config(gf: GGUFFile, spec: ArchSpec) -> dict:
    """The HF config.json (text decoder, causal-LM class) that the GGUF's metadata implies."""
    m = Meta(gf, gf.architecture)
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

