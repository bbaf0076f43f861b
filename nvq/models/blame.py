"""Blame rows: which taps a canonical weight feeds first, so verify's first divergence can name
the weight behind a failing tap. Each architecture module lists the rows of its weights (member
BLAME); a weight no row matches is blamed on its layer's `l_out` (or `result_output`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Blame:
    pattern: str  # full match on the canonical weight name
    # tap families (names without "-N") it feeds; the earliest in graph order wins
    taps: tuple[str, ...]
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    def matches(self, weight: str) -> bool:
        return self.regex.fullmatch(weight) is not None


# Every decoder nvq reads: embeddings, head, attention, the pre-FFN norm and a dense GLU.
COMMON_BLAME = (
    Blame(r"token_embd\..*", ("embd", "inp_scaled")),
    Blame(r"output_norm\..*", ("result_norm",)),
    Blame(r"output\..*", ("result_output",)),
    Blame(r"blk\.\d+\.attn_norm\..*", ("attn_norm",)),
    Blame(r"blk\.\d+\.attn_q\..*", ("Qcur",)),
    Blame(r"blk\.\d+\.attn_k\..*", ("Kcur", "Vcur")),
    Blame(r"blk\.\d+\.attn_v\..*", ("Vcur",)),
    Blame(r"blk\.\d+\.attn_output\..*", ("attn_out", "attn_post_norm")),
    Blame(r"blk\.\d+\.ffn_norm\..*", ("ffn_norm", "ffn_norm_1")),
    Blame(r"blk\.\d+\.ffn_(gate|up|down)\.weight", ("ffn_out", "ffn_mlp")),
)
# Per-head q/k norms before RoPE (Qwen3, Gemma).
QK_NORM_BLAME = (
    Blame(r"blk\.\d+\.attn_q_norm\..*", ("Qcur_normed",)),
    Blame(r"blk\.\d+\.attn_k_norm\..*", ("Kcur_normed",)),
)
# Sandwich norms around attention and the FFN (Gemma).
SANDWICH_BLAME = (
    Blame(r"blk\.\d+\.post_attention_norm\..*", ("attn_post_norm",)),
    Blame(r"blk\.\d+\.post_ffw_norm\..*", ("ffn_post_norm",)),
)
# A routed expert block: the router and every expert stack, fused (Gemma-4's ffn_gate_up_exps) or
# not (Qwen3-MoE's ffn_gate_exps / ffn_up_exps), whole or one expert (`…_exps.weight[E]`).
MOE_BLAME = (
    Blame(r"blk\.\d+\.ffn_gate_inp\..*", ("ffn_moe_logits",)),
    Blame(r"blk\.\d+\.ffn_(gate_up|gate|up|down)_exps\..*", ("ffn_moe_out",)),
)
