"""The candidate's config against the config its GGUF oracle carries, field by field.

`SOURCES` says, per architecture and for every field of the parsed config (nvq.models.<arch>
dataclass; RoPE specs flattened to `rope_full.theta`, ...), where the GGUF holds it:

| source | meaning | a difference |
|---|---|---|
| `meta(key)` | metadata key `<arch>.<key>`; when absent llama.cpp falls back to a hard-coded value (oracle.md §1) | present: FAIL; absent: a note naming llama.cpp's fallback |
| `optional(key)` | the converter writes the key only when the feature is on, so absence says "off" | FAIL |
| `TENSORS` | which tensors exist and their shapes (tied head = no `output.weight`) | FAIL |
| `ARCH` | nothing to read: `general.architecture` fixes it (llama.cpp's graph hard-codes it) | FAIL |

Structural fields (`nvq.verify.oracle.STRUCTURAL_FIELDS`, proven by the weights' shapes) always
FAIL. A field the table lacks is not carried by the GGUF: a difference is a note.

The oracle forward runs under the GGUF's values and takes the candidate's only where the GGUF
has nothing (`oracle_run_config`), so a config bug shows in the taps too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvq.models import layers as L
from nvq.verify.findings import FAIL, NOTE, Finding
from nvq.verify.oracle import STRUCTURAL_FIELDS

_PARSED = object()  # Source.fallback: llama.cpp's default is what nvq's GGUF parse already filled in


@dataclass(frozen=True)
class Source:
    keys: tuple[str, ...] = ()  # metadata keys without the "<arch>." prefix; any present carries it
    absent_means_off: bool = False  # the converter omits the key exactly when the feature is off
    tensors: bool = False
    arch: bool = False
    fallback: Any = _PARSED  # llama.cpp's hard-coded value when no key is present
    semantic: bool = True  # False: a difference changes no computed value (context length)


def meta(*keys: str, fallback: Any = _PARSED) -> Source:
    return Source(keys=keys, fallback=fallback)


def optional(*keys: str) -> Source:
    return Source(keys=keys, absent_means_off=True)


TENSORS = Source(tensors=True)
ARCH = Source(arch=True)

# RoPE sub-fields that only the llama3 scaling uses; llama.cpp encodes that as a rope_freqs tensor.
_LLAMA3_ROPE = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(prefix: str, theta: Source, kind: Source, factor: Source, partial: Source, llama3: Source) -> dict:
    return {f"{prefix}.theta": theta, f"{prefix}.kind": kind, f"{prefix}.factor": factor,
            f"{prefix}.partial_rotary_factor": partial, **{f"{prefix}.{k}": llama3 for k in _LLAMA3_ROPE}}


_COMMON = {
    "hidden_size": meta("embedding_length"),
    "num_layers": meta("block_count"),
    "num_heads": meta("attention.head_count"),
    "vocab_size": TENSORS,  # token_embd rows
    "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"),
    "tie_word_embeddings": TENSORS,  # no output.weight = tied
    "max_position_embeddings": Source(keys=("context_length",), semantic=False),
}

SOURCES: dict[str, dict[str, Source]] = {
    "llama": {
        **_COMMON,
        "num_kv_heads": meta("attention.head_count_kv"),
        "head_dim": meta("attention.key_length"),
        "intermediate_size": meta("feed_forward_length"),
        **_rope("rope", meta("rope.freq_base"), optional("rope.scaling.type"), optional("rope.scaling.factor"),
                optional("rope.dimension_count"), TENSORS),
        "hidden_act": ARCH,  # SwiGLU with SiLU
        # Mistral's window: llama GGUFs have no such key and llama.cpp's llama graph attends over
        # the whole context, so the oracle runs with the candidate's window (nvq.models.mistral)
        "sliding_window": meta("attention.sliding_window", fallback=None),
    },
    "gemma3": {
        **_COMMON,
        "num_kv_heads": meta("attention.head_count_kv"),
        "head_dim": meta("attention.key_length"),
        "intermediate_size": meta("feed_forward_length"),
        "layer_types": meta("attention.sliding_window_pattern"),  # absent: every 6th layer full
        "sliding_window": meta("attention.sliding_window"),
        # rope.scaling.* applies to the full-attention layers only (gemma4.md §8)
        **_rope("rope_sliding", meta("rope.freq_base_swa"), ARCH, ARCH, ARCH, ARCH),
        **_rope("rope_full", meta("rope.freq_base"), optional("rope.scaling.type"),
                optional("rope.scaling.factor"), ARCH, ARCH),
        "query_pre_attn_scalar": ARCH,  # 1/√head_dim, 1/√(H/Hq) on the 62-layer 27B
        "attn_logit_softcapping": ARCH,  # llama.cpp's gemma3 graph has none
        "final_logit_softcapping": optional("final_logit_softcapping"),  # absent: 0 = none
        "hidden_activation": ARCH,  # GeGLU with tanh GELU
    },
    "gemma4": {
        **_COMMON,
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
        **_rope("rope_sliding", meta("rope.freq_base_swa"), ARCH, ARCH, ARCH, ARCH),
        # proportional RoPE: rope_freqs holds 1.0 for the rotated pairs (gemma4.md §4.1)
        **_rope("rope_full", meta("rope.freq_base"), ARCH, ARCH, TENSORS, ARCH),
        "final_logit_softcapping": meta("final_logit_softcapping", fallback=30.0),
        "hidden_activation": ARCH,  # GeGLU with tanh GELU
    },
}

SOURCES["mistral"] = SOURCES["llama"]  # llama.cpp converts Mistral as a llama GGUF
SOURCES["qwen3"] = {
    **{k: v for k, v in SOURCES["llama"].items() if k != "sliding_window"},
    "windows": ARCH,  # llama.cpp's qwen3 graph has no sliding window
}
SOURCES["qwen3_moe"] = {
    **SOURCES["qwen3"],
    "intermediate_size": optional("feed_forward_length"),
    "num_experts": meta("expert_count"),
    "top_k": meta("expert_used_count"),
    "moe_intermediate_size": meta("expert_feed_forward_length"),
    "norm_topk_prob": ARCH,  # llama.cpp's qwen3moe graph always renormalizes
    "moe_layers": ARCH,  # every layer is MoE there
}

# Hugging Face config fields that a parsed config may lack, and transformers' default for each.
HF_FIELDS = {
    "tie_word_embeddings": {"llama": False, "gemma3": True, "gemma4": True, "mistral": False, "qwen3": False,
                            "qwen3_moe": False},
    "max_position_embeddings": {"llama": 2048, "gemma3": 131072, "gemma4": 131072, "mistral": 131072,
                                "qwen3": 32768, "qwen3_moe": 32768},
}
_ACTIVATION_FIELDS = frozenset({"hidden_act", "hidden_activation"})
# The HF config.json spelling of parsed fields whose name differs, for the messages.
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "per_layer_input_size": "hidden_size_per_layer_input",
    "rope.theta": "rope_theta",
    "rope.kind": "rope_type",
    "rope.factor": "rope_scaling factor",
    "rope_full.theta": "rope_parameters.full_attention.rope_theta",
    "rope_full.partial_rotary_factor": "rope_parameters.full_attention.partial_rotary_factor",
    "rope_sliding.theta": "rope_parameters.sliding_attention.rope_theta",
}


def leaves(arch_config, hf_config: Mapping | Any, arch: str) -> dict[str, Any]:
    """The parsed config as flat fields (dataclass-valued fields split into `name.sub`), plus the
    HF-only fields of `HF_FIELDS` (from `hf_config`, anything with `.get`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(arch_config):
        value = getattr(arch_config, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            out[f.name] = value
    for name, defaults in HF_FIELDS.items():
        if name not in out:
            value = hf_config.get(name)
            out[name] = defaults.get(arch) if value is None else value
    return out


def compare(arch: str, candidate, oracle, candidate_hf, oracle_hf, metadata: Mapping[str, Any]) -> list[Finding]:
    """Every field where the candidate's parsed config differs from the oracle's, judged by
    where the GGUF holds it (module docstring); `oracle` None (the GGUF's config does not parse)
    gives one note."""
    if oracle is None:
        return [Finding("config", "(all)", None, None, NOTE,
                        "config: the GGUF's metadata does not parse into an nvq config, so no field was compared.")]
    gguf_arch = metadata.get("general.architecture", arch)
    table = SOURCES.get(arch, {})
    ours, theirs = leaves(candidate, candidate_hf, arch), leaves(oracle, oracle_hf, arch)
    findings = []
    for name, a in ours.items():
        b = theirs.get(name)
        src = table.get(name)
        present = [k for k in (src.keys if src else ()) if f"{gguf_arch}.{k}" in metadata]
        if src is not None and not src.semantic and not present:
            continue  # nothing in the GGUF, and nothing computed depends on it
        if src is not None and src.keys and not present and not src.absent_means_off and name not in STRUCTURAL_FIELDS:
            b = b if src.fallback is _PARSED else src.fallback
        layer, a1, b1 = _first_difference(name, a, b)
        if layer is False:
            continue
        where = ("" if name not in HF_NAMES else f" (HF {HF_NAMES[name]})") + ("" if layer is None else f" of layer {layer}")
        said = f"config: {name}{where} is {a1!r} in the candidate but {b1!r}"
        if name in STRUCTURAL_FIELDS:
            verdict, source = FAIL, _describe(src, present, gguf_arch, " and the tensor shapes")
            msg = f"{said} in the oracle GGUF ({source})."
        elif src is None:
            verdict, source = NOTE, None
            msg = f"{said} in the config nvq derives from the GGUF, which does not carry it; the candidate's value is used."
        elif not src.semantic:
            verdict, source = NOTE, _describe(src, present, gguf_arch)
            msg = f"{said} in the oracle GGUF ({source}); it changes no computed value."
        elif src.keys and not present and not src.absent_means_off:
            verdict, source = NOTE, f"{gguf_arch}.{src.keys[0]} absent"
            msg = (f"config: {name}{where} is {a1!r} in the candidate; the GGUF has no '{gguf_arch}.{src.keys[0]}', "
                   f"so llama.cpp falls back to {b1!r} (the oracle runs with the candidate's value).")
        else:
            verdict, source = FAIL, _describe(src, present, gguf_arch)
            msg = f"{said} in the oracle GGUF ({source})."
        findings.append(Finding("config", name, a1, b1, verdict, msg, source, layer))
    return findings


def _describe(src: Source | None, present: list[str], gguf_arch: str, extra: str = "") -> str:
    if src is None:
        return "tensor shapes"
    if present:
        keys = " / ".join(f"{gguf_arch}.{k}" for k in present)
        return f"GGUF key{'s' if len(present) > 1 else ''} {keys}{extra}"
    if src.keys and src.absent_means_off:
        return f"GGUF key {gguf_arch}.{src.keys[0]} absent, i.e. off"
    if src.tensors:
        return "the GGUF's tensors"
    if src.arch:
        return f"general.architecture '{gguf_arch}': llama.cpp hard-codes it"
    return "tensor shapes"


def _first_difference(name: str, a, b):
    """(layer or None, candidate value, oracle value) of the first difference; layer False when
    they agree. Tuples are per-layer fields."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if not _same(name, x, y):
                return i, x, y
        if len(a) != len(b):
            n = min(len(a), len(b))
            return n, (a[n] if n < len(a) else None), (b[n] if n < len(b) else None)
        return False, None, None
    return (False, None, None) if _same(name, a, b) else (None, a, b)


def _same(name: str, a, b) -> bool:
    if name in _ACTIVATION_FIELDS:
        return L.ACTIVATIONS.get(a, a) is L.ACTIVATIONS.get(b, b) or a == b
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return bool(np.float32(a) == np.float32(b))  # the GGUF holds float32
    return a == b


def carried(arch: str, name: str, metadata: Mapping[str, Any]) -> bool:
    """Whether the GGUF holds this field (so the oracle runs under the GGUF's value)."""
    if name in STRUCTURAL_FIELDS:
        return True
    src = SOURCES.get(arch, {}).get(name)
    if src is None:
        return False
    gguf_arch = metadata.get("general.architecture", arch)
    return src.tensors or src.arch or src.absent_means_off or any(f"{gguf_arch}.{k}" in metadata for k in src.keys)


def oracle_run_config(arch: str, candidate, oracle, metadata: Mapping[str, Any]):
    """The config the oracle forward runs under: the GGUF's values, and the candidate's for the
    fields the GGUF does not hold. `oracle` None: the candidate's config."""
    if oracle is None:
        return candidate
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(oracle):
        ours, theirs = getattr(candidate, f.name), getattr(oracle, f.name)
        if dataclasses.is_dataclass(theirs):
            sub = {g.name: getattr(ours, g.name) for g in dataclasses.fields(theirs)
                   if not carried(arch, f"{f.name}.{g.name}", metadata)}
            if sub:
                changes[f.name] = dataclasses.replace(theirs, **sub)
        elif not carried(arch, f.name, metadata):
            changes[f.name] = ours
    return dataclasses.replace(oracle, **changes)
