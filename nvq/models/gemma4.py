"""Gemma-4 text decoder (model_type gemma4, gemma4_text, gemma4_unified): config, name table,
reference forward.

Facts: spec/gemma4.md §1 (config and its two dialects), §2 (forward math), §3.1 (HF names),
§4.2 (GGUF names), §5.2 (llama.cpp tap names). The llama.cpp converter copies every Gemma-4
tensor unchanged, so there are no value conventions; proportional RoPE comes from the config
(llama.cpp encodes the same thing as `rope_freqs` factors of 1 and 1e30).

Taps (llama.cpp graph names, src/models/gemma4.cpp), each `[T, features]`: the ggml tensor with
its outer dim (tokens) first and the inner dims flattened; per-head tensors are `[T, heads·hd]`
head-major, PLE tensors `[T, L·P]` layer-major.

| tap | equals |
|---|---|
| `inp_scaled` | h0 = E[ids]·√H = HF hidden_states[0] |
| `inp_per_layer_selected` | PLE table rows · √P |
| `per_layer_proj` | rms((per_layer_model_proj·h0)·H^−½; per_layer_proj_norm), per layer slice |
| `inp_per_layer` | (per_layer_proj + inp_per_layer_selected)·2^−½ |
| `attn_norm-N` | rms(x; attn_norm) |
| `Qcur-N`, `Qcur_normed-N`, `Qcur_pos-N` | q after projection / q_norm / RoPE |
| `Kcur-N`, `Kcur_normed-N`, `Kcur_pos-N` | k likewise; non-shared layers only. On k_eq_v layers llama.cpp renames raw K to `Vcur`, so its graph has no `Kcur-N` there; nvq records both (equal) |
| `Vcur-N`, `Vcur_normed-N` | raw v (= raw k on k_eq_v layers) / after the weightless norm; non-shared layers only |
| `kqv_out-N` | attention output before o_proj, `[T, Hq·hd]` |
| `attn_post_norm-N` | rms(o_proj·attn; post_attention_norm) |
| `attn_out-N`, `ffn_inp-N` | residual after attention (`ffn_inp` is nvq's cross-architecture alias) |
| `ffn_norm-N`, `ffn_out-N` | dense layers: rms(attn_out; ffn_norm), MLP output before post_ffw_norm |
| `ffn_norm_1-N`, `ffn_mlp-N` | MoE layers: the same norm; MLP output after post_ffw_norm_1 (no `ffn_norm`/`ffn_out` there, as in llama.cpp) |
| `ffn_moe_logits-N`, `ffn_moe_probs-N` | router projection of rms(attn_out)·scale·H^−½; softmax over all experts |
| `ffn_moe_topk-N`, `ffn_moe_weights_norm-N` | selected expert ids `[T, K]` (int64); their renormalized probabilities (before per_expert_scale) |
| `ffn_norm_2-N` | rms(attn_out; pre_ffw_norm_2), the experts' input |
| `ffn_moe_out-N`, `ffn_moe-N` | Σ_k w_k·s_e·expert_e (before post_ffw_norm_2); after it |
| `ffn_moe_combined-N` | ffn_mlp + ffn_moe |
| `ffn_post_norm-N` | rms(·; post_ffw_norm) |
| `pe_in-N` | residual after the FFN (PLE models only) |
| `per_layer_embd_out-N` | rms(proj·(gelu(inp_gate·pe_in) ⊙ ple_N); post_norm) |
| `l_out-N` | layer output after layer_scalar = HF hidden_states[N+1] (N < L−1) |
| `result_norm` | final norm = HF hidden_states[L] |
| `result_output` | logits after the softcap |
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass

import torch

from nvq.errors import ConfigError
from nvq.io import gguf_config as G
from nvq.io.hf import HFConfig
from nvq.models import layers as L
from nvq.models.base import NameTable, Role, Row, linear_rows, norm_rows
from nvq.models.blame import COMMON_BLAME, MOE_BLAME, QK_NORM_BLAME, SANDWICH_BLAME, Blame
from nvq.models.gemma3 import embed_scale_value
from nvq.models.gguf_fields import ARCH, COMMON_FIELDS, TENSORS, meta, optional, rope_fields

FULL = "full_attention"
SLIDING = "sliding_attention"
DEFAULT_GLOBAL_HEAD_DIM = 512  # transformers 5.23 default for the popped `global_head_dim` kwarg
# transformers 5.23 defaults that differ between the two text configs: Gemma4TextConfig turns PLE
# on (256, not 0) and has a 512 window; Gemma4UnifiedTextConfig has no PLE field and a 1024 window.
TEXT_DEFAULTS = {
    "gemma4_text": {"hidden_size_per_layer_input": 256, "sliding_window": 512},
    "gemma4_unified_text": {"hidden_size_per_layer_input": 0, "sliding_window": 1024},
}
TEXT_MODEL_TYPES = {"gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
# transformers 5.23 defaults of Gemma4TextConfig.rope_parameters
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}


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
    # Fields the reference forward needs (defaults: transformers 5.23's Gemma4TextConfig).
    vocab_size: int = 262144
    vocab_size_per_layer_input: int = 0  # rows of the PLE table; 0 when there is no PLE
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    rope_sliding: L.RopeSpec = L.RopeSpec.from_hf(DEFAULT_ROPE[SLIDING], 10000.0)
    rope_full: L.RopeSpec = L.RopeSpec.from_hf(DEFAULT_ROPE[FULL], 1000000.0)
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"

    @property
    def kv_shared(self) -> tuple[bool, ...]:
        return tuple(i >= self.first_kv_shared for i in range(self.num_layers))

    @property
    def kv_source(self) -> tuple[int, ...]:
        """Per layer, the layer whose K/V it attends to: itself, or on a KV-shared layer the donor,
        the last non-shared layer of the same type (gemma4.md §2.6)."""
        donors = {}
        for i in range(min(self.first_kv_shared, self.num_layers)):
            donors[self.layer_types[i]] = i
        out = []
        for i, kind in enumerate(self.layer_types):
            if i < self.first_kv_shared:
                out.append(i)
            elif kind in donors:
                out.append(donors[kind])
            else:
                raise ConfigError(
                    f"layer {i} ({kind}) shares KV, but no earlier non-shared layer has that type."
                )
        return tuple(out)


def _text_defaults(cfg: HFConfig) -> dict:
    text_type = TEXT_MODEL_TYPES.get(cfg.text_model_type, cfg.text_model_type)
    return TEXT_DEFAULTS.get(text_type, TEXT_DEFAULTS["gemma4_text"])


def parse_config(cfg: HFConfig) -> Gemma4Config:
    """Both on-disk dialects (gemma4.md §1.3): `global_head_dim`/`num_global_key_value_heads`, or the
    `per_layer_config` that transformers 5.23 writes when it re-saves a model."""
    defaults = _text_defaults(cfg)
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
    # gemma4's default is 256, not 0: read it explicitly (gemma4.md §1.2).
    ple = int(cfg.get("hidden_size_per_layer_input", defaults["hidden_size_per_layer_input"]) or 0)
    rope = cfg.get("rope_parameters") or {}
    softcap = cfg.get("final_logit_softcapping")
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
        per_layer_input_size=ple,
        num_experts=int(cfg.get("num_experts", 0) or 0) if moe else 0,
        top_k_experts=int(cfg.get("top_k_experts", 0) or 0) if moe else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0) if moe else 0,
        vocab_size=int(cfg.get("vocab_size", 262144)),
        vocab_size_per_layer_input=int(cfg.get("vocab_size_per_layer_input", 262144) or 0) if ple else 0,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        sliding_window=int(cfg.get("sliding_window", defaults["sliding_window"])),
        rope_sliding=L.RopeSpec.from_hf(rope.get(SLIDING) or DEFAULT_ROPE[SLIDING], 10000.0),
        rope_full=L.RopeSpec.from_hf(rope.get(FULL) or DEFAULT_ROPE[FULL], 1000000.0),
        final_logit_softcapping=None if softcap is None else float(softcap),
        hidden_activation=str(cfg.get("hidden_activation") or "gelu_pytorch_tanh"),
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
    # gemma4_unified's encoder-free vision embedder, under its checkpoint name (transformers
    # renames it to embed_vision on load; a loader matching checkpoint names sees this one)
    r"re:.*vision_embedder.*",
)
MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
BLAME = (
    *COMMON_BLAME,
    *QK_NORM_BLAME,
    *SANDWICH_BLAME,
    *MOE_BLAME,
    Blame(r"per_layer_.*", ("inp_per_layer_selected", "per_layer_proj", "inp_per_layer")),
    Blame(r"blk\.\d+\.post_ffw_norm_1\..*", ("ffn_mlp",)),
    Blame(r"blk\.\d+\.pre_ffw_norm_2\..*", ("ffn_norm_2",)),
    Blame(r"blk\.\d+\.post_ffw_norm_2\..*", ("ffn_moe",)),
    Blame(r"blk\.\d+\.(inp_gate|proj|post_norm)\..*", ("per_layer_embd_out",)),
)
# where the GGUF holds each parsed config field (nvq.models.gguf_fields)
GGUF_FIELDS = {
    **COMMON_FIELDS,
    "intermediate_size": meta("feed_forward_length"),
    "layer_types": meta("attention.sliding_window_pattern"),
    "head_dim": meta("attention.key_length_swa", "attention.key_length"),
    "num_kv_heads": meta("attention.head_count_kv"),
    "has_v_proj": TENSORS,  # k_eq_v: a non-shared full layer without attn_v
    "mlp_width": meta("feed_forward_length"),
    "first_kv_shared": meta("attention.shared_kv_layers"),
    "per_layer_input_size": meta("embedding_length_per_layer_input"),
    "vocab_size_per_layer_input": TENSORS,  # per_layer_token_embd rows
    "num_experts": optional("expert_count"),
    "top_k_experts": optional("expert_used_count"),
    "moe_intermediate_size": optional("expert_feed_forward_length"),
    "sliding_window": meta("attention.sliding_window"),
    **rope_fields("rope_sliding", meta("rope.freq_base_swa"), ARCH, ARCH, ARCH, ARCH),
    # proportional RoPE: rope_freqs holds 1.0 for the rotated pairs (gemma4.md §4.1)
    **rope_fields("rope_full", meta("rope.freq_base"), ARCH, ARCH, TENSORS, ARCH),
    "final_logit_softcapping": meta("final_logit_softcapping", fallback=30.0),
    "hidden_activation": ARCH,  # GeGLU with tanh GELU
}
# transformers' defaults of HF config fields the parsed config may lack
HF_DEFAULTS = {"tie_word_embeddings": True, "max_position_embeddings": 131072}

# ---------------------------------------------------------------------------------------------
# GGUF metadata → HF config
# ---------------------------------------------------------------------------------------------


def _gguf_layers(m: G.Meta, cfg: dict) -> None:
    pattern = m.per_layer("attention.sliding_window_pattern", cfg["num_hidden_layers"])
    if not all(isinstance(s, bool) for s in pattern):
        raise ConfigError(f"{m.gf.path}: gemma4.attention.sliding_window_pattern must be a bool array.")
    cfg["layer_types"] = [SLIDING if s else FULL for s in pattern]


def _gguf_attention(m: G.Meta, cfg: dict) -> None:
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
        t == FULL and i < first_shared and not _gguf_has_v(m, i) for i, t in enumerate(types)
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


def _gguf_has_v(m: G.Meta, bid: int) -> bool:
    return m.has_tensor(f"blk.{bid}.attn_v.weight") or m.has_tensor(f"blk.{bid}.attn_qkv.weight")


def _gguf_mlp(m: G.Meta, cfg: dict) -> None:
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


def _gguf_moe(m: G.Meta, cfg: dict) -> None:
    experts = int(m.scalar("expert_count", 0) or 0)
    cfg["enable_moe_block"] = experts > 0
    cfg["num_experts"] = experts or None
    cfg["top_k_experts"] = int(m.scalar("expert_used_count")) if experts else None
    cfg["moe_intermediate_size"] = int(m.scalar("expert_feed_forward_length")) if experts else None


def _gguf_rope(m: G.Meta, cfg: dict) -> None:
    # rope_freqs = [1.0]·(rotated pairs) + [1e30]·rest over global_head_dim/2 (gemma4.md §4.1).
    if m.has_tensor("rope_freqs.weight"):
        freqs = m.gf.read("rope_freqs.weight").reshape(-1)
        rotated = int((freqs == 1.0).sum())
        factor = G.f32(2 * rotated / cfg["global_head_dim"])
    else:
        factor = 1.0
    cfg["rope_parameters"] = {
        SLIDING: {"rope_type": "default", "rope_theta": G.f32(m.scalar("rope.freq_base_swa", 10000.0))},
        FULL: {
            "rope_type": "proportional",
            "partial_rotary_factor": factor,
            "rope_theta": G.f32(m.scalar("rope.freq_base", 1000000.0)),
        },
    }


def _gguf_ple(m: G.Meta, cfg: dict) -> None:
    cfg["hidden_size_per_layer_input"] = int(m.scalar("embedding_length_per_layer_input", 0) or 0)
    ple = "per_layer_token_embd.weight"
    cfg["vocab_size_per_layer_input"] = m.rows(ple) if m.has_tensor(ple) else cfg["vocab_size"]


def _gguf_dims(cfg: dict, bid: int) -> tuple[int, int, int]:
    if cfg["layer_types"][bid] == FULL:
        kv = cfg.get("num_global_key_value_heads") if cfg.get("attention_k_eq_v") else None
        return cfg["num_attention_heads"], kv or cfg["num_key_value_heads"], cfg["global_head_dim"]
    return G.uniform_dims(cfg, bid)


GGUF_ARCH = "gemma4"
GGUF_SPEC = G.ArchSpec(
    architecture="Gemma4ForCausalLM",
    model_type="gemma4_text",
    hf_prefix="model.",
    keys=(
        *G.COMMON_KEYS,
        G.Key("attention.sliding_window", "sliding_window"),
        G.Key("attention.shared_kv_layers", "num_kv_shared_layers", int, 0),
        # Absent means None here; llama.cpp would apply 30 (oracle.md §1): say what the file says.
        G.Key("final_logit_softcapping", "final_logit_softcapping", G.f32, None),
    ),
    derived=(
        *G.COMMON_DERIVED, _gguf_layers, _gguf_attention, _gguf_mlp, _gguf_moe, _gguf_rope, _gguf_ple,
    ),  # fmt: skip
    constants={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
    consumed={
        "rope_freqs.weight": "generated by llama.cpp's converter; its content is "
        "rope_parameters.full_attention.partial_rotary_factor",
    },
    attn_dims=_gguf_dims,
)


# ---------------------------------------------------------------------------------------------
# Reference forward (gemma4.md §2)
# ---------------------------------------------------------------------------------------------


def route(
    ops: L.Ops,
    x: torch.Tensor,
    proj: torch.Tensor,
    scale: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    eps: float,
) -> L.Routing:
    """Gemma-4 router (gemma4.md §2.5): input rms(x)·scale·H^−½ (x = residual before the FFN),
    softmax over all experts in ≥fp32, top-k, renormalize (no epsilon, as HF), × per_expert_scale."""
    h = x.shape[-1]
    r = L.rms_norm(x, None, eps) * scale * (h**-0.5)
    logits = ops.linear(r, proj)
    ct = L.compute_dtype(x.dtype)
    probs = torch.softmax(logits.to(ct), dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    norm = top / top.sum(dim=-1, keepdim=True)
    weights = norm * per_expert_scale.to(ct)[idx]
    return L.Routing(logits, probs, idx, norm, weights)


def forward_layers(
    config: Gemma4Config,
    tensors: Mapping[str, torch.Tensor],
    token_ids: torch.Tensor,
    taps: L.Taps | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    embed_scale: str | float = "exact",
    *,
    observer: L.Observer | None = None,
) -> Generator[int, None, torch.Tensor]:
    """The forward one step at a time: yields L.EMBEDDED after the embedding (and the PLE inputs),
    i after layer i's `l_out-i` tap, and returns `result_norm` `[T, H]`. The K/V of KV-shared
    layers' donors and the PLE inputs live in the generator. Inputs and taps: `forward`."""
    tap = L.as_taps(taps)
    ops = L.Ops(observer)
    w = L.Weights(tensors, dtype, device)
    ids = L.check_token_ids(token_ids)
    eps, act, n_layers = config.rms_norm_eps, config.hidden_activation, config.num_layers
    t = ids.shape[0]
    pos = torch.arange(t)
    rope_specs = {SLIDING: config.rope_sliding, FULL: config.rope_full}
    rope: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    kv_source = config.kv_source
    donors = {src for i, src in enumerate(kv_source) if src != i}  # only their K/V is kept

    def norm(x: torch.Tensor, name: str | None) -> torch.Tensor:
        return L.rms_norm(x, None if name is None else w(name), eps, L.NORM_PLAIN)

    def mlp(p: str, x: torch.Tensor, norm_name: str, tap_name: str) -> torch.Tensor:
        # the MLP input is made here and handed on, so only glu_mlp holds it (released before down)
        gate, up, down = w(p + "ffn_gate.weight"), w(p + "ffn_up.weight"), w(p + "ffn_down.weight")
        return ops.glu_mlp(tap(tap_name, norm(x, p + norm_name)), gate, up, down, act)

    def attend(i: int, p: str, kind: str, hd: int, x: torch.Tensor, cos, sin) -> torch.Tensor:
        """Layer i's attention up to `kqv_out-i` (the output projection's input)."""
        a = tap(f"attn_norm-{i}", norm(x, p + "attn_norm.weight"))
        q = tap(f"Qcur-{i}", ops.linear(a, w(p + "attn_q.weight"))).view(t, -1, hd)
        q = norm(q, p + "attn_q_norm.weight")
        tap(f"Qcur_normed-{i}", q.reshape(t, -1))
        q = L.apply_rope(q, cos, sin)
        tap(f"Qcur_pos-{i}", q.reshape(t, -1))
        if kv_source[i] == i:
            kr = tap(f"Kcur-{i}", ops.linear(a, w(p + "attn_k.weight")))
            # k_eq_v: V is the raw K projection (before k_norm and RoPE)
            vr = ops.linear(a, w(p + "attn_v.weight")) if config.has_v_proj[i] else kr
            tap(f"Vcur-{i}", vr)
            k = norm(kr.view(t, -1, hd), p + "attn_k_norm.weight")
            v = norm(vr.view(t, -1, hd), None)
            tap(f"Kcur_normed-{i}", k.reshape(t, -1))
            tap(f"Vcur_normed-{i}", v.reshape(t, -1))
            k = L.apply_rope(k, cos, sin)
            tap(f"Kcur_pos-{i}", k.reshape(t, -1))
            if i in donors:
                kv[i] = (ops.keep(k), ops.keep(v))
        else:
            k, v = kv[kv_source[i]]
        window = config.sliding_window if kind == SLIDING else None
        return tap(f"kqv_out-{i}", L.attention(q, k, v, 1.0, window=window))

    h = config.hidden_size
    x = ops.keep(tap("inp_scaled", w.rows("token_embd.weight", ids) * embed_scale_value(h, embed_scale)))

    ple = None
    p_dim = config.per_layer_input_size
    if p_dim:
        tok = w.rows("per_layer_token_embd.weight", ids) * embed_scale_value(p_dim, embed_scale)
        tap("inp_per_layer_selected", tok)
        ctx = ops.linear(x, w("per_layer_model_proj.weight")) * h**-0.5
        ctx = norm(ctx.view(t, n_layers, p_dim), "per_layer_proj_norm.weight")
        tap("per_layer_proj", ctx.reshape(t, -1))
        ple = ops.keep((ctx + tok.view(t, n_layers, p_dim)) * 2.0**-0.5)
        tap("inp_per_layer", ple.reshape(t, -1))
        del tok, ctx
    yield L.EMBEDDED

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in range(n_layers):
        p = f"blk.{i}."
        kind = config.layer_types[i]
        hd = config.head_dim[i]
        if (kind, hd) not in rope:
            inv = L.rope_inv_freq(rope_specs[kind], hd)
            rope[(kind, hd)] = L.rope_cos_sin(inv, pos, dtype, device)
        cos, sin = rope[(kind, hd)]

        # Intermediates live only in `attend`'s frame or in one expression, and `del` drops the
        # rest: a calibration sequence parked at a Linear holds just the kept tensors (residual,
        # donor K/V, PLE inputs) and that Linear's input (nvq.quant.capture).
        o = attend(i, p, kind, hd, x, cos, sin)
        o = norm(ops.linear(o, w(p + "attn_output.weight")), p + "post_attention_norm.weight")
        tap(f"attn_post_norm-{i}", o)
        x = ops.keep(tap(f"ffn_inp-{i}", tap(f"attn_out-{i}", x + o)))
        del o

        if config.num_experts:
            m = mlp(p, x, "ffn_norm.weight", f"ffn_norm_1-{i}")
            m = tap(f"ffn_mlp-{i}", norm(m, p + "post_ffw_norm_1.weight"))
            r = route(
                ops,
                x,
                w(p + "ffn_gate_inp.weight"),
                w(p + "ffn_gate_inp.scale"),
                w(p + "ffn_down_exps.scale"),
                config.top_k_experts,
                eps,
            )
            tap(f"ffn_moe_logits-{i}", r.logits)
            tap(f"ffn_moe_probs-{i}", r.probs)
            tap(f"ffn_moe_topk-{i}", r.experts)
            tap(f"ffn_moe_weights_norm-{i}", r.weights_norm)
            xe = tap(f"ffn_norm_2-{i}", norm(x, p + "pre_ffw_norm_2.weight"))
            gate_up, down = w.experts(p + "ffn_gate_up_exps.weight"), w.experts(p + "ffn_down_exps.weight")
            e = ops.moe_experts(xe, gate_up, down, r.experts, r.weights, act)
            e = norm(tap(f"ffn_moe_out-{i}", e), p + "post_ffw_norm_2.weight")
            m = tap(f"ffn_moe_combined-{i}", m + tap(f"ffn_moe-{i}", e))
            del r, xe, e
        else:
            m = tap(f"ffn_out-{i}", mlp(p, x, "ffn_norm.weight", f"ffn_norm-{i}"))
        x = ops.keep(x + tap(f"ffn_post_norm-{i}", norm(m, p + "post_ffw_norm.weight")))
        del m

        if ple is not None:
            tap(f"pe_in-{i}", x)
            g = L.activation(act)(ops.linear(x, w(p + "inp_gate.weight"))) * ple[:, i, :]
            g = norm(ops.linear(g, w(p + "proj.weight")), p + "post_norm.weight")
            x = ops.keep(x + tap(f"per_layer_embd_out-{i}", g))
            del g

        scalar = w.get(p + "layer_output_scale.weight")
        if scalar is not None:
            x = x * scalar
        x = ops.keep(tap(f"l_out-{i}", x))
        yield i

    return tap("result_norm", norm(x, "output_norm.weight"))


def head(config: Gemma4Config, hidden: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """Logits of the vocabulary rows `weight_rows` (`[V_chunk, H]`), softcapped elementwise: the
    head in any chunks."""
    return L.softcap(L.UNOBSERVED.linear(hidden, weight_rows), config.final_logit_softcapping)


def forward(
    config: Gemma4Config,
    tensors: Mapping[str, torch.Tensor],
    token_ids: torch.Tensor,
    taps: L.Taps | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    embed_scale: str | float = "exact",
    *,
    observer: L.Observer | None = None,
) -> torch.Tensor:
    """Logits `[T, V]` of one sequence at positions 0..T−1, from canonical tensors.

    embed_scale: "exact" multiplies the embeddings by fp32 √H and √P (llama.cpp; transformers in
    fp32), "hf_bf16" by their bf16 roundings (transformers with bf16 weights, gemma4.md §2.2).
    Tap names: the module docstring.
    """
    steps = forward_layers(config, tensors, token_ids, taps, dtype, device, embed_scale, observer=observer)
    x = L.run_layers(steps)
    logits = head(config, x, L.Weights(tensors, dtype, device).lm_head())
    return L.as_taps(taps)("result_output", logits)
