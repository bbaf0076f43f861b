"""The candidate's config against the config its GGUF oracle carries, field by field.

Each architecture module's GGUF_FIELDS says, for every field of its parsed config, where the GGUF
holds it (nvq.models.gguf_fields: a key, a key present only when the feature is on, the tensors,
or nothing but general.architecture), and so how a difference is judged.

Structural fields (`nvq.verify.oracle.STRUCTURAL_FIELDS`, proven by the weights' shapes) always
FAIL. A field the table lacks is not carried by the GGUF: a difference is a note.

The oracle forward runs under the GGUF's values and takes the candidate's only where the GGUF
has nothing (`oracle_run_config`), so a config bug shows in the taps too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from nvq.models import ARCHITECTURES
from nvq.models import layers as L
from nvq.models.gguf_fields import PARSED, Source
from nvq.verify.findings import FAIL, NOTE, Finding
from nvq.verify.oracle import STRUCTURAL_FIELDS

# Hugging Face config fields that a parsed config may lack; each architecture's HF_DEFAULTS holds
# transformers' default for them.
HF_ONLY_FIELDS = ("tie_word_embeddings", "max_position_embeddings")
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
    HF-only fields of `HF_ONLY_FIELDS` (from `hf_config`, anything with `.get`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(arch_config):
        value = getattr(arch_config, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            out[f.name] = value
    defaults = ARCHITECTURES[arch].HF_DEFAULTS
    for name in HF_ONLY_FIELDS:
        if name not in out:
            value = hf_config.get(name)
            out[name] = defaults.get(name) if value is None else value
    return out


def compare(arch: str, candidate, oracle, candidate_hf, oracle_hf, metadata: Mapping[str, Any]) -> list[Finding]:
    """Every field where the candidate's parsed config differs from the oracle's, judged by
    where the GGUF holds it (module docstring); `oracle` None (the GGUF's config does not parse)
    gives one note."""
    if oracle is None:
        return [Finding("config", "(all)", None, None, NOTE,
                        "config: the GGUF's metadata does not parse into an nvq config, so no field was compared.")]
    gguf_arch = metadata.get("general.architecture", arch)
    table = ARCHITECTURES[arch].GGUF_FIELDS
    ours, theirs = leaves(candidate, candidate_hf, arch), leaves(oracle, oracle_hf, arch)
    findings = []
    for name, a in ours.items():
        b = theirs.get(name)
        src = table.get(name)
        present = [k for k in (src.keys if src else ()) if f"{gguf_arch}.{k}" in metadata]
        if src is not None and not src.semantic and not present:
            continue  # nothing in the GGUF, and nothing computed depends on it
        if src is not None and src.keys and not present and not src.absent_means_off and name not in STRUCTURAL_FIELDS:
            b = b if src.fallback is PARSED else src.fallback
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
    src = ARCHITECTURES[arch].GGUF_FIELDS.get(name)
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
