"""Quantization configs select in vLLM's runtime names what nvq kept dense or quantized (issue 12,
items 1-4): dense expert stacks, the v_proj that k_eq_v layers lack, and GPTQ `dynamic` patterns
that vLLM matches against fused, re-prefixed names. Runtime names are vLLM 0.32's
(`models/gemma4.py`: `model.layers.N…` text-only, `language_model.model.layers.N…` conditional;
q/k/v fused into `qkv_proj`, gate/up into `gate_up_proj`, experts into `experts`)."""

from __future__ import annotations

import re

import pytest

from nvq.io.hf import Checkpoint
from nvq.layouts import vllm_names
from nvq.quant.gptq_write import GPTQSettings, quantization_config
from nvq.quant.policy import build_plan
from nvq.quant.recipe import load_recipe
from tests.support.gemma4_variants import VARIANTS, build_gemma4_variant

RUNTIME_PREFIXES = ("model.", "language_model.model.")


def _matches(pattern: str, name: str) -> bool:
    return re.match(pattern.removeprefix("re:").removeprefix("-:"), name) is not None


def test_runtime_regex_takes_hf_and_runtime_spellings():
    rx = vllm_names.runtime_regex("model.language_model.layers.3.self_attn.k_proj")
    for name in ("model.language_model.layers.3.self_attn.k_proj", "language_model.model.layers.3.self_attn.qkv_proj",
                 "model.layers.3.self_attn.qkv_proj", "model.layers.3.self_attn.k_proj"):
        assert _matches(rx, name), name
    for name in ("model.layers.13.self_attn.qkv_proj", "model.layers.3.self_attn.o_proj",
                 "model.layers.3.self_attn.qkv_proj_x", "vision_tower.layers.3.self_attn.k_proj"):
        assert not _matches(rx, name), name
    up = vllm_names.runtime_regex("model.layers.0.mlp.up_proj")
    assert _matches(up, "language_model.model.layers.0.mlp.gate_up_proj") and not _matches(up, "model.layers.0.mlp.down_proj")


def test_expert_stack_regex_takes_the_fused_layer_and_its_expert_names():
    rx = vllm_names.expert_stack_regex("model.language_model.layers.0.experts")
    for name in ("model.layers.0.experts", "language_model.model.layers.0.experts.0.gate_proj",
                 "model.layers.0.experts.7.down_proj"):
        assert _matches(rx, name), name
    for name in ("model.layers.10.experts", "model.layers.0.experts.0.gate_up_proj", "model.layers.0.mlp.up_proj"):
        assert not _matches(rx, name), name


def test_absent_siblings_are_the_shards_vllm_fuses_that_are_missing():
    present = {"m.layers.5.self_attn.q_proj", "m.layers.5.self_attn.k_proj", "m.layers.4.self_attn.v_proj",
               "m.layers.4.self_attn.q_proj", "m.layers.4.self_attn.k_proj", "m.layers.5.self_attn.o_proj"}
    got = vllm_names.absent_siblings(sorted(present), present)
    assert got == ["m.layers.5.self_attn.v_proj"]


@pytest.fixture(scope="module")
def moe_source(tmp_path_factory):
    return Checkpoint.open(build_gemma4_variant(tmp_path_factory.mktemp("g4") / "26b", "26b-a4b"))


def _full_layers() -> list[int]:
    text = VARIANTS["26b-a4b"].text
    return [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"]


def test_dense_expert_stack_is_ignored_under_vllms_names(moe_source):
    """Item 1: keep-first-layer keeps layer 0's fused expert stack; vLLM asks for the scheme of
    `….layers.0.experts.0.gate_proj` and must find it ignored, while layer 1 stays quantized."""
    ignore = build_plan(moe_source, "nvfp4", load_recipe("keep-first-layer")).ignore_list()
    for prefix in RUNTIME_PREFIXES:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert any(_matches(p, f"{prefix}layers.0.experts.0.{proj}") for p in ignore if p.startswith("re:"))
            assert not any(_matches(p, f"{prefix}layers.1.experts.0.{proj}") for p in ignore if p.startswith("re:"))


def test_k_eq_v_dense_attention_names_the_missing_v_proj(moe_source):
    """Item 3: attention-dense on a k_eq_v model ignores q and k of every full layer, so v (which
    vLLM fills from k) must be ignored too, or its qkv_proj has shards of two schemes."""
    ignore = set(build_plan(moe_source, "nvfp4", load_recipe("attention-dense")).ignore_list())
    for i in _full_layers():
        stem = f"model.language_model.layers.{i}.self_attn."
        assert {stem + "q_proj", stem + "k_proj", stem + "v_proj"} <= ignore


def test_gptq_lists_the_quantized_modules_with_k_eq_v_placeholders(moe_source):
    """Item 2: with `modules_in_block_to_quantize` vLLM skips its dtype scan, which sees no v_proj
    on full layers and refuses their qkv_proj; the list names v_proj there beside q and k."""
    plan = build_plan(moe_source, "gptq", load_recipe(None), group_size=32)
    qc = quantization_config(plan, GPTQSettings(method="rtn", group_size=32))
    listed = [m for layer in qc["modules_in_block_to_quantize"] for m in layer]
    for i in _full_layers():
        stem = f"model.language_model.layers.{i}.self_attn."
        assert {stem + "q_proj", stem + "k_proj", stem + "v_proj"} <= set(listed)
    assert not any(".experts." in m or "router" in m for m in listed)
    assert all(isinstance(layer, list) for layer in qc["modules_in_block_to_quantize"])  # optimum sums lists


def test_gptq_dynamic_skips_match_runtime_names(moe_source):
    """Item 4: keep-first-layer's `-:` patterns exclude layer 0 as vLLM names it (fused qkv_proj,
    gate_up_proj, the experts layer, either prefix) and leave layer 1 alone."""
    plan = build_plan(moe_source, "gptq", load_recipe("keep-first-layer"), group_size=32)
    dynamic = quantization_config(plan, GPTQSettings(method="rtn", group_size=32))["dynamic"]
    for prefix in RUNTIME_PREFIXES:
        for leaf in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "experts",
                     "router.proj"):
            assert any(_matches(p, f"{prefix}layers.0.{leaf}") for p in dynamic), (prefix, leaf)
            skipped_1 = any(_matches(p, f"{prefix}layers.1.{leaf}") for p in dynamic)
            assert skipped_1 == (leaf == "router.proj"), (prefix, leaf)
    listed = {m for layer in quantization_config(plan, GPTQSettings(method="rtn", group_size=32))
              ["modules_in_block_to_quantize"] for m in layer}
    assert not any(".layers.0." in m for m in listed)
