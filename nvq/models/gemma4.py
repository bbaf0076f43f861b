"""Gemma-4 text decoder (model_type gemma4, gemma4_text, gemma4_unified): config, name table.

Facts: spec/gemma4.md §1 (config and its two dialects), §3.1 (HF names), §4.2 (GGUF names).
The llama.cpp converter copies every Gemma-4 tensor unchanged, so there are no value conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvq.errors import ConfigError
from nvq.io.hf import HFConfig
from nvq.models.base import NameTable, Role, Row, linear_rows, norm_rows

FULL = "full_attention"
SLIDING = "sliding_attention"
DEFAULT_GLOBAL_HEAD_DIM = 512  # transformers 5.23 default for the popped `global_head_dim` kwarg


@dataclass(frozen=True)
class Gemma4Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    head_dim: tuple[int, ...]  # per layer: head_dim on sliding layers, global_head_dim on full
    num_kv_heads: tuple[int, ...]  # per layer
    has_v_proj: tuple[bool, ...]  # False on k_eq_v full layers (V is the raw K projection)
    mlp_width: tuple[int, ...]  # ×2 on KV-shared layers when use_double_wide_mlp
    first_kv_shared: int  # == num_layers when no layer shares KV
    per_layer_input_size: int  # PLE width P; 0 = no PLE
    num_experts: int  # 0 = no MoE block
    top_k_experts: int
    moe_intermediate_size: int

    @property
    def kv_shared(self) -> tuple[bool, ...]:
        return tuple(i >= self.first_kv_shared for i in range(self.num_layers))


def parse_config(cfg: HFConfig) -> Gemma4Config:
    """Both on-disk dialects (gemma4.md §1.3): `global_head_dim`/`num_global_key_value_heads`, or the
    `per_layer_config` that transformers 5.23 writes when it re-saves a model."""
    n_layers = int(cfg.require("num_hidden_layers"))
    layer_types = list(cfg.get("layer_types") or [])
    if not layer_types:
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise ConfigError(
            f"{cfg.path}: layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}."
        )
    layer_types[-1] = FULL  # transformers forces the last layer to full attention

    head_dim = int(cfg.get("head_dim", 256))
    kv_heads = int(cfg.get("num_key_value_heads", 4))
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    per_layer = {int(k): v for k, v in (cfg.get("per_layer_config") or {}).items()}
    full_override = next((per_layer[i] for i in sorted(per_layer) if layer_types[i] == FULL), {})
    global_head_dim = int(cfg.get("global_head_dim", full_override.get("head_dim", DEFAULT_GLOBAL_HEAD_DIM)))
    global_kv = cfg.get("num_global_key_value_heads") if k_eq_v else None
    if global_kv is None:
        global_kv = full_override.get("num_key_value_heads", kv_heads)

    n_shared = int(cfg.get("num_kv_shared_layers", 0) or 0)
    first_shared = n_layers - n_shared
    intermediate = int(cfg.require("intermediate_size"))
    double_wide = bool(cfg.get("use_double_wide_mlp", False))
    moe = bool(cfg.get("enable_moe_block", False) or cfg.get("use_second_mlp_block", False))

    full = [t == FULL for t in layer_types]
    return Gemma4Config(
        hidden_size=int(cfg.require("hidden_size")),
        num_layers=n_layers,
        num_heads=int(cfg.require("num_attention_heads")),
        intermediate_size=intermediate,
        layer_types=tuple(layer_types),
        head_dim=tuple(global_head_dim if f else head_dim for f in full),
        num_kv_heads=tuple(int(global_kv) if f else kv_heads for f in full),
        has_v_proj=tuple(not (f and k_eq_v) for f in full),
        mlp_width=tuple(intermediate * (2 if double_wide and i >= first_shared else 1) for i in range(n_layers)),
        first_kv_shared=first_shared,
        # The default is 256, not 0: read it explicitly (gemma4.md §1.2).
        per_layer_input_size=int(cfg.get("hidden_size_per_layer_input", 256) or 0),
        num_experts=int(cfg.get("num_experts", 0) or 0) if moe else 0,
        top_k_experts=int(cfg.get("top_k_experts", 0) or 0) if moe else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0) if moe else 0,
    )


def _vestigial_kv(config: Gemma4Config, bid: int) -> str | None:
    # KV-shared layers read the donor's cache; k/v/k_norm tensors there are unused and vLLM
    # leaves them out (gemma4.md §3.1), so they are dropped rather than quantized.
    if config is not None and bid >= config.first_kv_shared:
        return f"layer {bid} shares KV with a donor layer; its own K/V tensors are unused"
    return None


_LAYER = "layers.{bid}"
ROWS = [
    Row("embed_tokens.weight", "token_embd.weight", Role.EMBEDDING),
    Row("embed_tokens_per_layer.weight", "per_layer_token_embd.weight", Role.EMBEDDING),
    *linear_rows([("per_layer_model_projection", "per_layer_model_proj", None)], with_bias=False),
    *norm_rows([("norm", "output_norm"), ("per_layer_projection_norm", "per_layer_proj_norm")]),
    *linear_rows(
        [
            (f"{_LAYER}.self_attn.q_proj", "blk.{bid}.attn_q", "qkv"),
            (f"{_LAYER}.self_attn.o_proj", "blk.{bid}.attn_output", None),
            (f"{_LAYER}.mlp.gate_proj", "blk.{bid}.ffn_gate", "gate_up"),
            (f"{_LAYER}.mlp.up_proj", "blk.{bid}.ffn_up", "gate_up"),
            (f"{_LAYER}.mlp.down_proj", "blk.{bid}.ffn_down", None),
            (f"{_LAYER}.per_layer_input_gate", "blk.{bid}.inp_gate", None),
            (f"{_LAYER}.per_layer_projection", "blk.{bid}.proj", None),
        ],
        with_bias=False,
    ),
    Row(f"{_LAYER}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight", Role.LINEAR, "qkv", _vestigial_kv),
    Row(f"{_LAYER}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight", Role.LINEAR, "qkv", _vestigial_kv),
    Row(f"{_LAYER}.self_attn.k_norm.weight", "blk.{bid}.attn_k_norm.weight", Role.NORM, None, _vestigial_kv),
    *norm_rows(
        [
            (f"{_LAYER}.input_layernorm", "blk.{bid}.attn_norm"),
            (f"{_LAYER}.self_attn.q_norm", "blk.{bid}.attn_q_norm"),
            (f"{_LAYER}.post_attention_layernorm", "blk.{bid}.post_attention_norm"),
            # gemma4 maps the pre-FFN norm to the name llama.cpp calls "ffn_norm"
            (f"{_LAYER}.pre_feedforward_layernorm", "blk.{bid}.ffn_norm"),
            (f"{_LAYER}.post_feedforward_layernorm", "blk.{bid}.post_ffw_norm"),
            (f"{_LAYER}.pre_feedforward_layernorm_2", "blk.{bid}.pre_ffw_norm_2"),
            (f"{_LAYER}.post_feedforward_layernorm_1", "blk.{bid}.post_ffw_norm_1"),
            (f"{_LAYER}.post_feedforward_layernorm_2", "blk.{bid}.post_ffw_norm_2"),
            (f"{_LAYER}.post_per_layer_input_norm", "blk.{bid}.post_norm"),
        ]
    ),
    Row(f"{_LAYER}.layer_scalar", "blk.{bid}.layer_output_scale.weight", Role.SCALAR),
    Row(f"{_LAYER}.router.proj.weight", "blk.{bid}.ffn_gate_inp.weight", Role.ROUTER),
    Row(f"{_LAYER}.router.scale", "blk.{bid}.ffn_gate_inp.scale", Role.SCALAR),
    Row(f"{_LAYER}.router.per_expert_scale", "blk.{bid}.ffn_down_exps.scale", Role.SCALAR),
    Row(f"{_LAYER}.experts.gate_up_proj", "blk.{bid}.ffn_gate_up_exps.weight", Role.EXPERTS_GATE_UP),
    Row(f"{_LAYER}.experts.down_proj", "blk.{bid}.ffn_down_exps.weight", Role.EXPERTS_DOWN),
]

TABLE = NameTable(
    rows=ROWS,
    # Gemma4ForConditionalGeneration nests the decoder; Gemma4ForCausalLM does not.
    text_prefixes=("model.language_model.", "model."),
    tower_prefixes=(
        "model.vision_tower.",
        "model.audio_tower.",
        "model.embed_vision.",
        "model.embed_audio.",
        "model.vision_embedder.",
    ),
    top_level={"lm_head.weight": Row("lm_head.weight", "output.weight", Role.LM_HEAD)},
)

# Linear modules that are not part of the decoder's name table but are nn.Linear in transformers,
# so a compressed-tensors config must list them in `ignore` when they stay dense.
IGNORE_PATTERNS = (
    r"re:.*vision_tower.*",
    r"re:.*audio_tower.*",
    r"re:.*embed_vision.*",
    r"re:.*embed_audio.*",
)
