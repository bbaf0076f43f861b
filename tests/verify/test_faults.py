"""Fault injection: each bug a converter has shipped makes `nvq verify` exit 1 and name the layer
(and the tensor) where it was injected. Tests are named after the bug.

Tiny random models amplify quantization noise (ARCHITECTURE.md, testing conventions): in the
quantized cases the activations stay inside their wide expected band, and it is the per-weight diff
that fails and names the tensor; in the dense cases the activation band is tight and the first
failing tap is the injected one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nvq.cli import app
from tests.verify import faults

pytestmark = pytest.mark.llamacpp
runner = CliRunner()


def verify_fails(candidate, oracle, tmp_path, *extra):
    path = tmp_path / "cert.json"
    result = runner.invoke(app, ["verify", str(candidate), "--oracle", str(oracle), "--json", str(path), *extra])
    assert result.exit_code == 1, result.output
    cert = json.loads(path.read_text())
    assert cert["verdict"] == "fail" and "FAIL at" in result.output
    return cert


def bad_taps(cert):
    return [t["name"] for t in cert["taps"] if not t["ok"]]


def test_ffn_norm_replaced_by_ones(llama_f32, tiny_gguf, tmp_path):
    cand = faults.ffn_norm_replaced_by_ones(llama_f32, tmp_path / "c", layer=1)
    cert = verify_fails(cand, tiny_gguf(llama_f32, "f32"), tmp_path)
    fd = cert["first_divergence"]
    assert fd["tap"] == "ffn_norm-1" and fd["layer"] == 1 and fd["tensor"] == "blk.1.ffn_norm.weight"
    assert "norm missing or replaced by ones" in fd["hint"]
    assert bad_taps(cert)[0] == "ffn_norm-1"  # dense: the activations localize it too
    assert [w["name"] for w in cert["weights"] if not w["ok"]] == ["blk.1.ffn_norm.weight"]


def test_ffn_norm_replaced_by_ones_in_an_nvfp4_output(llama_f32, tiny_gguf, quantized, tmp_path):
    cand = faults.ffn_norm_replaced_by_ones(quantized(llama_f32, "nvfp4"), tmp_path / "c", layer=1)
    cert = verify_fails(cand, tiny_gguf(llama_f32, "f32"), tmp_path)
    assert cert["first_divergence"]["tap"] == "ffn_norm-1"
    assert cert["first_divergence"]["tensor"] == "blk.1.ffn_norm.weight"


def test_gemma4_moe_ffn_norm_replaced_by_ones(gemma4_moe_f32, tiny_gguf, tmp_path):
    cand = faults.ffn_norm_replaced_by_ones(gemma4_moe_f32, tmp_path / "c", layer=2)
    cert = verify_fails(cand, tiny_gguf(gemma4_moe_f32, "f32"), tmp_path)
    fd = cert["first_divergence"]
    assert (fd["tap"], fd["tensor"]) == ("ffn_norm_1-2", "blk.2.ffn_norm.weight")  # MoE layers: ffn_norm_1


def test_llama_qk_left_permuted(llama_f32, tiny_gguf, tmp_path):
    cand = faults.qk_left_permuted(llama_f32, tmp_path / "c", layer=1)
    cert = verify_fails(cand, tiny_gguf(llama_f32, "f32"), tmp_path)
    fd = cert["first_divergence"]
    assert (fd["tap"], fd["layer"], fd["tensor"]) == ("Qcur-1", 1, "blk.1.attn_q.weight")
    assert "GGUF Q/K permutation was left in" in fd["hint"]


def test_global_scale_stored_inverted(llama_f32, tiny_gguf, quantized, tmp_path):
    cand = faults.global_scale_inverted(quantized(llama_f32, "nvfp4"), tmp_path / "c", layer=1)
    cert = verify_fails(cand, tiny_gguf(llama_f32, "f32"), tmp_path)
    fd = cert["first_divergence"]
    assert (fd["tap"], fd["layer"], fd["tensor"]) == ("attn_out-1", 1, "blk.1.attn_output.weight")
    assert "multiplier instead of a divisor" in fd["hint"]


def test_global_scale_stored_inverted_behind_a_gemma4_post_norm(gemma4_moe_f32, tiny_gguf, quantized, tmp_path):
    # Gemma-4 normalizes o_proj's output (post_attention_norm), so a weight off by g² changes almost
    # nothing downstream: no tap leaves its band, and only the weight diff catches the bug.
    cand = faults.global_scale_inverted(quantized(gemma4_moe_f32, "nvfp4"), tmp_path / "c", layer=2)
    cert = verify_fails(cand, tiny_gguf(gemma4_moe_f32, "f32"), tmp_path)
    fd = cert["first_divergence"]
    assert (fd["layer"], fd["tensor"]) == (2, "blk.2.attn_output.weight")
    assert fd["tap"] == "attn_post_norm-2" and "multiplier instead of a divisor" in fd["hint"]


@pytest.mark.parametrize("scheme", [None, "nvfp4"])
def test_gemma4_layer_scalar_left_at_one(scheme, gemma4_moe_f32, tiny_gguf, quantized, tmp_path):
    src = quantized(gemma4_moe_f32, scheme) if scheme else gemma4_moe_f32
    cand = faults.layer_scalar_left_at_one(src, tmp_path / "c", layer=3)
    cert = verify_fails(cand, tiny_gguf(gemma4_moe_f32, "f32"), tmp_path)
    fd = cert["first_divergence"]
    assert (fd["tap"], fd["layer"], fd["tensor"]) == ("l_out-3", 3, "blk.3.layer_output_scale.weight")
    assert "scalar left at its default 1.0" in fd["hint"]


def test_gemma4_ple_layer_scalar_left_at_one_is_local_when_teacher_forced(gemma4_ple_f32, tiny_gguf, tmp_path):
    cand = faults.layer_scalar_left_at_one(gemma4_ple_f32, tmp_path / "c", layer=7)
    oracle = tiny_gguf(gemma4_ple_f32, "f32")
    free = verify_fails(cand, oracle, tmp_path)
    forced = verify_fails(cand, oracle, tmp_path, "--teacher-forced")
    assert free["first_divergence"]["tap"] == forced["first_divergence"]["tap"] == "l_out-7"
    assert len(bad_taps(free)) > 1 and bad_taps(forced) == ["l_out-7"]  # later layers run on the oracle's input


def test_k_read_as_the_packed_width(llama_f32, tiny_gguf, tmp_path):
    # A reader that takes the packed byte width for K gives an [N, K/2] weight, which contradicts
    # the candidate's own hidden_size: bad input (exit 2) naming the field and the tensor, found
    # before the oracle is read, as convert finds it.
    cand = tmp_path / "c"
    faults._edit(llama_f32, cand, lambda t, cfg: t.update(
        {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"][:, :32].contiguous()}))
    out = tmp_path / "cert.json"
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(tiny_gguf(llama_f32, "f32")), "--json", str(out)])
    assert result.exit_code == 2, result.output
    assert "field 'hidden_size' gives 64 but tensor 'blk.0.ffn_up.weight' has shape [128, 32]" in result.output
    assert not out.exists()


def test_missing_norm_tensor(llama_f32, tiny_gguf, tmp_path):
    cand = tmp_path / "c"
    faults._edit(llama_f32, cand, lambda t, cfg: t.pop("model.layers.1.input_layernorm.weight"))
    cert = verify_fails(cand, tiny_gguf(llama_f32, "f32"), tmp_path)
    assert cert["first_divergence"]["tensor"] == "blk.1.attn_norm.weight"
    assert cert["first_divergence"]["hint"] == "missing from the candidate"


def test_faults_helpers_change_only_what_they_say(llama_f32, tmp_path):
    cand = faults.qk_left_permuted(llama_f32, tmp_path / "c", layer=1)
    a, b = load_file(llama_f32 / "model.safetensors"), load_file(cand / "model.safetensors")
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert changed == ["model.layers.1.self_attn.q_proj.weight"]
    save_file(b, tmp_path / "x.safetensors")  # still a valid file


def test_gemma4_head_dim_of_full_layers_taken_from_sliding_layers(gemma4_moe_f32, tiny_gguf, tmp_path):
    # The config contradicts the candidate's own q_proj of layer 5 (the only full layer): bad
    # input, refused before the oracle is read, as convert refuses it.
    cand = faults.full_head_dim_from_sliding(gemma4_moe_f32, tmp_path / "c")
    out = tmp_path / "cert.json"
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(tiny_gguf(gemma4_moe_f32, "f32")),
                                 "--json", str(out)])
    assert result.exit_code == 2, result.output
    assert "'num_attention_heads × global_head_dim' gives 64 but tensor 'blk.5.attn_q.weight'" in result.output
    assert not out.exists()


@pytest.mark.parametrize("tensor, canonical, tap", [
    ("router.scale", "ffn_gate_inp.scale", "ffn_moe_logits"),
    ("router.per_expert_scale", "ffn_down_exps.scale", "ffn_moe_out"),
])
def test_gemma4_router_scales_left_at_their_defaults(tensor, canonical, tap, gemma4_moe_f32, tiny_gguf, tmp_path):
    cand = faults.left_at_ones(gemma4_moe_f32, tmp_path / "c", layer=4, tensor=tensor)
    cert = verify_fails(cand, tiny_gguf(gemma4_moe_f32, "f32"), tmp_path)
    fd = cert["first_divergence"]
    assert (fd["tap"], fd["layer"], fd["tensor"]) == (f"{tap}-4", 4, f"blk.4.{canonical}")
    assert "scale left at its default of ones" in fd["hint"]
