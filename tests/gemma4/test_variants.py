"""The miniatures keep the structure of the released variants (gemma4.md §7) in every form and
config dialect, as nvq, transformers and llama.cpp read it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nvq.io.hf import load_config
from nvq.models import for_config
from tests.gemma4.conftest import CASES, Case
from tests.support.gemma4_variants import GEMMA4_DIALECTS, GEMMA4_FORMS, GEMMA4_VARIANTS

# What each miniature must be, written out independently of the builder's table.
STRUCTURE = {
    "e2b": dict(layers=10, full=(4, 9), heads=4, kv=(1, 1), k_eq_v=False, ple=64, first_shared=5,
                mlp=(256,) * 5 + (512,) * 5, experts=None),
    "e4b": dict(layers=12, full=(5, 11), heads=4, kv=(2, 2), k_eq_v=False, ple=64, first_shared=6,
                mlp=(256,) * 12, experts=None),
    "12b-unified": dict(layers=6, full=(5,), heads=4, kv=(2, 1), k_eq_v=True, ple=0, first_shared=6,
                        mlp=(256,) * 6, experts=None),
    "26b-a4b": dict(layers=6, full=(5,), heads=8, kv=(4, 2), k_eq_v=True, ple=0, first_shared=6,
                    mlp=(64,) * 6, experts=(8, 2, 64)),
    "31b": dict(layers=6, full=(5,), heads=8, kv=(4, 1), k_eq_v=True, ple=0, first_shared=6,
                mlp=(256,) * 6, experts=None),
}  # fmt: skip
HEAD_DIM = {"sliding_attention": 16, "full_attention": 32}
ARCHITECTURES = {
    ("gemma4", "conditional"): ("Gemma4ForConditionalGeneration", "gemma4", "gemma4_text"),
    ("gemma4", "causal"): ("Gemma4ForCausalLM", "gemma4_text", None),
    ("gemma4_unified", "conditional"): ("Gemma4UnifiedForConditionalGeneration", "gemma4_unified", "gemma4_unified_text"),
    ("gemma4_unified", "causal"): ("Gemma4UnifiedForCausalLM", "gemma4_unified_text", None),
}
TOWER_PREFIXES = {
    "gemma4": ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio."),
    # encoder-free: transformers saves the vision embedder under its checkpoint name
    "gemma4_unified": ("model.vision_embedder.", "model.embed_vision.", "model.embed_audio."),
}
TEXT_PREFIXES = ("model.language_model.", "model.")


def family(variant: str) -> str:
    return "gemma4_unified" if variant == "12b-unified" else "gemma4"


def text_config(path) -> dict:
    raw = json.loads((path / "config.json").read_text())
    return raw.get("text_config") or raw


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_miniature_keeps_the_release_structure(case, minis):
    want = STRUCTURE[case.variant]
    cfg = for_config(load_config(minis.original(case))).config
    full = tuple(i for i, t in enumerate(cfg.layer_types) if t == "full_attention")
    assert (cfg.num_layers, full, cfg.num_heads) == (want["layers"], want["full"], want["heads"])
    kv_sliding, kv_full = want["kv"]
    assert cfg.num_kv_heads == tuple(kv_full if i in full else kv_sliding for i in range(cfg.num_layers))
    assert cfg.head_dim == tuple(HEAD_DIM[t] for t in cfg.layer_types)
    assert cfg.has_v_proj == tuple(not (want["k_eq_v"] and i in full) for i in range(cfg.num_layers))
    assert cfg.per_layer_input_size == want["ple"] and cfg.mlp_width == want["mlp"]
    experts = (cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size)
    assert experts == (want["experts"] or (0, 0, 0))
    assert cfg.first_kv_shared == want["first_shared"]
    if cfg.first_kv_shared < cfg.num_layers:
        # transformers' donors (last non-shared layer of each type) are where llama.cpp hard-codes
        # them, first_shared-2 (sliding) and first_shared-1 (full); it asserts otherwise (§2.6)
        donor = {"sliding_attention": cfg.first_kv_shared - 2, "full_attention": cfg.first_kv_shared - 1}
        shared = range(cfg.first_kv_shared, cfg.num_layers)
        assert [cfg.kv_source[i] for i in shared] == [donor[cfg.layer_types[i]] for i in shared]
        assert cfg.layer_types[cfg.first_kv_shared - 1] == "full_attention"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_miniature_class_and_towers_follow_its_form(case, minis):
    path = minis.original(case)
    raw = json.loads((path / "config.json").read_text())
    arch, model_type, text_type = ARCHITECTURES[(family(case.variant), case.form)]
    assert raw["architectures"] == [arch] and raw["model_type"] == model_type
    assert raw.get("text_config", {}).get("model_type") == text_type
    names = load_file(path / "model.safetensors").keys()
    towers = {p for p in TOWER_PREFIXES[family(case.variant)] if any(n.startswith(p) for n in names)}
    if case.form == "conditional":
        assert towers == set(TOWER_PREFIXES[family(case.variant)])
        assert raw["vision_config"] is not None and raw["audio_config"] is not None
    else:
        assert not any(n.startswith(("model.vision", "model.audio", "model.embed_v", "model.embed_a")) for n in names)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_config_dialect_on_disk(case, minis):
    text = text_config(minis.original(case))
    full = [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
    k_eq_v = STRUCTURE[case.variant]["k_eq_v"]
    if case.dialect == "global":
        assert "per_layer_config" not in text and text["global_head_dim"] == 32
        assert ("num_global_key_value_heads" in text) == k_eq_v  # E2B/E4B omit it
    else:
        assert "global_head_dim" not in text and "num_global_key_value_heads" not in text
        plc = text["per_layer_config"]
        # transformers zero-pads the keys once a full layer index has two digits
        width = len(str(max(full)))
        assert sorted(plc) == [str(i).zfill(width) for i in full]
        assert all(v["head_dim"] == 32 for v in plc.values())
        if k_eq_v:
            assert all(v["num_key_value_heads"] == STRUCTURE[case.variant]["kv"][1] for v in plc.values())


@pytest.mark.parametrize("variant", GEMMA4_VARIANTS)
def test_decoder_weights_are_the_same_in_every_form_and_dialect(variant, minis):
    def decoder(case):
        tensors = load_file(minis.original(case) / "model.safetensors")
        out = {}
        for name, t in tensors.items():
            prefix = next(p for p in TEXT_PREFIXES if name.startswith(p))
            if not name.startswith(TOWER_PREFIXES[family(variant)]):
                out[name[len(prefix):]] = t
        return out

    cases = [Case(variant, f, d) for f in GEMMA4_FORMS for d in GEMMA4_DIALECTS]
    first, *rest = (decoder(c) for c in cases)
    assert len(first) > 20
    for other in rest:
        assert other.keys() == first.keys()
        assert all(torch.equal(first[n], other[n]) for n in first)
