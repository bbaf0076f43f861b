"""Llama-family decoders (llama, mistral-style, SmolLM2): config and name table.

Convention: llama.cpp's converter permutes the rows of attn_q / attn_k from HF's rotate-half
pairing to interleaved pairing (gemma4.md §8); readers of a GGUF undo it at load.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvq.io.hf import HFConfig
from nvq.models.base import NameTable, Role, Row, linear_rows, norm_rows


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def parse_config(cfg: HFConfig) -> LlamaConfig:
    hidden = int(cfg.require("hidden_size"))
    heads = int(cfg.require("num_attention_heads"))
    return LlamaConfig(
        hidden_size=hidden,
        num_layers=int(cfg.require("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg.require("intermediate_size")),
    )


_LAYER = "layers.{bid}"
ROWS = [
    Row("embed_tokens.weight", "token_embd.weight", Role.EMBEDDING),
    *norm_rows([("norm", "output_norm")]),
    *linear_rows(
        [
            (f"{_LAYER}.self_attn.q_proj", "blk.{bid}.attn_q", "qkv"),
            (f"{_LAYER}.self_attn.k_proj", "blk.{bid}.attn_k", "qkv"),
            (f"{_LAYER}.self_attn.v_proj", "blk.{bid}.attn_v", "qkv"),
            (f"{_LAYER}.self_attn.o_proj", "blk.{bid}.attn_output", None),
            (f"{_LAYER}.mlp.gate_proj", "blk.{bid}.ffn_gate", "gate_up"),
            (f"{_LAYER}.mlp.up_proj", "blk.{bid}.ffn_up", "gate_up"),
            (f"{_LAYER}.mlp.down_proj", "blk.{bid}.ffn_down", None),
        ]
    ),
    *norm_rows(
        [
            (f"{_LAYER}.input_layernorm", "blk.{bid}.attn_norm"),
            # llama's post-attention norm is the pre-FFN norm: llama.cpp calls it ffn_norm
            (f"{_LAYER}.post_attention_layernorm", "blk.{bid}.ffn_norm"),
        ]
    ),
]

TABLE = NameTable(
    rows=ROWS,
    text_prefixes=("model.",),
    top_level={"lm_head.weight": Row("lm_head.weight", "output.weight", Role.LM_HEAD)},
)

IGNORE_PATTERNS: tuple[str, ...] = ()
