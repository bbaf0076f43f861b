"""How vLLM names a checkpoint's modules at run time, so that quantization configs written with
HF names select the same layers there.

vLLM fuses shards into one layer (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`, every expert
of a layer into one FusedMoE `experts`) and decides each fused layer's scheme from all its shards:
a shard the checkpoint lacks (a k_eq_v full-attention layer has no v_proj; vLLM copies k_proj into
it) must be named beside its siblings. Its runtime names also move the decoder prefix
(`model.language_model.` of a Gemma-4 conditional checkpoint becomes `language_model.model.`).
compressed-tensors `ignore` entries pass through vLLM's name mapper; GPTQ `dynamic` patterns do
not, so they are written here to match both spellings. Facts: vLLM 0.32 `compressed_tensors/utils.py`,
`utils/gptq_utils.py`, `models/gemma4.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# fused runtime layer -> the checkpoint shards it is built from (vLLM packed_modules_mapping)
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_OF = {shard: fused for fused, shards in FUSED_SHARDS.items() for shard in shards}
# where the decoder sits in HF checkpoints and in vLLM's runtime names
DECODER_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
ANY_DECODER_PREFIX = "(?:" + "|".join(re.escape(p) for p in DECODER_PREFIXES) + ")?"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # the per-expert names FusedMoE checks


def absent_siblings(modules: Iterable[str], present: Iterable[str]) -> list[str]:
    """Shards fused with `modules` that are not in `present` (the checkpoint's modules), by
    full name: vLLM judges a fused layer by all its shards, so they must be named alike."""
    have = set(present)
    out: set[str] = set()
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        for sibling in FUSED_SHARDS.get(FUSED_OF.get(leaf, ""), ()):
            name = f"{parent}.{sibling}"
            if name not in have:
                out.add(name)
    return sorted(out)


def decoder_relative(module: str) -> str:
    """The module's name below the decoder prefix ("layers.3.self_attn.q_proj")."""
    return next((module[len(p):] for p in DECODER_PREFIXES if module.startswith(p)), module)


def runtime_regex(module: str) -> str:
    """A regex (matched from the start, as vLLM and GPTQModel do) for the module under its HF name
    and the names vLLM gives it: any decoder prefix, and the fused layer it is a shard of."""
    parent, _, leaf = decoder_relative(module).rpartition(".")
    leaves = [leaf, FUSED_OF[leaf]] if leaf in FUSED_OF else [leaf]
    head = re.escape(parent) + r"\." if parent else ""
    return f"^{ANY_DECODER_PREFIX}{head}(?:{'|'.join(leaves)})$"


def expert_stack_regex(experts_module: str) -> str:
    """A regex for a fused expert stack kept dense: the FusedMoE layer itself (`…layers.N.experts`,
    what GPTQ `dynamic` is matched against) and the per-expert names compressed-tensors checks."""
    rel = re.escape(decoder_relative(experts_module))
    return f"^{ANY_DECODER_PREFIX}{rel}(?:\\.\\d+\\.(?:{'|'.join(EXPERT_PROJS)}))?$"
