"""Llama-family decoders (llama, SmolLM2; mistral reuses them with its window): config, name
table, reference forward.

Convention: llama.cpp's converter permutes the rows of attn_q / attn_k from HF's rotate-half
pairing to interleaved pairing (gemma4.md §8); readers of a GGUF undo it at load. The forward
below therefore uses HF's rotate-half RoPE on HF-ordered rows.

Taps (llama.cpp graph names, src/models/llama.cpp; every tap is `[T, features]`, the ggml tensor
`[ne1.., ne0]` flattened to rows of tokens; per-head tensors are `[T, heads·head_dim]`, head-major):

| tap | equals |
|---|---|
| `embd` | E[ids] = HF hidden_states[0] |
| `attn_norm-N` | rms(x; attn_norm) |
| `Qcur-N`, `Kcur-N` | q / k projection after RoPE (llama.cpp's last node of that name). In HF row order: llama.cpp's own tensor is in GGUF (interleaved) order; `to_gguf_rope_order` maps ours onto it |
| `Vcur-N` | v projection |
| `kqv_out-N` | attention output before the output projection, `[T, Hq·hd]` (order-free: Q/K permutation cancels in q·k) |
| `attn_out-N` | output projection (before the residual add) |
| `ffn_inp-N` | residual after attention |
| `ffn_norm-N` | rms(ffn_inp; ffn_norm) |
| `ffn_out-N` | MLP output (down projection) |
| `l_out-N` | layer output = ffn_inp + ffn_out = HF hidden_states[N+1] (N < L−1) |
| `result_norm` | final norm = HF hidden_states[L] |
| `result_output` | logits |
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
from nvq.models.blame import COMMON_BLAME
from nvq.models.gguf_fields import ARCH, COMMON_FIELDS, TENSORS, meta, optional, rope_fields


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    # Fields the reference forward needs (defaults: transformers' LlamaConfig defaults).
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    rope: L.RopeSpec = L.RopeSpec(theta=10000.0)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False  # informational: the forward uses output.weight if loaded
    # Keys attend to queries at most this many positions back (Mistral); None = full causal.
    sliding_window: int | None = None


def _rope_spec(cfg: HFConfig) -> L.RopeSpec:
    # transformers 5 writes `rope_parameters` (theta inside); older configs `rope_theta` plus an
    # optional `rope_scaling` dict.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return L.RopeSpec.from_hf(params, 10000.0)


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
        vocab_size=int(cfg.get("vocab_size", 32000)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_spec(cfg),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
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
MODEL_TYPES = ("llama",)

# ---------------------------------------------------------------------------------------------
# GGUF metadata → HF config
# ---------------------------------------------------------------------------------------------


def gguf_rope(m: G.Meta, cfg: dict) -> None:
    """Llama-style RoPE (also Qwen3's): whole heads rotate, scaling none or linear."""
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
    cfg["rope_parameters"] = G.rope_parameters(m, G.f32(m.scalar("rope.freq_base", 10000.0)))


def _biases(m: G.Meta, cfg: dict) -> None:
    cfg["attention_bias"] = m.has_tensor("blk.0.attn_q.bias") or m.has_tensor("blk.0.attn_qkv.bias")
    cfg["mlp_bias"] = m.has_tensor("blk.0.ffn_up.bias")


GGUF_ARCH = "llama"
GGUF_SPEC = G.ArchSpec(
    architecture="LlamaForCausalLM",
    model_type="llama",
    hf_prefix="model.",
    keys=(*G.COMMON_KEYS, G.Key("feed_forward_length", "intermediate_size")),
    derived=(*G.COMMON_DERIVED, G.head_counts, gguf_rope, _biases),
    constants={"hidden_act": "silu"},
    # llama.cpp's converter permutes Q/K rows (gemma4.md §8)
    fixes=(
        G.Fix(r"blk\.\d+\.attn_q\.(weight|bias)", G.Unpermute("q")),
        G.Fix(r"blk\.\d+\.attn_k\.(weight|bias)", G.Unpermute("k")),
    ),
)

BLAME = COMMON_BLAME
# where the GGUF holds each parsed config field (nvq.models.gguf_fields)
GGUF_FIELDS = {
    **COMMON_FIELDS,
    "num_kv_heads": meta("attention.head_count_kv"),
    "head_dim": meta("attention.key_length"),
    "intermediate_size": meta("feed_forward_length"),
    **rope_fields("rope", meta("rope.freq_base"), optional("rope.scaling.type"), optional("rope.scaling.factor"),
                  optional("rope.dimension_count"), TENSORS),
    "hidden_act": ARCH,  # SwiGLU with SiLU
    # Mistral's window: llama GGUFs have no such key and llama.cpp's llama graph attends over
    # the whole context, so the oracle runs with the candidate's window (nvq.models.mistral)
    "sliding_window": meta("attention.sliding_window", fallback=None),
}
# transformers' defaults of HF config fields the parsed config may lack
HF_DEFAULTS = {"tie_word_embeddings": False, "max_position_embeddings": 2048}


# ---------------------------------------------------------------------------------------------
# Reference forward
# ---------------------------------------------------------------------------------------------


def forward_layers(
    config: LlamaConfig,
    tensors: Mapping[str, torch.Tensor],
    token_ids: torch.Tensor,
    taps: L.Taps | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
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
    cos, sin = L.rope_cos_sin(L.rope_inv_freq(config.rope, hd), torch.arange(t), dtype, device)

    x = ops.keep(tap("embd", w.rows("token_embd.weight", ids)))
    yield L.EMBEDDED
    for i in range(config.num_layers):
        p = f"blk.{i}."
        # Intermediates live only in `_attention`'s frame or in one expression, and `del` drops
        # the rest: a calibration sequence parked at a Linear holds just the kept residual and
        # that Linear's input (nvq.quant.capture).
        o = _attention(config, ops, w, tap, i, x, cos, sin)
        o = ops.linear(o, w(p + "attn_output.weight"), w.get(p + "attn_output.bias"))
        x = ops.keep(tap(f"ffn_inp-{i}", x + tap(f"attn_out-{i}", o)))
        del o
        m = ops.glu_mlp(
            tap(f"ffn_norm-{i}", L.rms_norm(x, w(p + "ffn_norm.weight"), eps, L.NORM_LLAMA)),
            w(p + "ffn_gate.weight"),
            w(p + "ffn_up.weight"),
            w(p + "ffn_down.weight"),
            config.hidden_act,
            (w.get(p + "ffn_gate.bias"), w.get(p + "ffn_up.bias"), w.get(p + "ffn_down.bias")),
        )
        x = ops.keep(tap(f"l_out-{i}", x + tap(f"ffn_out-{i}", m)))
        del m
        yield i
    return tap("result_norm", L.rms_norm(x, w("output_norm.weight"), eps, L.NORM_LLAMA))


def _attention(
    config: LlamaConfig, ops: L.Ops, w: L.Weights, tap, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Layer i's attention up to `kqv_out-i` (the output projection's input)."""
    p, t, hd = f"blk.{i}.", x.shape[0], config.head_dim
    a = tap(f"attn_norm-{i}", L.rms_norm(x, w(p + "attn_norm.weight"), config.rms_norm_eps, L.NORM_LLAMA))
    q = ops.linear(a, w(p + "attn_q.weight"), w.get(p + "attn_q.bias")).view(t, -1, hd)
    k = ops.linear(a, w(p + "attn_k.weight"), w.get(p + "attn_k.bias")).view(t, -1, hd)
    v = ops.linear(a, w(p + "attn_v.weight"), w.get(p + "attn_v.bias")).view(t, -1, hd)
    del a
    q = L.apply_rope(q, cos, sin)
    k = L.apply_rope(k, cos, sin)
    tap(f"Qcur-{i}", q.reshape(t, -1))
    tap(f"Kcur-{i}", k.reshape(t, -1))
    tap(f"Vcur-{i}", v.reshape(t, -1))
    return tap(f"kqv_out-{i}", L.attention(q, k, v, hd**-0.5, window=config.sliding_window))


def head(config: LlamaConfig, hidden: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """Logits of the vocabulary rows `weight_rows` (`[V_chunk, H]`): the head in any chunks."""
    return L.UNOBSERVED.linear(hidden, weight_rows)


def forward(
    config: LlamaConfig,
    tensors: Mapping[str, torch.Tensor],
    token_ids: torch.Tensor,
    taps: L.Taps | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    observer: L.Observer | None = None,
) -> torch.Tensor:
    """Logits `[T, V]` of one sequence at positions 0..T−1, from canonical tensors holding HF
    values (no GGUF Q/K permutation). Tap names: the module docstring."""
    x = L.run_layers(forward_layers(config, tensors, token_ids, taps, dtype, device, observer=observer))
    logits = head(config, x, L.Weights(tensors, dtype, device).lm_head())
    return L.as_taps(taps)("result_output", logits)


def to_gguf_rope_order(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the last dim of an HF-ordered Q/K tensor (`[..., n_heads·hd]`) into the interleaved
    order of llama.cpp's permuted attn_q/attn_k: per head, GGUF index 2j = HF j and 2j+1 = HF j+hd/2.

    Maps the reference's `Qcur-N`/`Kcur-N` onto llama.cpp's (the permutation commutes with RoPE).
    """
    *lead, n = x.shape
    hd = n // n_heads
    return x.reshape(*lead, n_heads, 2, hd // 2).transpose(-1, -2).reshape(*lead, n)
