"""One test per bug that shipped in third-party Gemma-4 NVFP4 releases (issue 5, "Why"), plus the
bugs these miniatures found in nvq itself; each named after its bug and run through nvq's real
code path on the miniatures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from nvq.io.gguf import GGUFFile
from nvq.io.gguf_model import GGUFModel
from nvq.io.hf import Checkpoint, HFConfig, load_config
from nvq.models import for_config
from nvq.verify.candidate import load_candidate
from nvq.verify.taps import run_forward
from tests.gemma4.conftest import CASES, KV_SHARING_VARIANTS, SCHEMES, Case, nvq, vestigial_key

MOE_CASES = [c for c in CASES if c.has_moe]
PREFIXES = ("model.language_model.", "model.")


def text_config(path) -> dict:
    raw = json.loads((path / "config.json").read_text())
    return raw.get("text_config") or raw


def layer_prefix(tensors: dict, layer: int) -> str:
    return next(f"{p}layers.{layer}." for p in PREFIXES if f"{p}layers.{layer}.input_layernorm.weight" in tensors)


@pytest.mark.parametrize("case", [c for c in CASES if c.form == "conditional"], ids=lambda c: c.id)
def test_nested_text_config_attention_heads(case, minis):
    # Multimodal configs keep num_attention_heads (and every decoder field) in text_config only;
    # loaders that read the top level found nothing (or the vision tower's value).
    out = minis.converted(case, "nvfp4")
    raw = json.loads((out / "config.json").read_text())
    heads = raw["text_config"]["num_attention_heads"]
    assert "num_attention_heads" not in raw
    assert raw["vision_config"].get("num_attention_heads") != heads  # the tower's value is not it
    assert load_config(out).require("num_attention_heads") == heads
    cand = load_candidate(out)
    assert cand.arch.config.num_heads == heads
    q = cand.tensors["blk.0.attn_q.weight"]
    assert q.shape[0] == heads * cand.arch.config.head_dim[0]


@pytest.mark.parametrize("case, scheme", [pytest.param(c, s, id=f"{c.id}-{s}") for c in CASES for s in SCHEMES])
def test_scaling_extras_emitted(case, scheme, minis):
    # layer_scalar, router.scale and router.per_expert_scale are not Linear weights: converters that
    # only walk nn.Linear modules (or only `.weight` names) left them out, so they defaulted to 1.
    source = load_file(minis.original(case) / "model.safetensors")
    out_dir = minis.converted(case, scheme)
    out = load_file(out_dir / "model.safetensors")
    n_layers = text_config(out_dir)["num_hidden_layers"]
    extras = ["layer_scalar"] + (["router.scale", "router.per_expert_scale"] if case.has_moe else [])
    cand = load_candidate(out_dir)
    canonical = {"layer_scalar": "layer_output_scale.weight", "router.scale": "ffn_gate_inp.scale",
                 "router.per_expert_scale": "ffn_down_exps.scale"}  # fmt: skip
    for i in range(n_layers):
        for extra in extras:
            name = layer_prefix(out, i) + extra
            assert name in out and out[name].dtype == source[name].dtype == torch.bfloat16, name
            assert torch.equal(out[name], source[name]), name
            c = f"blk.{i}.{canonical[extra]}"
            assert not cand.schemes[c].quantized and torch.equal(cand.tensors[c], source[name].float()), c
            assert (out[name] != 1).any(), name  # the miniatures keep them away from the default


FFN_NORMS = {  # HF name → (canonical name, the tap that first reads it in a MoE layer)
    "pre_feedforward_layernorm": ("ffn_norm", "ffn_norm_1"),
    "post_feedforward_layernorm_1": ("post_ffw_norm_1", "ffn_mlp"),
    "pre_feedforward_layernorm_2": ("pre_ffw_norm_2", "ffn_norm_2"),
    "post_feedforward_layernorm_2": ("post_ffw_norm_2", "ffn_moe"),
    "post_feedforward_layernorm": ("post_ffw_norm", "ffn_post_norm"),
}


@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: c.id)
def test_base_ffn_norms_routed(case, minis):
    # A MoE layer has five weighted FFN norms (the router's own RMSNorm has no weight); releases
    # dropped the base pre/post ones when the _1/_2 ones were present. Each must reach the output,
    # reach nvq's forward under its llama.cpp name, and be read where llama.cpp reads it.
    source = load_file(minis.original(case) / "model.safetensors")
    out_dir = minis.converted(case, "nvfp4")
    out = load_file(out_dir / "model.safetensors")
    cand = load_candidate(out_dir)
    ids = [torch.arange(4, 36)]
    base = run_forward(cand.arch, cand.tensors, ids)
    for layer in (0, 5):  # a sliding and the full layer
        for hf, (canonical, tap) in FFN_NORMS.items():
            name = f"{layer_prefix(out, layer)}{hf}.weight"
            assert torch.equal(out[name], source[name]), name
            c = f"blk.{layer}.{canonical}.weight"
            assert torch.equal(cand.tensors[c], source[name].float()), c
            ones = dict(cand.tensors) | {c: torch.ones_like(cand.tensors[c])}
            run = run_forward(cand.arch, ones, ids)
            assert torch.equal(run.taps[f"attn_out-{layer}"], base.taps[f"attn_out-{layer}"])
            assert not torch.allclose(run.taps[f"{tap}-{layer}"], base.taps[f"{tap}-{layer}"]), c


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_scalar_head_dim_is_max_over_layers(case, minis):
    # Full layers have the larger head_dim (global_head_dim); whatever is sized "for the model"
    # (KV cache rows, q/k/v buffers) must take the max over layer types, not the top-level
    # head_dim of the sliding layers. vLLM reads a full layer's head_dim from `global_head_dim`
    # (gemma4.md §6), llama.cpp from the scalar attention.key_length (§4.3).
    out_dir = minis.converted(case, "nvfp4")
    cfg = for_config(load_config(out_dir)).config
    widest = max(cfg.head_dim)
    text = text_config(out_dir)
    assert widest == 32 > text["head_dim"] == min(cfg.head_dim)
    assert all(cfg.head_dim[i] == widest for i, t in enumerate(cfg.layer_types) if t == "full_attention")
    if case.dialect == "global":
        assert text["global_head_dim"] == widest  # what vLLM reads
    else:
        assert {v["head_dim"] for v in text["per_layer_config"].values()} == {widest}
    oracle = minis.oracle(case)
    gf = GGUFFile.open(oracle)
    assert gf.get("gemma4.attention.key_length") == widest
    assert gf.get("gemma4.attention.key_length_swa") == text["head_dim"]
    assert GGUFModel.open(oracle).config["global_head_dim"] == widest
    if case.dialect == "per_layer":
        # nvq's own GGUF → HF export writes the key vLLM reads, whatever dialect the original had
        export = minis.root / "exports" / case.id
        result = nvq("convert", oracle, export, "--scheme", "bf16")
        assert result.exit_code == 0, result.output
        exported = json.loads((export / "config.json").read_text())
        assert (exported["head_dim"], exported["global_head_dim"]) == (text["head_dim"], widest)


@pytest.mark.parametrize("case, scheme", [pytest.param(c, s, id=f"{c.id}-{s}") for c in CASES for s in SCHEMES])
def test_packed_vs_logical_k(case, scheme, minis):
    # A packed FP4 weight stores two codes per byte: weight_packed is [N, K/2]. Readers that took
    # its width for K sized the scales and the layer at half the input dimension.
    src = Checkpoint.open(minis.original(case))
    out_dir = minis.converted(case, scheme)
    out = load_file(out_dir / "model.safetensors")
    group = {"nvfp4": 16, "mxfp4": 32}[scheme]
    checked = 0
    for name, t in out.items():
        if not name.endswith(".weight_packed"):
            continue
        module = name.removesuffix(".weight_packed")
        n, packed_width = t.shape
        assert out[f"{module}.weight_scale"].shape == (n, 2 * packed_width // group), module
        checked += 1
    assert checked
    cand = load_candidate(out_dir)
    arch = for_config(src.config)
    mapped = [m for m in arch.table.resolve_all(src.tensors, arch.config) if m.canonical]
    assert {m.canonical for m in mapped} == set(cand.tensors)
    for m in mapped:  # every weight read back at its logical shape, quantized or not
        assert tuple(cand.tensors[m.canonical].shape) == tuple(src.tensors[m.source].shape), m.canonical
    assert any(s.quantized for s in cand.schemes.values())


@pytest.mark.parametrize("case, scheme", [pytest.param(c, s, id=f"{c.id}-{s}") for c in MOE_CASES for s in SCHEMES])
def test_router_kept_dense(case, scheme, minis):
    # vLLM's router is a GateLinear with no quantized parameters; a quantized router.proj does not
    # load. It is an nn.Linear, so it must be named in the compressed-tensors ignore list too.
    source = load_file(minis.original(case) / "model.safetensors")
    out_dir = minis.converted(case, scheme)
    out = load_file(out_dir / "model.safetensors")
    ignore = json.loads((out_dir / "config.json").read_text())["quantization_config"]["ignore"]
    routers = sorted(n.removesuffix(".weight") for n in source if n.endswith(".router.proj.weight"))
    assert len(routers) == 6
    for r in routers:
        assert torch.equal(out[f"{r}.weight"], source[f"{r}.weight"]) and out[f"{r}.weight"].dtype == torch.bfloat16
        assert f"{r}.weight_packed" not in out and r in ignore
    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(out_dir)  # compressed-tensors applies the config
    for r in routers:
        proj = model.get_submodule(r)
        assert getattr(proj, "quantization_scheme", None) is None and not hasattr(proj, "weight_packed")
        assert torch.equal(proj.weight.detach(), source[f"{r}.weight"])
    q = model.get_submodule(routers[0].replace("router.proj", "self_attn.q_proj"))
    assert getattr(q, "quantization_scheme", None) is not None  # the check above can tell them apart


@pytest.mark.parametrize("dialect", ["global", "per_layer"])
@pytest.mark.parametrize("form", ["conditional", "causal"])
def test_unified_text_config_has_no_ple_by_default(form, dialect, minis):
    # Gemma4UnifiedTextConfig has no hidden_size_per_layer_input field (no PLE) and a 1024 window;
    # nvq took Gemma4TextConfig's defaults (PLE width 256, window 512) for it, so the reference
    # forward looked for PLE tensors that a 12B checkpoint does not have.
    src = minis.original(Case("12b-unified", form, dialect))
    assert "hidden_size_per_layer_input" not in text_config(src)
    assert for_config(load_config(src)).config.per_layer_input_size == 0
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    del text["sliding_window"]
    assert for_config(HFConfig(src / "config.json", cfg)).config.sliding_window == 1024


@pytest.mark.llamacpp
@pytest.mark.parametrize("variant", KV_SHARING_VARIANTS)
def test_vestigial_kv_in_the_oracle_is_not_asked_of_the_candidate(variant, minis):
    # llama.cpp's converter copies the unused k/v/k_norm tensors of KV-shared layers into the GGUF;
    # nvq verify failed nvq's (correct) output for not having them.
    key = vestigial_key(variant)
    oracle = GGUFFile.open(minis.oracle(key))
    last = text_config(minis.vestigial(variant))["num_hidden_layers"] - 1
    assert {f"blk.{last}.attn_k.weight", f"blk.{last}.attn_v.weight", f"blk.{last}.attn_k_norm.weight"} <= set(oracle.tensors)
    for scheme in SCHEMES:
        code, cert = minis.certificate(key, scheme)
        assert (code, cert["verdict"]) == (0, "pass"), cert["first_divergence"]
        assert f"oracle tensor 'blk.{last}.attn_k.weight' is not compared: the model never reads it" in cert["notes"]
        assert not any(w["name"] == f"blk.{last}.attn_k.weight" for w in cert["weights"])
