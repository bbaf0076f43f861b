"""Every config field that shapes a tensor is checked against the tensors, for llama, gemma3 and
gemma4 (PLE, MoE experts, global head dim, k_eq_v), by plan/convert and by verify: a mismatch is
one sentence naming the field, its value and the tensor, and exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.reliability.conftest import refused
from tests.support.tiny_models import build_tiny_gemma3, build_tiny_llama


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="module")
def tiny_llama_bias(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bias"),
                            config_overrides={"attention_bias": True, "mlp_bias": True})


def _copy(request, tmp_path, model: str):
    return shutil.copytree(request.getfixturevalue(model), tmp_path / "src")


def _edit_text_config(d, changes: dict) -> None:
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config") or cfg
    for key, value in changes.items():
        if value is _DROP:
            text.pop(key, None)
        else:
            text[key] = value
    path.write_text(json.dumps(cfg))


def _edit_tensors(d, edit) -> None:
    path = d / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


_DROP = object()

# (model fixture, config changes, words the one-line error must hold: field, value, tensor)
FIELD_CASES = {
    "gemma4_global_head_dim": ("tiny_gemma4_moe", {"global_head_dim": 16},
                               "'num_attention_heads × global_head_dim' gives 64 but tensor 'blk.5.attn_q.weight'"),
    "gemma4_sliding_head_dim": ("tiny_gemma4_moe", {"head_dim": 8},
                                "'num_attention_heads × head_dim' gives 32 but tensor 'blk.0.attn_q.weight'"),
    "gemma4_global_kv_heads": ("tiny_gemma4_dense", {"num_global_key_value_heads": 2},
                               "'num_global_key_value_heads × global_head_dim' gives 64 but tensor 'blk.5.attn_k"),
    "gemma4_k_eq_v_off": ("tiny_gemma4_dense", {"attention_k_eq_v": False},
                          "'attention_k_eq_v' is False but tensor 'blk.5.attn_v.weight' is missing"),
    "gemma4_intermediate": ("tiny_gemma4_moe", {"intermediate_size": 64},
                            "'intermediate_size' gives 64 but tensor 'blk.0.ffn_gate.weight'"),
    "gemma4_double_wide_off": ("tiny_gemma4_ple", {"use_double_wide_mlp": False},
                               "'intermediate_size' gives 128 but tensor 'blk.6.ffn_gate.weight'"),
    "gemma4_moe_intermediate": ("tiny_gemma4_moe", {"moe_intermediate_size": 32},
                                "'2 × moe_intermediate_size' gives 64 but tensor 'blk.0.ffn_gate_up_exps.weight'"),
    "gemma4_num_experts": ("tiny_gemma4_moe", {"num_experts": 8},
                           "'num_experts' gives 8 but tensor 'blk.0.ffn_gate_inp.weight'"),
    "gemma4_moe_off": ("tiny_gemma4_moe", {"enable_moe_block": False},
                       "'num_experts' is 0 but tensor 'blk.0.ffn_gate_inp.weight' exists"),
    "gemma4_ple_width": ("tiny_gemma4_ple", {"hidden_size_per_layer_input": 32},
                         "'num_hidden_layers × hidden_size_per_layer_input' gives 320 but tensor "
                         "'per_layer_token_embd.weight'"),
    "gemma4_ple_vocab": ("tiny_gemma4_ple", {"vocab_size_per_layer_input": 7},
                         "'vocab_size_per_layer_input' gives 7 but tensor 'per_layer_token_embd.weight'"),
    "gemma4_ple_off": ("tiny_gemma4_ple", {"hidden_size_per_layer_input": 0},
                       "'hidden_size_per_layer_input' is 0 but tensor 'per_layer_token_embd.weight' exists"),
    # Gemma4TextConfig's default PLE width is 256: a config that omits it asks for PLE tensors
    "gemma4_ple_default": ("tiny_gemma4_dense", {"hidden_size_per_layer_input": _DROP},
                           "'hidden_size_per_layer_input' is 256 but tensor 'per_layer_token_embd.weight' is missing"),
    "gemma4_layer_types_shifted": ("tiny_gemma4_moe",
                                   {"layer_types": ["sliding_attention"] * 4 + ["full_attention"] * 2},
                                   "tensor 'blk.4.attn_v.weight' exists; the config and the weights describe "
                                   "different models. Layer 4 is full_attention in layer_types."),
    "gemma4_fewer_kv_shared_layers": ("tiny_gemma4_ple", {"num_kv_shared_layers": 3},
                                      "'num_kv_shared_layers' is 3 but tensor 'blk.6.attn_k.weight' is missing"),
    "gemma4_vocab": ("tiny_gemma4_moe", {"vocab_size": 300}, "'vocab_size' gives 300 but tensor 'token_embd.weight'"),
    "gemma4_hidden": ("tiny_gemma4_moe", {"hidden_size": 128}, "'hidden_size' gives 128 but tensor 'token_embd.weight'"),
    "gemma3_head_dim": ("tiny_gemma3", {"head_dim": 8},
                        "'num_attention_heads × head_dim' gives 32 but tensor 'blk.0.attn_q.weight'"),
    "gemma3_kv_heads": ("tiny_gemma3", {"num_key_value_heads": 2},
                        "'num_key_value_heads × head_dim' gives 32 but tensor 'blk.0.attn_k.weight'"),
    "gemma3_intermediate": ("tiny_gemma3", {"intermediate_size": 64},
                            "'intermediate_size' gives 64 but tensor 'blk.0.ffn_gate.weight'"),
    "gemma3_layers": ("tiny_gemma3", {"num_hidden_layers": 7, "layer_types": ["sliding_attention"] * 7},
                      "'num_hidden_layers' is 7 but no tensor of layer 6"),
}


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_config_field_against_tensors(request, tmp_path, case):
    model, changes, match = FIELD_CASES[case]
    src = _copy(request, tmp_path, model)
    _edit_text_config(src, changes)
    refused("plan", src, "--scheme", "nvfp4", match=match)


def _truncate(name: str, rows: int):
    def edit(t):
        t[name] = t[name][:rows].contiguous()
    return edit


def _drop(name: str):
    return lambda t: t.pop(name)


# (model fixture, tensor edit, words of the error): tensors the config calls for, of the wrong
# shape or missing.
TENSOR_CASES = {
    "llama_v_proj_rows": ("tiny_llama", _truncate("model.layers.1.self_attn.v_proj.weight", 16),
                          "'num_key_value_heads × head_dim' gives 32 but tensor 'blk.1.attn_v.weight'"),
    "llama_v_proj_missing": ("tiny_llama", _drop("model.layers.0.self_attn.v_proj.weight"),
                             "'num_hidden_layers' is 2 but tensor 'blk.0.attn_v.weight' is missing"),
    "llama_o_proj_columns": ("tiny_llama", lambda t: t.update({
        "model.layers.0.self_attn.o_proj.weight": t["model.layers.0.self_attn.o_proj.weight"][:, :32].contiguous()}),
        "'num_attention_heads × head_dim' gives 64 but tensor 'blk.0.attn_output.weight'"),
    "llama_norm": ("tiny_llama", _truncate("model.layers.0.input_layernorm.weight", 32),
                   "'hidden_size' gives 64 but tensor 'blk.0.attn_norm.weight'"),
    "llama_bias_v": ("tiny_llama_bias", _truncate("model.layers.0.self_attn.v_proj.bias", 16),
                     "'num_key_value_heads × head_dim' gives 32 but tensor 'blk.0.attn_v.bias'"),
    "llama_bias_down": ("tiny_llama_bias", _truncate("model.layers.1.mlp.down_proj.bias", 16),
                        "'hidden_size' gives 64 but tensor 'blk.1.ffn_down.bias'"),
    "llama_untied_without_head": ("tiny_llama_untied", _drop("lm_head.weight"),
                                  "'tie_word_embeddings' is False but tensor 'output.weight' is missing"),
    "gemma4_ple_gate": ("tiny_gemma4_ple", _truncate("model.language_model.layers.3.per_layer_input_gate.weight", 32),
                        "'hidden_size_per_layer_input' gives 64 but tensor 'blk.3.inp_gate.weight'"),
    "gemma4_ple_missing": ("tiny_gemma4_ple", _drop("model.language_model.layers.2.per_layer_projection.weight"),
                           "'hidden_size_per_layer_input' is 64 but tensor 'blk.2.proj.weight' is missing"),
    "gemma4_q_norm": ("tiny_gemma4_moe", _truncate("model.language_model.layers.5.self_attn.q_norm.weight", 16),
                      "'global_head_dim' gives 32 but tensor 'blk.5.attn_q_norm.weight'"),
    "gemma4_expert_down": ("tiny_gemma4_moe", lambda t: t.update({
        "model.language_model.layers.1.experts.down_proj":
            t["model.language_model.layers.1.experts.down_proj"][:, :, :32].contiguous()}),
        "'moe_intermediate_size' gives 64 but tensor 'blk.1.ffn_down_exps.weight'"),
    "gemma4_per_expert_scale": ("tiny_gemma4_moe", _truncate("model.language_model.layers.2.router.per_expert_scale", 2),
                                "'num_experts' gives 4 but tensor 'blk.2.ffn_down_exps.scale'"),
    # a full k_eq_v layer holding a v_proj: the config says V is K, so the weights would be ignored
    "gemma4_v_proj_on_k_eq_v_layer": ("tiny_gemma4_dense", lambda t: t.update({
        "model.layers.5.self_attn.v_proj.weight": t["model.layers.5.self_attn.k_proj.weight"].clone()}),
        "'attention_k_eq_v' is True but tensor 'blk.5.attn_v.weight' exists"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_tensor_against_config(request, tmp_path, case):
    model, edit, match = TENSOR_CASES[case]
    src = _copy(request, tmp_path, model)
    _edit_tensors(src, edit)
    out = tmp_path / "out"
    refused("convert", src, out, "--scheme", "nvfp4", out=out, match=match)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_llama_untied", "tiny_llama_bias", "tiny_gemma3",
                                   "tiny_gemma4_moe", "tiny_gemma4_ple", "tiny_gemma4_dense"])
def test_consistent_models_pass_every_rule(request, model):
    # k_eq_v full layers without v_proj and KV-shared layers without K/V are legitimate absences
    from nvq.io.hf import Checkpoint
    from nvq.models import config_rules, for_config

    ckpt = Checkpoint.open(request.getfixturevalue(model))
    arch = for_config(ckpt.config)
    mapped = [m for m in arch.table.resolve_all(ckpt.tensors, arch.config) if m.canonical]
    config_rules.check_tensors(ckpt.path, arch.config, {m.canonical: ckpt.tensors[m.source].shape for m in mapped})


# ---------------------------------------------------------------------------------------------
# verify: the candidate's config against its own tensors, dense and quantized, before the oracle


@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory):
    """The tiny Llama as nvq writes it: compressed-tensors NVFP4 and GPTQ (round to nearest)."""
    from tests.reliability.conftest import nvq

    root = tmp_path_factory.mktemp("quantized")
    made = {}
    for scheme, extra in (("nvfp4", []), ("gptq", ["--method", "rtn", "--group-size", "32"])):
        result = nvq("convert", tiny_llama, root / scheme, "--scheme", scheme, *extra)
        assert result.exit_code == 0, result.output
        made[scheme] = root / scheme
    return made


@pytest.mark.parametrize("form", ["dense", "nvfp4", "gptq"])
@pytest.mark.parametrize("changes, match", [
    ({"head_dim": 8}, "field 'num_attention_heads × head_dim' gives 32 but tensor 'blk.0.attn_q.weight'"),
    ({"intermediate_size": 64}, "field 'intermediate_size' gives 64 but tensor 'blk.0.ffn_gate.weight'"),
    ({"num_key_value_heads": 4}, "field 'num_key_value_heads × head_dim' gives 64 but tensor 'blk.0.attn_k.weight'"),
])
def test_verify_checks_candidate_config_against_its_tensors(tiny_llama, quantized, tmp_path, form, changes, match):
    src = shutil.copytree(tiny_llama if form == "dense" else quantized[form], tmp_path / "cand")
    _edit_text_config(src, changes)
    out = tmp_path / "cert.json"
    refused("verify", src, "--oracle", tmp_path / "x.gguf", "--json", out, out=out, match=match)


def test_verify_gemma4_global_head_dim(tiny_gemma4_moe, tmp_path):
    src = shutil.copytree(tiny_gemma4_moe, tmp_path / "cand")
    _edit_text_config(src, {"global_head_dim": 16})
    out = tmp_path / "cert.json"
    refused("verify", src, "--oracle", tmp_path / "x.gguf", "--json", out, out=out,
            match="'num_attention_heads × global_head_dim' gives 64 but tensor 'blk.5.attn_q.weight'")


def test_quantized_shapes_from_headers_equal_the_decoded_shapes(quantized):
    from nvq.verify.candidate import open_layout

    for path in quantized.values():
        lay = open_layout(path)
        for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
            src = lay.sources[name]
            assert lay.shape(src) == tuple(lay.read(src).shape), (path, name)
    assert torch.Size(lay.shape(lay.sources["blk.0.ffn_gate.weight"])) == (128, 64)
