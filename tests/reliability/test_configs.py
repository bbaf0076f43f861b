"""config.json fields that shape the model: wrong types, out of range, or contradicted by the
tensors. Each is refused by convert and plan with one sentence naming the field."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from tests.reliability.conftest import refused


def _edit_config(d, **changes):
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


CONFIG_CASES = {
    "more_layers_than_tensors": ({"num_hidden_layers": 4}, "num_hidden_layers' is 4 but no tensor of layer 2"),
    "fewer_layers_than_tensors": ({"num_hidden_layers": 1}, "blk.1."),
    "layers_1e9": ({"num_hidden_layers": 10**9}, "'num_hidden_layers' is 1000000000"),
    "layers_negative": ({"num_hidden_layers": -1}, "'num_hidden_layers' is -1"),
    "layers_zero": ({"num_hidden_layers": 0}, "'num_hidden_layers' is 0"),
    "layers_float": ({"num_hidden_layers": 2.5}, "'num_hidden_layers' is 2.5"),
    "layers_string": ({"num_hidden_layers": "two"}, "'num_hidden_layers' is 'two'"),
    "layers_bool": ({"num_hidden_layers": True}, "'num_hidden_layers' is True"),
    "hidden_negative": ({"hidden_size": -64}, "'hidden_size' is -64"),
    "hidden_wrong": ({"hidden_size": 32}, "'hidden_size' gives 32 but tensor 'token_embd.weight'"),
    "heads_zero": ({"num_attention_heads": 0}, "'num_attention_heads' is 0"),
    "heads_wrong": ({"num_attention_heads": 2}, "num_attention_heads × head_dim' gives 32"),
    "kv_heads_wrong": ({"num_key_value_heads": 4}, "num_key_value_heads × head_dim' gives 64"),
    "head_dim_wrong": ({"head_dim": 8}, "num_attention_heads × head_dim' gives 32"),
    "intermediate_wrong": ({"intermediate_size": 100}, "'intermediate_size' gives 100"),
    "vocab_wrong": ({"vocab_size": 7}, "'vocab_size' gives 7"),
    "eps_nan": ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' is nan"),
    "eps_string": ({"rms_norm_eps": "small"}, "'rms_norm_eps' is 'small'"),
    "huge_int": ({"vocab_size": 10**300}, "'vocab_size' is 1000"),
    "rope_theta_inf": ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
                       "'rope_parameters.rope_theta' is inf"),
    "rope_unknown_type": ({"rope_parameters": {"rope_type": "yarn2", "rope_theta": 1e4}},
                          "'rope_parameters.rope_type' is 'yarn2'"),
    "rope_not_a_mapping": ({"rope_parameters": [1, 2]}, "'rope_parameters' is [1, 2]"),
    "kv_heads_not_dividing": ({"num_key_value_heads": 3}, "'num_attention_heads' is 4; it must be a multiple of"),
    "model_type_layers": ({"model_type": "layers"}, "model_type 'layers' is not supported"),
    "model_type_load": ({"model_type": "load"}, "model_type 'load' is not supported"),
    "model_type_init": ({"model_type": "__init__"}, "model_type '__init__' is not supported"),
    "model_type_base": ({"model_type": "base"}, "model_type 'base' is not supported"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_refused_by_convert(llama_copy, tmp_path, case):
    changes, match = CONFIG_CASES[case]
    _edit_config(llama_copy, **changes)
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "nvfp4", out=out, match=match)


@pytest.mark.parametrize("case", ["more_layers_than_tensors", "heads_zero", "eps_nan", "model_type_layers"])
def test_bad_config_refused_by_plan(llama_copy, case):
    changes, match = CONFIG_CASES[case]
    _edit_config(llama_copy, **changes)
    refused("plan", llama_copy, "--scheme", "nvfp4", match=match)


def test_missing_final_norm(llama_copy, tmp_path):
    tensors = load_file(llama_copy / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, llama_copy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "nvfp4", out=out, match="'output_norm.weight' is missing")


def test_json_nesting_bomb(llama_copy, tmp_path):
    (llama_copy / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 200000 + "]" * 200000 + "}")
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "nvfp4", out=out, match="nests JSON too deeply")


def test_json_huge_integer_literal(llama_copy, tmp_path):
    (llama_copy / "config.json").write_text('{"model_type": "llama", "vocab_size": ' + "9" * 5000 + "}")
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "nvfp4", out=out, match="cannot be parsed")
