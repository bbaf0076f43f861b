"""`nvq verify` compares the candidate's config with the hyper-parameters its GGUF carries: a
semantic difference exits 1 naming the field and both values, and the oracle runs under the GGUF's
own values, so the bug shows in the taps too. Fields the GGUF lacks are notes (llama.cpp's
fallback named). Tests are named after the config bug they pin."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from nvq.cli import app
from nvq.io.hf import HFConfig
from nvq.models import ARCHITECTURES, for_config
from nvq.verify import config_check
from tests.support.tiny_models import (
    gemma3_config_dict,
    gemma4_text_config_dict,
    llama_config_dict,
    qwen3_config_dict,
    qwen3_moe_config_dict,
)
from tests.verify import faults

runner = CliRunner()
TOKENS = ("--tokens", "24")


def verify(tmp_path, candidate, oracle, code):
    paths = tmp_path / "cert.json", tmp_path / "cert.xml"
    result = runner.invoke(app, ["verify", str(candidate), "--oracle", str(oracle), "--json", str(paths[0]),
                                 "--junit", str(paths[1]), *TOKENS])
    assert result.exit_code == code, result.output
    return json.loads(paths[0].read_text()), result.output, paths[1].read_text()


def failing(cert):
    return [d for d in cert["config"] if not d["ok"]]


def set_key(path: str, value):
    """An edit of the text config: `path` like "rope_parameters/rope_theta"; value None pops it."""
    def edit(cfg):
        *parents, last = path.split("/")
        for p in parents:
            cfg = cfg[p]
        if value is None:
            cfg.pop(last, None)
        else:
            cfg[last] = value
    return edit


def assert_fails_naming(tmp_path, src, oracle, edit, field, candidate, oracle_value, layer=None):
    cand = faults.config_edited(src, tmp_path / "c", edit)
    cert, out, junit = verify(tmp_path, cand, oracle, code=1)
    bad = {d["field"]: d for d in failing(cert)}
    assert field in bad, cert["config"]
    d = bad[field]
    assert (d["candidate"], d["oracle"], d["layer"], d["verdict"]) == (candidate, oracle_value, layer, "fail")
    assert f"{field}" in d["hint"] and repr(candidate) in d["hint"] and repr(oracle_value) in d["hint"]
    assert field in out and "FAIL" in out
    failures = [c.get("name") for c in ET.fromstring(junit).iter("testcase") if c.find("failure") is not None]
    assert any(n.startswith(field) for n in failures), failures
    return cert


# ---------------------------------------------------------------------------------------------
# The configuration faults, each pinned on the tiny model whose GGUF carries the field
# ---------------------------------------------------------------------------------------------

LLAMA_FAULTS = [
    ("rope_theta_changed", "llama_f32", set_key("rope_parameters/rope_theta", 500000.0), "rope.theta", 500000.0, 10000.0),
    ("rms_norm_eps_changed", "llama_f32", set_key("rms_norm_eps", 1e-3), "rms_norm_eps", 1e-3, 1e-5),
    ("hidden_act_changed", "llama_f32", set_key("hidden_act", "gelu_pytorch_tanh"), "hidden_act", "gelu_pytorch_tanh", "silu"),
    # the saved lm_head is then ignored (as transformers does), but the GGUF has its own output.weight
    ("untied_model_declared_tied", "tiny_llama_untied", set_key("tie_word_embeddings", True), "tie_word_embeddings", True, False),
]


@pytest.mark.llamacpp
@pytest.mark.parametrize("bug, model, edit, field, candidate, oracle", LLAMA_FAULTS, ids=[f[0] for f in LLAMA_FAULTS])
def test_llama_config_fault_fails_naming_the_field(bug, model, edit, field, candidate, oracle, request, tiny_gguf, tmp_path):
    src = request.getfixturevalue(model)
    cert = assert_fails_naming(tmp_path, src, tiny_gguf(src, "f32"), edit, field, candidate, oracle)
    assert cert["first_divergence"]["field"] == field


@pytest.mark.llamacpp
def test_head_dim_that_contradicts_the_candidates_tensors_is_bad_input(llama_f32, tiny_gguf, tmp_path):
    # head_dim 8 gives q_proj 32 rows where the candidate has 64: refused (exit 2) before any diff
    cand = faults.config_edited(llama_f32, tmp_path / "c", set_key("head_dim", 8))
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(tiny_gguf(llama_f32, "f32"))])
    assert result.exit_code == 2, result.output
    assert "'num_attention_heads × head_dim' gives 32 but tensor 'blk.0.attn_q.weight'" in result.output


GEMMA4_FAULTS = [
    ("sliding_window_changed", set_key("sliding_window", 4), "sliding_window", 4, 8, None),
    ("final_logit_softcapping_dropped", set_key("final_logit_softcapping", None), "final_logit_softcapping", None, 30.0, None),
    ("sliding_rope_theta_from_full_layers", set_key("rope_parameters/sliding_attention/rope_theta", 1e6),
     "rope_sliding.theta", 1e6, 10000.0, None),
    ("hidden_activation_changed", set_key("hidden_activation", "silu"), "hidden_activation", "silu", "gelu_pytorch_tanh", None),
    ("top_k_experts_changed", set_key("top_k_experts", 1), "top_k_experts", 1, 2, None),
]


def test_gemma4_layer_types_that_contradict_the_candidates_tensors_are_bad_input(gemma4_moe_f32, tmp_path):
    # A layer turned full takes the global head dim and k_eq_v, which its own tensors contradict:
    # refused (exit 2) naming the layer type, before any oracle is read.
    cand = faults.config_edited(gemma4_moe_f32, tmp_path / "c",
                                set_key("layer_types", ["sliding_attention"] * 4 + ["full_attention"] * 2))
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(tmp_path / "none.gguf")])
    assert result.exit_code == 2, result.output
    assert "tensor 'blk.4.attn_v.weight' exists" in result.output
    assert "Layer 4 is full_attention in layer_types" in result.output


@pytest.mark.llamacpp
@pytest.mark.parametrize("bug, edit, field, candidate, oracle, layer", GEMMA4_FAULTS, ids=[f[0] for f in GEMMA4_FAULTS])
def test_gemma4_config_fault_fails_naming_the_field(bug, edit, field, candidate, oracle, layer, gemma4_moe_f32, tiny_gguf, tmp_path):
    assert_fails_naming(tmp_path, gemma4_moe_f32, tiny_gguf(gemma4_moe_f32, "f32"), edit, field, candidate, oracle, layer)


@pytest.mark.llamacpp
def test_rope_theta_changed_shows_in_the_taps_because_the_oracle_runs_under_the_gguf_values(llama_f32, tiny_gguf, tmp_path):
    cand = faults.config_edited(llama_f32, tmp_path / "c", set_key("rope_parameters/rope_theta", 500000.0))
    cert, _, _ = verify(tmp_path, cand, tiny_gguf(llama_f32, "f32"), code=1)
    taps = {t["name"]: t["ok"] for t in cert["taps"]}
    assert taps["attn_norm-0"] and not taps["Qcur-0"]  # RoPE is the first computation that differs
    assert (cert["first_divergence"]["tap"], cert["first_divergence"]["field"]) == ("Qcur-0", "rope.theta")
    assert not cert["logits"]["ok"] or cert["logits"]["mean_kld"] > 0


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", ["llama_f32", "gemma4_moe_f32"])
def test_clean_candidate_has_no_config_findings(model, request, tiny_gguf, tmp_path):
    src = request.getfixturevalue(model)
    cert, out, _ = verify(tmp_path, src, tiny_gguf(src, "f32"), code=0)
    assert cert["config"] == [] and cert["tokenizer"] == [] and "PASS" in out


@pytest.mark.llamacpp
def test_softcap_absent_from_the_gguf_is_a_note_naming_llamacpp_fallback(gemma4_moe_f32, tiny_gguf, tmp_path):
    # The converter omits final_logit_softcapping when the config has none; llama.cpp then uses 30.
    src = faults.config_edited(gemma4_moe_f32, tmp_path / "src", set_key("final_logit_softcapping", None))
    oracle = tiny_gguf(src, "f32")
    cert, out, _ = verify(tmp_path, src, oracle, code=0)  # the oracle runs with the candidate's None
    notes = [d for d in cert["config"] if d["field"] == "final_logit_softcapping"]
    assert [(d["verdict"], d["candidate"], d["oracle"]) for d in notes] == [("note", None, 30.0)]
    assert "falls back to 30.0" in notes[0]["hint"] and any("final_logit_softcapping" in n for n in cert["notes"])
    # the candidate with the real softcap agrees with what llama.cpp would do: no note, and a pass
    cert, _, _ = verify(tmp_path, gemma4_moe_f32, oracle, code=0)
    assert cert["config"] == []


# ---------------------------------------------------------------------------------------------
# The table itself, and the fallbacks of a GGUF without the optional keys (no llama.cpp needed)
# ---------------------------------------------------------------------------------------------


def parsed(config: dict):
    return for_config(HFConfig("config.json", config)).config


TINY_CONFIGS = {
    "llama": {"model_type": "llama", **llama_config_dict(325)},
    "gemma3": {"model_type": "gemma3_text", **gemma3_config_dict(325)},
    "gemma4": {"model_type": "gemma4_text", **gemma4_text_config_dict("moe", 325)},
    "mistral": {"model_type": "mistral", **llama_config_dict(325), "sliding_window": 8},
    "qwen3": {"model_type": "qwen3", **qwen3_config_dict(325)},
    "qwen3_moe": {"model_type": "qwen3_moe", **qwen3_moe_config_dict(325)},
}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_parsed_config_field_names_where_the_gguf_holds_it(arch):
    cfg = TINY_CONFIGS[arch]
    names = set(config_check.leaves(parsed(cfg), cfg, arch))
    fields = set(ARCHITECTURES[arch].GGUF_FIELDS)
    assert names == fields, names ^ fields


def test_gemma3_gguf_without_swa_keys_gives_notes_and_the_candidate_values_run():
    cfg = dict(TINY_CONFIGS["gemma3"], rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    ours = parsed(cfg)
    theirs = dataclasses.replace(ours, rope_sliding=dataclasses.replace(ours.rope_sliding, theta=10000.0))
    meta = {"general.architecture": "gemma3", "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 32,
            "gemma3.embedding_length": 64, "gemma3.block_count": 6, "gemma3.attention.head_count": 4,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6}
    found = config_check.compare("gemma3", ours, theirs, cfg, cfg, meta)
    assert [(f.field, f.verdict, f.candidate, f.oracle) for f in found] == [("rope_sliding.theta", "note", 20000.0, 10000.0)]
    assert "gemma3.rope.freq_base_swa" in found[0].message and "falls back to 10000.0" in found[0].message
    run = config_check.oracle_run_config("gemma3", ours, theirs, meta)
    assert run.rope_sliding.theta == 20000.0  # the GGUF lacks it: the candidate's value runs
    meta["gemma3.rope.freq_base_swa"] = 10000.0
    found = config_check.compare("gemma3", ours, theirs, cfg, cfg, meta)
    assert [(f.field, f.verdict) for f in found] == [("rope_sliding.theta", "fail")]
    assert config_check.oracle_run_config("gemma3", ours, theirs, meta).rope_sliding.theta == 10000.0


def test_gemma3_query_scalar_and_attention_softcap_are_fixed_by_the_architecture():
    cfg = TINY_CONFIGS["gemma3"]
    ours = dataclasses.replace(parsed(cfg), query_pre_attn_scalar=64.0, attn_logit_softcapping=50.0)
    theirs = parsed(cfg)
    found = config_check.compare("gemma3", ours, theirs, cfg, cfg, {"general.architecture": "gemma3"})
    assert {(f.field, f.verdict) for f in found} == {("query_pre_attn_scalar", "fail"), ("attn_logit_softcapping", "fail")}
    assert all("general.architecture 'gemma3'" in f.message for f in found)


def test_equal_float32_values_and_activation_aliases_are_no_difference():
    cfg = TINY_CONFIGS["llama"]
    ours = parsed(dict(cfg, rms_norm_eps=1e-5, hidden_act="silu"))
    theirs = dataclasses.replace(ours, rms_norm_eps=9.999999747378752e-06)  # the GGUF's float32
    assert config_check.compare("llama", ours, theirs, cfg, cfg, {"general.architecture": "llama"}) == []
    g4 = TINY_CONFIGS["gemma4"]
    a = parsed(dict(g4, hidden_activation="gelu_tanh"))
    assert config_check.compare("gemma4", a, parsed(g4), g4, g4, {"general.architecture": "gemma4"}) == []


def test_unparsable_gguf_config_is_a_note():
    cfg = TINY_CONFIGS["llama"]
    found = config_check.compare("llama", parsed(cfg), None, cfg, cfg, {})
    assert [f.verdict for f in found] == ["note"]
    assert config_check.oracle_run_config("llama", parsed(cfg), None, {}) == parsed(cfg)
