"""Gemma-3 text decoder (model_type gemma3, gemma3_text): config, name table, reference forward.

Convention: RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w in the GGUF for every norm
(gemma4.md §8), so readers of a GGUF subtract 1 at load. The forward takes HF values (w) and
multiplies by (1 + w) in fp32.

Math (transformers 5.23 `modeling_gemma3.py`): embedding × √H; sandwich norms; q/k norm then
RoPE (rotate-half; θ and scaling per layer type, linear scaling only where the config says);
attention scale query_pre_attn_scalar^−½ (llama.cpp hard-codes 1/√head_dim, or 1/√(H/Hq) on 27B:
the same for every released size but 27B); optional attention softcap; sliding layers see keys
with q − k < sliding_window; GeGLU (tanh); optional final logit softcap.

Taps (llama.cpp graph names, src/models/gemma3.cpp), each `[T, features]`, per-head tensors as
`[T, heads·head_dim]` head-major:

| tap | equals |
|---|---|
| `inp_scaled` | E[ids]·√H = HF hidden_states[0] |
| `attn_norm-N` | rms(x; attn_norm) |
| `Qcur_normed-N`, `Kcur_normed-N` | q / k after q_norm / k_norm, before RoPE |
| `Qcur-N`, `Kcur-N` | q / k after RoPE (llama.cpp's last node of that name; before the attention scale) |
| `Vcur-N` | v projection |
| `kqv_out-N` | attention output before the output projection |
| `attn_post_norm-N` | rms(o_proj·attn; post_attention_norm) |
| `sa_out-N`, `ffn_inp-N` | residual after attention (`ffn_inp` is nvq's cross-architecture alias) |
| `ffn_norm-N` | rms(sa_out; ffn_norm) (HF pre_feedforward_layernorm) |
| `ffn_out-N` | MLP output before post_ffw_norm |
| `ffn_post_norm-N` | rms(ffn_out; post_ffw_norm) |
| `l_out-N` | layer output = HF hidden_states[N+1] (N < L−1) |
| `result_norm` | final norm = HF hidden_states[L] |
| `result_output` | logits after the optional softcap |
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass

import torch

from nvq.io import gguf_config as G
from nvq.io.hf import HFConfig
from nvq.models import layers as L
from nvq.models.base import NameTable, Role, Row, linear_rows, norm_rows
from nvq.models.blame import COMMON_BLAME, QK_NORM_BLAME, SANDWICH_BLAME
from nvq.models.gguf_fields import ARCH, COMMON_FIELDS, meta, optional, rope_fields

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Gemma3Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    # Fields the reference forward needs (defaults: transformers' Gemma3TextConfig defaults).
    vocab_size: int = 262208
    rms_norm_eps: float = 1e-6
    layer_types: tuple[str, ...] = ()  # empty: pattern 6 (every 6th layer full)
    sliding_window: int | None = 4096
    rope_sliding: L.RopeSpec = L.RopeSpec(theta=10000.0)
    rope_full: L.RopeSpec = L.RopeSpec(theta=1000000.0)
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        return SLIDING if (i + 1) % 6 else FULL


def _rope_specs(cfg: HFConfig) -> tuple[L.RopeSpec, L.RopeSpec]:
    """(sliding, full) RoPE. transformers 5 nests both in `rope_parameters`; older configs carry
    `rope_local_base_freq` (sliding θ), `rope_theta` (full θ) and `rope_scaling` (full layers)."""
    params = cfg.get("rope_parameters") or {}
    if SLIDING in params or FULL in params:
        sliding = dict(params.get(SLIDING) or {})
        full = dict(params.get(FULL) or {})
    else:
        sliding, full = {}, dict(cfg.get("rope_scaling") or {})
    sliding.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    full.setdefault("rope_theta", cfg.get("rope_theta", 1000000.0))
    return L.RopeSpec.from_hf(sliding, 10000.0), L.RopeSpec.from_hf(full, 1000000.0)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def parse_config(cfg: HFConfig) -> Gemma3Config:
    rope_sliding, rope_full = _rope_specs(cfg)
    n_layers = int(cfg.require("num_hidden_layers"))
    pattern = int(cfg.get("sliding_window_pattern", 6) or 6)  # older configs; transformers' default
    layer_types = cfg.get("layer_types") or [
        SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)
    ]
    window = cfg.get("sliding_window", 4096)
    return Gemma3Config(
        hidden_size=int(cfg.require("hidden_size")),
        num_layers=n_layers,
        num_heads=int(cfg.require("num_attention_heads")),
        num_kv_heads=int(cfg.get("num_key_value_heads", 1)),
        head_dim=int(cfg.get("head_dim", 256)),
        intermediate_size=int(cfg.require("intermediate_size")),
        vocab_size=int(cfg.get("vocab_size", 262208)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        layer_types=tuple(layer_types),
        sliding_window=None if window is None else int(window),
        rope_sliding=rope_sliding,
        rope_full=rope_full,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        attn_logit_softcapping=_optional_float(cfg.get("attn_logit_softcapping")),
        final_logit_softcapping=_optional_float(cfg.get("final_logit_softcapping")),
        hidden_activation=str(
            cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        ),
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
MODEL_TYPES = ("gemma3", "gemma3_text")
BLAME = (*COMMON_BLAME, *QK_NORM_BLAME, *SANDWICH_BLAME)
# where the GGUF holds each parsed config field (nvq.models.gguf_fields)
GGUF_FIELDS = {
    **COMMON_FIELDS,
    "num_kv_heads": meta("attention.head_count_kv"),
    "head_dim": meta("attention.key_length"),
    "intermediate_size": meta("feed_forward_length"),
    "layer_types": meta("attention.sliding_window_pattern"),  # absent: every 6th layer full
    "sliding_window": meta("attention.sliding_window"),
    # rope.scaling.* applies to the full-attention layers only (gemma4.md §8)
    **rope_fields("rope_sliding", meta("rope.freq_base_swa"), ARCH, ARCH, ARCH, ARCH),
    **rope_fields("rope_full", meta("rope.freq_base"), optional("rope.scaling.type"),
                  optional("rope.scaling.factor"), ARCH, ARCH),
    "query_pre_attn_scalar": ARCH,  # 1/√head_dim, 1/√(H/Hq) on the 62-layer 27B
    "attn_logit_softcapping": ARCH,  # llama.cpp's gemma3 graph has none
    "final_logit_softcapping": optional("final_logit_softcapping"),  # absent: 0 = none
    "hidden_activation": ARCH,  # GeGLU with tanh GELU
}
# transformers' defaults of HF config fields the parsed config may lack
HF_DEFAULTS = {"tie_word_embeddings": True, "max_position_embeddings": 131072}

# ---------------------------------------------------------------------------------------------
# GGUF metadata → HF config
# ---------------------------------------------------------------------------------------------


def _gguf_layers(m: G.Meta, cfg: dict) -> None:
    n = cfg["num_hidden_layers"]
    if m.has("attention.sliding_window_pattern"):
        pattern = m.per_layer("attention.sliding_window_pattern", n)
        cfg["layer_types"] = [SLIDING if s else FULL for s in pattern]
    else:
        # Not in gemma3 GGUFs: llama.cpp hard-codes pattern 6 (il % 6 < 5 is sliding).
        cfg["layer_types"] = [SLIDING if i % 6 < 5 else FULL for i in range(n)]


def _gguf_attention(m: G.Meta, cfg: dict) -> None:
    # Not in the GGUF: llama.cpp uses 1/√head_dim, and 1/√(H/Hq) on the 62-layer 27B.
    if cfg["num_hidden_layers"] == 62:
        cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    else:
        cfg["query_pre_attn_scalar"] = cfg["head_dim"]


def _gguf_rope(m: G.Meta, cfg: dict) -> None:
    cfg["rope_parameters"] = {
        # Older GGUFs lack freq_base_swa; llama.cpp's default is 10000.
        SLIDING: {"rope_type": "default", "rope_theta": G.f32(m.scalar("rope.freq_base_swa", 10000.0))},
        FULL: G.rope_parameters(m, G.f32(m.scalar("rope.freq_base", 1000000.0))),
    }


GGUF_ARCH = "gemma3"
GGUF_SPEC = G.ArchSpec(
    architecture="Gemma3ForCausalLM",
    model_type="gemma3_text",
    hf_prefix="model.",
    keys=(
        *G.COMMON_KEYS,
        G.Key("feed_forward_length", "intermediate_size"),
        G.Key("attention.sliding_window", "sliding_window"),
        G.Key("final_logit_softcapping", "final_logit_softcapping", G.f32, None),
    ),
    derived=(*G.COMMON_DERIVED, G.head_counts, _gguf_attention, _gguf_layers, _gguf_rope),
    constants={"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None},
    # llama.cpp stores Gemma-1..3 norms as 1 + w (gemma4.md §8)
    fixes=(G.Fix(r".*norm\.weight", G.Shift(-1.0)),),
)


# ---------------------------------------------------------------------------------------------
# Reference forward
# ---------------------------------------------------------------------------------------------


def embed_scale_value(hidden_size: int, embed_scale: str | float = "exact") -> float:
    """√H as the forward multiplies it: "exact" = fp32 sqrt (llama.cpp's sqrtf; also what
    transformers uses in fp32), "hf_bf16" = rounded to bf16 (transformers with bf16 weights,
    gemma4.md §2.2), or an explicit number."""
    if isinstance(embed_scale, (int, float)):
        return float(embed_scale)
    exact = torch.tensor(math.sqrt(hidden_size), dtype=torch.float32)
    if embed_scale == "exact":
        return float(exact)
    if embed_scale == "hf_bf16":
        return float(exact.to(torch.bfloat16))
    raise ValueError(f"embed_scale must be 'exact', 'hf_bf16' or a number, not {embed_scale!r}")


def forward_layers(
    config: Gemma3Config,
    tensors: Mapping[str, torch.Tensor],
    token_ids: torch.Tensor,
    taps: L.Taps | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    embed_scale: str | float = "exact",
    *,
    observer: L.Observer | None = None,
) -> Generator[int, None, torch.Tensor]:
    """The forward one step at a time: yields L.EMBEDDED after the embedding, i after layer i's
    `l_out-i` tap, and returns `result_norm` `[T, H]`. Inputs and taps: `forward`."""
    tap = L.as_taps(taps)
    ops = L.Ops(observer)
    w = L.Weights(tensors, dtype, device)
    ids = L.check_token_ids(token_ids)
    eps, hd = config.rms_norm_eps, config.head_dim
    t = ids.shape[0]
    pos = torch.arange(t)
    rope = {
        SLIDING: L.rope_cos_sin(L.rope_inv_freq(config.rope_sliding, hd), pos, dtype, device),
        FULL: L.rope_cos_sin(L.rope_inv_freq(config.rope_full, hd), pos, dtype, device),
    }
    scale = config.query_pre_attn_scalar**-0.5

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return L.rms_norm(x, w(name), eps, L.NORM_ONE_PLUS)

    x = w.rows("token_embd.weight", ids) * embed_scale_value(config.hidden_size, embed_scale)
    x = ops.keep(tap("inp_scaled", x))
    yield L.EMBEDDED
    for i in range(config.num_layers):
        p = f"blk.{i}."
        # Intermediates live only in `_attention`'s frame or in one expression, and `del` drops
        # the rest: a calibration sequence parked at a Linear holds just the kept residual and
        # that Linear's input (nvq.quant.capture).
        o = _attention(config, ops, w, tap, norm, i, x, rope[config.layer_type(i)], scale)
        o = ops.linear(o, w(p + "attn_output.weight"))
        o = tap(f"attn_post_norm-{i}", norm(o, p + "post_attention_norm.weight"))
        x = ops.keep(tap(f"ffn_inp-{i}", tap(f"sa_out-{i}", x + o)))
        del o
        m = ops.glu_mlp(
            tap(f"ffn_norm-{i}", norm(x, p + "ffn_norm.weight")),
            w(p + "ffn_gate.weight"),
            w(p + "ffn_up.weight"),
            w(p + "ffn_down.weight"),
            config.hidden_activation,
        )
        m = norm(tap(f"ffn_out-{i}", m), p + "post_ffw_norm.weight")
        x = ops.keep(tap(f"l_out-{i}", x + tap(f"ffn_post_norm-{i}", m)))
        del m
        yield i
    return tap("result_norm", norm(x, "output_norm.weight"))


def _attention(config: Gemma3Config, ops: L.Ops, w: L.Weights, tap, norm, i: int, x: torch.Tensor, rope, scale: float) -> torch.Tensor:
    """Layer i's attention up to `kqv_out-i` (the output projection's input)."""
    p, t, hd = f"blk.{i}.", x.shape[0], config.head_dim
    kind = config.layer_type(i)
    cos, sin = rope
    a = tap(f"attn_norm-{i}", norm(x, p + "attn_norm.weight"))
    q = ops.linear(a, w(p + "attn_q.weight")).view(t, -1, hd)
    k = ops.linear(a, w(p + "attn_k.weight")).view(t, -1, hd)
    v = ops.linear(a, w(p + "attn_v.weight")).view(t, -1, hd)
    del a
    q = norm(q, p + "attn_q_norm.weight")
    k = norm(k, p + "attn_k_norm.weight")
    tap(f"Qcur_normed-{i}", q.reshape(t, -1))
    tap(f"Kcur_normed-{i}", k.reshape(t, -1))
    q = L.apply_rope(q, cos, sin)
    k = L.apply_rope(k, cos, sin)
    tap(f"Qcur-{i}", q.reshape(t, -1))
    tap(f"Kcur-{i}", k.reshape(t, -1))
    tap(f"Vcur-{i}", v.reshape(t, -1))
    window = config.sliding_window if kind == SLIDING else None
    o = L.attention(q, k, v, scale, window=window, softcap=config.attn_logit_softcapping)
    return tap(f"kqv_out-{i}", o)


def head(config: Gemma3Config, hidden: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """Logits of the vocabulary rows `weight_rows` (`[V_chunk, H]`), softcapped elementwise: the
    head in any chunks."""
    return L.softcap(L.UNOBSERVED.linear(hidden, weight_rows), config.final_logit_softcapping)


def forward(
    config: Gemma3Config,
    tensors: Mapping[str, torch.Tensor],
    token_ids: torch.Tensor,
    taps: L.Taps | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    embed_scale: str | float = "exact",
    *,
    observer: L.Observer | None = None,
) -> torch.Tensor:
    """Logits `[T, V]` of one sequence at positions 0..T−1, from canonical tensors holding HF
    values (norm weights w, applied as 1 + w). Tap names: the module docstring."""
    steps = forward_layers(config, tensors, token_ids, taps, dtype, device, embed_scale, observer=observer)
    x = L.run_layers(steps)
    logits = head(config, x, L.Weights(tensors, dtype, device).lm_head())
    return L.as_taps(taps)("result_output", logits)
