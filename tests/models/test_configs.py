"""Architecture lookup and config parsing, including both Gemma-4 config dialects."""

from __future__ import annotations

import json

import pytest

from nvq.errors import ConfigError, UnknownArchitectureError
from nvq.io.hf import load_config
from nvq.models import for_config, supported
from tests.support.tiny_models import build_tiny_gemma4


@pytest.mark.parametrize("variant", ["moe", "ple"])
@pytest.mark.parametrize("conditional", [True, False])
def test_gemma4_both_dialects_parse_to_the_same_config(variant, conditional, tmp_path):
    parsed = {}
    for dialect in ("global", "per_layer"):
        d = build_tiny_gemma4(tmp_path / dialect, variant, conditional=conditional, dialect=dialect)
        raw = json.loads((d / "config.json").read_text())
        text = raw.get("text_config", raw)
        assert ("global_head_dim" in text) == (dialect == "global")
        assert ("per_layer_config" in text) == (dialect == "per_layer")
        parsed[dialect] = for_config(load_config(d)).config
    assert parsed["global"] == parsed["per_layer"]


def test_nested_text_config_attention_heads_regression(tiny_gemma4_moe):
    # Multimodal Gemma-4 configs hold num_attention_heads only inside text_config.
    raw = json.loads((tiny_gemma4_moe / "config.json").read_text())
    assert "num_attention_heads" not in raw and "num_attention_heads" in raw["text_config"]
    arch = for_config(load_config(tiny_gemma4_moe))
    assert arch.name == "gemma4" and arch.model_type == "gemma4"
    assert arch.config.num_heads == raw["text_config"]["num_attention_heads"]


def test_gemma4_per_layer_geometry(tiny_gemma4_moe, tiny_gemma4_ple):
    moe = for_config(load_config(tiny_gemma4_moe)).config
    assert moe.layer_types[-1] == "full_attention"
    assert moe.head_dim == (16,) * 5 + (32,)  # head_dim sliding, global_head_dim full: never max over layers
    assert moe.num_kv_heads == (2,) * 5 + (1,)  # num_global_key_value_heads applies to k_eq_v full layers
    assert moe.has_v_proj == (True,) * 5 + (False,)
    assert (moe.num_experts, moe.top_k_experts, moe.moe_intermediate_size) == (4, 2, 64)
    assert moe.per_layer_input_size == 0
    ple = for_config(load_config(tiny_gemma4_ple)).config
    assert ple.first_kv_shared == 6 and ple.kv_shared == (False,) * 6 + (True,) * 4
    assert ple.mlp_width == (128,) * 6 + (256,) * 4
    assert ple.per_layer_input_size == 64


def test_gemma4_ple_default_is_256_when_absent(tmp_path):
    # transformers defaults hidden_size_per_layer_input to 256, not 0 (gemma4.md §1.2)
    cfg = {"model_type": "gemma4_text", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert for_config(load_config(tmp_path)).config.per_layer_input_size == 256


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba9"}))
    with pytest.raises(UnknownArchitectureError, match="'mamba9' is not supported; supported: .*gemma4.*llama"):
        for_config(load_config(tmp_path))
    assert {"llama", "gemma3", "gemma4", "gemma4_text", "gemma4_unified"} <= set(supported())


def test_missing_required_field_names_both_places(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "text_config": {}}))
    with pytest.raises(ConfigError, match="hidden_size"):
        for_config(load_config(tmp_path))
