"""load_hf: canonical names, towers and drops skipped, tied embeddings, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvq.errors import CheckpointError, UnmappedTensorError
from nvq.models.load import load_hf


def test_load_hf_gemma4_renames_and_keeps_the_stored_dtype(tiny_gemma4_moe):
    arch, tensors = load_hf(tiny_gemma4_moe)
    assert arch.name == "gemma4"
    assert "output.weight" not in tensors  # tied: the forward reads token_embd
    assert all(n.startswith(("blk.", "token_embd", "output_norm")) for n in tensors)
    assert tensors["blk.0.ffn_gate_up_exps.weight"].shape == (4, 128, 64)
    assert tensors["blk.0.layer_output_scale.weight"].shape == (1,)
    assert tensors["token_embd.weight"].dtype == torch.bfloat16
    stored = load_file(str(tiny_gemma4_moe / "model.safetensors"))
    assert torch.equal(
        tensors["blk.3.ffn_gate_inp.scale"], stored["model.language_model.layers.3.router.scale"]
    )


def test_load_hf_drops_the_vestigial_kv_of_shared_layers(tiny_gemma4_ple, tmp_path):
    # Google's E2B/E4B files may carry k/v/k_norm on KV-shared layers (gemma4.md §3.1).
    d = tmp_path / "ple"
    shutil.copytree(tiny_gemma4_ple, d)
    stored = load_file(str(d / "model.safetensors"))
    stored["model.language_model.layers.7.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(stored, str(d / "model.safetensors"))
    _, tensors = load_hf(d)
    assert "blk.7.attn_k.weight" not in tensors and "blk.4.attn_k.weight" in tensors


def test_load_hf_llama_tied_and_untied(tiny_llama, tiny_llama_untied):
    assert "output.weight" not in load_hf(tiny_llama)[1]
    _, untied = load_hf(tiny_llama_untied)
    assert not torch.equal(untied["output.weight"], untied["token_embd.weight"])


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_load_hf_refuses_an_untied_model_without_lm_head(tiny_llama, tmp_path):
    d = _with_config(tiny_llama, tmp_path / "m", tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="lm_head"):
        load_hf(d)


def test_load_hf_refuses_unmapped_and_quantized_tensors(tiny_llama, tmp_path):
    d = tmp_path / "extra"
    shutil.copytree(tiny_llama, d)
    stored = load_file(str(d / "model.safetensors"))
    save_file(
        {**stored, "model.layers.0.mystery.weight": torch.zeros(2)}, str(d / "model.safetensors")
    )
    with pytest.raises(UnmappedTensorError):
        load_hf(d)
    save_file(
        {**stored, "model.layers.0.mlp.up_proj.weight_packed": torch.zeros(2, dtype=torch.uint8)},
        str(d / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="quantized"):
        load_hf(d)
