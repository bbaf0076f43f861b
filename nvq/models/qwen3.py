"""Qwen3 dense decoder (model_type qwen3): config, name table, reference forward.

Qwen3 is Llama with a per-head RMSNorm on q and k between the projection and RoPE (weights
`q_norm`/`k_norm` of head_dim, llama.cpp `attn_q_norm`/`attn_k_norm`) and no attention bias.
llama.cpp's qwen3 graph uses NEOX RoPE, so its converter leaves the Q/K rows in HF order: no
permutation to undo. Sliding-window layers exist in the config (`use_sliding_window`,
`layer_types`) but no released Qwen3 turns them on; nvq honours them as transformers does.

Taps (llama.cpp graph names, src/models/qwen3.cpp), each `[T, features]`:

| tap | equals |
|---|---|
| `embd` | E[ids] = HF hidden_states[0] |
| `attn_norm-N` | rms(x; attn_norm) |
| `Qcur_normed-N`, `Kcur_normed-N` | q / k projection after the per-head norm, before RoPE |
| `Qcur-N`, `Kcur-N` | after RoPE (llama.cpp's last node of that name) |
| `Vcur-N` | v projection |
| `kqv_out-N` | attention output before the output projection |
| `attn_out-N` | output projection (before the residual add) |
| `ffn_inp-N` | residual after attention |
| `ffn_norm-N` | rms(ffn_inp; ffn_norm) |
| `ffn_out-N` | MLP output |
| `l_out-N` | layer output = HF hidden_states[N+1] (N < L−1) |
| `result_norm`, `result_output` | final norm = HF hidden_states[L]; logits |
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace

import torch

from nvq.io import gguf_config as G
from nvq.io.hf import HFConfig
from nvq.models import layers as L
from nvq.models import llama
from nvq.models.base import NameTable, Role, Row, linear_rows, norm_rows
from nvq.models.blame import COMMON_BLAME, QK_NORM_BLAME
from nvq.models.gguf_fields import ARCH
from nvq.models.llama import _rope_spec

SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Qwen3Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope: L.RopeSpec = L.RopeSpec(theta=10000.0)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    windows: tuple[int | None, ...] = ()  # per layer: sliding window, None = full causal


def windows(cfg: HFConfig, n_layers: int) -> tuple[int | None, ...]:
    """Per-layer windows as transformers' Qwen3 derives them: `sliding_window` applies only with
    `use_sliding_window`, and only on layers whose `layer_types` entry is sliding."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = list(cfg.get("layer_types") or [])
    if window is None or not types:
        return (None,) * n_layers
    return tuple(int(window) if t == SLIDING else None for t in types)


def parse_config(cfg: HFConfig) -> Qwen3Config:
    hidden = int(cfg.require("hidden_size"))
    heads = int(cfg.require("num_attention_heads"))
    n = int(cfg.require("num_hidden_layers"))
    return Qwen3Config(
        hidden_size=hidden,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg.require("intermediate_size")),
        vocab_size=int(cfg.get("vocab_size", 151936)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_spec(cfg),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        windows=windows(cfg, n),
    )


_LAYER = "layers.{bid}"
# Shared with qwen3_moe: everything but the feed-forward block.
ATTENTION_ROWS = [
    Row("embed_tokens.weight", "token_embd.weight", Role.EMBEDDING),
    *norm_rows([("norm", "output_norm")]),
    *linear_rows(
        [
            (f"{_LAYER}.self_attn.q_proj", "blk.{bid}.attn_q", "qkv"),
            (f"{_LAYER}.self_attn.k_proj", "blk.{bid}.attn_k", "qkv"),
            (f"{_LAYER}.self_attn.v_proj", "blk.{bid}.attn_v", "qkv"),
            (f"{_LAYER}.self_attn.o_proj", "blk.{bid}.attn_output", None),
        ]
    ),  # biases only with attention_bias: true
    *norm_rows(
        [
            (f"{_LAYER}.input_layernorm", "blk.{bid}.attn_norm"),
            (f"{_LAYER}.self_attn.q_norm", "blk.{bid}.attn_q_norm"),
            (f"{_LAYER}.self_attn.k_norm", "blk.{bid}.attn_k_norm"),
            # the post-attention norm is the pre-FFN norm: llama.cpp calls it ffn_norm
            (f"{_LAYER}.post_attention_layernorm", "blk.{bid}.ffn_norm"),
        ]
    ),
]
MLP_ROWS = linear_rows(
    [
        (f"{_LAYER}.mlp.gate_proj", "blk.{bid}.ffn_gate", "gate_up"),
        (f"{_LAYER}.mlp.up_proj", "blk.{bid}.ffn_up", "gate_up"),
        (f"{_LAYER}.mlp.down_proj", "blk.{bid}.ffn_down", None),
    ],
    with_bias=False,
)
LM_HEAD = {"lm_head.weight": Row("lm_head.weight", "output.weight", Role.LM_HEAD)}

TABLE = NameTable(rows=[*ATTENTION_ROWS, *MLP_ROWS], text_prefixes=("model.",), top_level=LM_HEAD)

IGNORE_PATTERNS: tuple[str, ...] = ()
MODEL_TYPES = ("qwen3",)
BLAME = (*COMMON_BLAME, *QK_NORM_BLAME)
GGUF_FIELDS = {
    **{k: v for k, v in llama.GGUF_FIELDS.items() if k != "sliding_window"},
    "windows": ARCH,  # llama.cpp's qwen3 graph has no sliding window
}
HF_DEFAULTS = {"tie_word_embeddings": False, "max_position_embeddings": 32768}

# ---------------------------------------------------------------------------------------------
# GGUF metadata → HF config
# ---------------------------------------------------------------------------------------------


def gguf_attention_bias(m: G.Meta, cfg: dict) -> None:
    cfg["attention_bias"] = m.has_tensor("blk.0.attn_q.bias") or m.has_tensor("blk.0.attn_qkv.bias")


GGUF_ARCH = "qwen3"
# Llama's, but llama.cpp's qwen3 graph uses NEOX RoPE, so its converter leaves Q/K rows in HF order
# (no fixes), and only attention has biases.
GGUF_SPEC = replace(
    llama.GGUF_SPEC,
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    derived=(*G.COMMON_DERIVED, G.head_counts, llama.gguf_rope, gguf_attention_bias),
    fixes=(),
)


# ---------------------------------------------------------------------------------------------
# Reference forward
# ---------------------------------------------------------------------------------------------

# (layer index, ffn_norm output, prefix "blk.N.") → the feed-forward block's output `[T, H]`
FFN = Callable[[int, torch.Tensor, str], torch.Tensor]


def decoder_layers(
    config,
    ops: L.Ops,
    w: L.Weights,
    ids: torch.Tensor,
    tap,
    ffn: FFN,
    dtype: torch.dtype,
    device,
) -> Generator[int, None, torch.Tensor]:
    """The Qwen3 decoder with the feed-forward block `ffn` (dense here, MoE in qwen3_moe)."""
    eps, hd = config.rms_norm_eps, config.head_dim
    t = ids.shape[0]
    cos, sin = L.rope_cos_sin(L.rope_inv_freq(config.rope, hd), torch.arange(t), dtype, device)
    x = tap("embd", w.rows("token_embd.weight", ids))
    yield L.EMBEDDED
    for i in range(config.num_layers):
        p = f"blk.{i}."
        a = tap(f"attn_norm-{i}", L.rms_norm(x, w(p + "attn_norm.weight"), eps, L.NORM_LLAMA))
        q = ops.linear(a, w(p + "attn_q.weight"), w.get(p + "attn_q.bias")).view(t, -1, hd)
        k = ops.linear(a, w(p + "attn_k.weight"), w.get(p + "attn_k.bias")).view(t, -1, hd)
        v = tap(f"Vcur-{i}", ops.linear(a, w(p + "attn_v.weight"), w.get(p + "attn_v.bias"))).view(t, -1, hd)
        q = L.rms_norm(q, w(p + "attn_q_norm.weight"), eps, L.NORM_LLAMA)
        k = L.rms_norm(k, w(p + "attn_k_norm.weight"), eps, L.NORM_LLAMA)
        tap(f"Qcur_normed-{i}", q.reshape(t, -1))
        tap(f"Kcur_normed-{i}", k.reshape(t, -1))
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        tap(f"Qcur-{i}", q.reshape(t, -1))
        tap(f"Kcur-{i}", k.reshape(t, -1))
        window = config.windows[i] if config.windows else None
        o = tap(f"kqv_out-{i}", L.attention(q, k, v, hd**-0.5, window=window))
        o = tap(f"attn_out-{i}", ops.linear(o, w(p + "attn_output.weight"), w.get(p + "attn_output.bias")))
        x = tap(f"ffn_inp-{i}", x + o)
        m = tap(f"ffn_norm-{i}", L.rms_norm(x, w(p + "ffn_norm.weight"), eps, L.NORM_LLAMA))
        x = tap(f"l_out-{i}", x + ffn(i, m, p))
        yield i
    return tap("result_norm", L.rms_norm(x, w("output_norm.weight"), eps, L.NORM_LLAMA))


def forward_layers(
    config: Qwen3Config,
    tensors: Mapping[str, torch.Tensor],
    token_ids: torch.Tensor,
    taps: L.Taps | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    observer: L.Observer | None = None,
) -> Generator[int, None, torch.Tensor]:
    """Stepwise forward: yields L.EMBEDDED, then i after `l_out-i`; returns `result_norm`."""
    tap = L.as_taps(taps)
    ops = L.Ops(observer)
    w = L.Weights(tensors, dtype, device)

    def mlp(i: int, m: torch.Tensor, p: str) -> torch.Tensor:
        gate, up, down = w(p + "ffn_gate.weight"), w(p + "ffn_up.weight"), w(p + "ffn_down.weight")
        return tap(f"ffn_out-{i}", ops.glu_mlp(m, gate, up, down, config.hidden_act))

    return (yield from decoder_layers(config, ops, w, L.check_token_ids(token_ids), tap, mlp, dtype, device))


def head(config, hidden: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """Logits of the vocabulary rows `weight_rows` (`[V_chunk, H]`)."""
    return L.UNOBSERVED.linear(hidden, weight_rows)


def forward(
    config: Qwen3Config,
    tensors: Mapping[str, torch.Tensor],
    token_ids: torch.Tensor,
    taps: L.Taps | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    observer: L.Observer | None = None,
) -> torch.Tensor:
    """Logits `[T, V]` of one sequence at positions 0..T−1 from canonical tensors."""
    x = L.run_layers(forward_layers(config, tensors, token_ids, taps, dtype, device, observer=observer))
    logits = head(config, x, L.Weights(tensors, dtype, device).lm_head())
    return L.as_taps(taps)("result_output", logits)
