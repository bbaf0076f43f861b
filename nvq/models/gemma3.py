"""Gemma-3 text decoder (model_type gemma3, gemma3_text): config and name table.

Convention: RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w in the GGUF for every norm
(gemma4.md §8), so readers of a GGUF subtract 1 at load.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvq.io.hf import HFConfig
from nvq.models.base import NameTable, Role, Row, linear_rows, norm_rows

NORM_SHIFT = 1.0


@dataclass(frozen=True)
class Gemma3Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def parse_config(cfg: HFConfig) -> Gemma3Config:
    return Gemma3Config(
        hidden_size=int(cfg.require("hidden_size")),
        num_layers=int(cfg.require("num_hidden_layers")),
        num_heads=int(cfg.require("num_attention_heads")),
        num_kv_heads=int(cfg.get("num_key_value_heads", 1)),
        head_dim=int(cfg.get("head_dim", 256)),
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
            (f"{_LAYER}.self_attn.q_norm", "blk.{bid}.attn_q_norm"),
            (f"{_LAYER}.self_attn.k_norm", "blk.{bid}.attn_k_norm"),
            (f"{_LAYER}.post_attention_layernorm", "blk.{bid}.post_attention_norm"),
            (f"{_LAYER}.pre_feedforward_layernorm", "blk.{bid}.ffn_norm"),
            (f"{_LAYER}.post_feedforward_layernorm", "blk.{bid}.post_ffw_norm"),
        ]
    ),
]

TABLE = NameTable(
    rows=ROWS,
    text_prefixes=("model.language_model.", "model."),
    tower_prefixes=("model.vision_tower.", "model.multi_modal_projector."),
    top_level={"lm_head.weight": Row("lm_head.weight", "output.weight", Role.LM_HEAD)},
)

IGNORE_PATTERNS = (r"re:.*vision_tower.*", r"re:.*multi_modal_projector.*")
