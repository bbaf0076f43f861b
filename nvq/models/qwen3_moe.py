"""Qwen3-MoE decoder (model_type qwen3_moe): config, name table, reference forward.

Attention is Qwen3's (nvq.models.qwen3). The feed-forward block of a MoE layer is a softmax
router over `num_experts` experts (128 in released models), top-`num_experts_per_tok` (8), the
k weights renormalized when `norm_topk_prob`, and no shared expert. Layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` grid, run a dense SwiGLU instead
(transformers' rule; released models have none, and llama.cpp's qwen3moe graph has no such layer).

Expert storage: transformers 5 holds the experts fused in memory (`experts.gate_up_proj`) but
writes one Linear per expert (`mlp.experts.E.{gate,up,down}_proj`), as released checkpoints do;
llama.cpp's converter stacks them into `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`
([E, Ie, H], [E, Ie, H], [E, H, Ie]). Per-expert tensors are canonical `blk.N.ffn_gate_exps.weight[E]`
(quantized one by one, gate and up of an expert sharing a fusion group); verify stacks a
candidate's per-expert modules into the GGUF's three stacks (rows `experts.{gate,up,down}_proj`).

Taps: Qwen3's attention taps (nvq.models.qwen3), then on MoE layers (src/models/qwen3moe.cpp):

| tap | equals |
|---|---|
| `ffn_moe_logits-N`, `ffn_moe_probs-N` | router projection of ffn_norm; softmax over all experts |
| `ffn_moe_topk-N` | selected expert ids `[T, K]` (int64) |
| `ffn_moe_weights_norm-N` | their weights (renormalized when norm_topk_prob) |
| `ffn_moe_out-N` | Σ_k w_k · expert_k(ffn_norm) |

and `ffn_out-N` on dense layers; `l_out-N` = ffn_inp + the block's output.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass

import torch

from nvq.io import gguf_config as G
from nvq.io.hf import HFConfig
from nvq.models import layers as L
from nvq.models import qwen3
from nvq.models.base import NameTable, Role, Row
from nvq.models.blame import MOE_BLAME
from nvq.models.gguf_fields import ARCH, meta, optional
from nvq.models.llama import gguf_rope
from nvq.models.qwen3 import head  # noqa: F401  (the module's protocol)


@dataclass(frozen=True)
class Qwen3MoeConfig(qwen3.Qwen3Config):
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense SwiGLU


def parse_config(cfg: HFConfig) -> Qwen3MoeConfig:
    base = qwen3.parse_config(cfg)
    # transformers 5 writes num_local_experts; older configs num_experts
    experts = int(cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0)
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = {int(i) for i in cfg.get("mlp_only_layers") or []}
    moe = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(base.num_layers))
    return Qwen3MoeConfig(
        **{f: getattr(base, f) for f in base.__dataclass_fields__},
        num_experts=experts,
        top_k=int(cfg.get("num_experts_per_tok", 0) or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=moe,
    )


_LAYER = "layers.{bid}"
_EXPERT = f"{_LAYER}.mlp.experts.{{xid}}"
ROWS = [
    *qwen3.ATTENTION_ROWS,
    *qwen3.MLP_ROWS,  # dense layers (mlp_only_layers)
    Row(f"{_LAYER}.mlp.gate.weight", "blk.{bid}.ffn_gate_inp.weight", Role.ROUTER),
    # one Linear per expert, as checkpoints store them; gate and up of an expert share a scale
    Row(f"{_EXPERT}.gate_proj.weight", "blk.{bid}.ffn_gate_exps.weight[{xid}]", Role.LINEAR, "gate_up"),
    Row(f"{_EXPERT}.up_proj.weight", "blk.{bid}.ffn_up_exps.weight[{xid}]", Role.LINEAR, "gate_up"),
    Row(f"{_EXPERT}.down_proj.weight", "blk.{bid}.ffn_down_exps.weight[{xid}]", Role.LINEAR),
    # the stacks a GGUF holds, and verify assembles from the per-expert modules
    # (expert e's gate and up share one NVFP4 global scale, as the per-expert Linears do)
    Row(f"{_LAYER}.mlp.experts.gate_proj", "blk.{bid}.ffn_gate_exps.weight", Role.EXPERTS_GATE, "exps_gate_up"),
    Row(f"{_LAYER}.mlp.experts.up_proj", "blk.{bid}.ffn_up_exps.weight", Role.EXPERTS_UP, "exps_gate_up"),
    Row(f"{_LAYER}.mlp.experts.down_proj", "blk.{bid}.ffn_down_exps.weight", Role.EXPERTS_DOWN),
]

TABLE = NameTable(rows=ROWS, text_prefixes=("model.",), top_level=qwen3.LM_HEAD)

IGNORE_PATTERNS: tuple[str, ...] = ()
MODEL_TYPES = ("qwen3_moe",)
BLAME = (*qwen3.BLAME, *MOE_BLAME)
GGUF_FIELDS = {
    **qwen3.GGUF_FIELDS,
    "intermediate_size": optional("feed_forward_length"),
    "num_experts": meta("expert_count"),
    "top_k": meta("expert_used_count"),
    "moe_intermediate_size": meta("expert_feed_forward_length"),
    "norm_topk_prob": ARCH,  # llama.cpp's qwen3moe graph always renormalizes
    "moe_layers": ARCH,  # every layer is MoE there
}
HF_DEFAULTS = qwen3.HF_DEFAULTS

# ---------------------------------------------------------------------------------------------
# GGUF metadata → HF config
# ---------------------------------------------------------------------------------------------


def _gguf_moe(m: G.Meta, cfg: dict) -> None:
    # llama.cpp's qwen3moe graph runs every layer as MoE with renormalized top-k weights.
    cfg["num_experts"] = int(m.scalar("expert_count"))
    cfg["num_experts_per_tok"] = int(m.scalar("expert_used_count"))
    cfg["moe_intermediate_size"] = int(m.scalar("expert_feed_forward_length"))
    cfg["intermediate_size"] = int(m.scalar("feed_forward_length", cfg["moe_intermediate_size"]))


GGUF_ARCH = "qwen3moe"
GGUF_SPEC = G.ArchSpec(
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    hf_prefix="model.",
    keys=G.COMMON_KEYS,
    derived=(*G.COMMON_DERIVED, G.head_counts, gguf_rope, qwen3.gguf_attention_bias, _gguf_moe),
    # not in the GGUF: llama.cpp's graph hard-codes both (src/models/qwen3moe.cpp)
    constants={"hidden_act": "silu", "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
)


# ---------------------------------------------------------------------------------------------
# Reference forward
# ---------------------------------------------------------------------------------------------


def _experts(w: L.Weights, name: str) -> L.ExpertStack | L.ExpertModules:
    """A stack (GGUF, verify) or, from a per-expert checkpoint, its experts one by one."""
    return w.experts(name) if name in w else L.ExpertModules(w, name)


def forward_layers(
    config: Qwen3MoeConfig,
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

    def ffn(i: int, m: torch.Tensor, p: str) -> torch.Tensor:
        if not config.moe_layers[i]:
            gate, up, down = w(p + "ffn_gate.weight"), w(p + "ffn_up.weight"), w(p + "ffn_down.weight")
            return tap(f"ffn_out-{i}", ops.glu_mlp(m, gate, up, down, config.hidden_act))
        r = ops.softmax_route(m, w(p + "ffn_gate_inp.weight"), config.top_k, config.norm_topk_prob)
        tap(f"ffn_moe_logits-{i}", r.logits)
        tap(f"ffn_moe_probs-{i}", r.probs)
        tap(f"ffn_moe_topk-{i}", r.experts)
        tap(f"ffn_moe_weights_norm-{i}", r.weights_norm)
        gate, up = _experts(w, p + "ffn_gate_exps.weight"), _experts(w, p + "ffn_up_exps.weight")
        down = _experts(w, p + "ffn_down_exps.weight")
        return tap(f"ffn_moe_out-{i}", ops.moe_glu(m, gate, up, down, r.experts, r.weights, config.hidden_act))

    ids = L.check_token_ids(token_ids)
    return (yield from qwen3.decoder_layers(config, ops, w, ids, tap, ffn, dtype, device))


def forward(
    config: Qwen3MoeConfig,
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
