"""Candidate readers: dense, compressed-tensors NVFP4/MXFP4 (per-expert reassembly), ModelOpt NVFP4."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nvq.errors import CheckpointError
from nvq.formats import e2m1, mxfp4, nvfp4
from nvq.models.load import load_hf
from nvq.verify.candidate import Scheme, load_candidate
from tests.support.checkpoints import as_modelopt_names


def ct_dequant(stored, module):
    q = nvfp4.NVFP4Quantized(
        e2m1.unpack_pairs(stored[f"{module}.weight_packed"]),
        stored[f"{module}.weight_scale"],
        stored[f"{module}.weight_global_scale"],
    )
    return nvfp4.dequantize(q, torch.float32)


def test_dense_candidate_equals_load_hf_in_fp32(tiny_gemma4_moe):
    c = load_candidate(tiny_gemma4_moe)
    _, ref = load_hf(tiny_gemma4_moe)
    assert c.format == "dense" and set(c.tensors) == set(ref)
    for name, t in ref.items():
        assert c.tensors[name].dtype == torch.float32
        assert torch.equal(c.tensors[name], t.float()), name
    assert set(c.schemes.values()) == {Scheme("bf16")} and not c.quantized


def test_nvq_nvfp4_output_decodes_to_its_fake_quant_weights(tiny_llama, quantized):
    out = quantized(tiny_llama, "nvfp4")
    c = load_candidate(out)
    stored = load_file(out / "model.safetensors")
    assert c.format == "compressed-tensors nvfp4"
    want = ct_dequant(stored, "model.layers.1.self_attn.q_proj")
    assert torch.equal(c.tensors["blk.1.attn_q.weight"], want)
    assert c.schemes["blk.1.attn_q.weight"] == Scheme("nvfp4", "ct")
    _, dense = load_hf(tiny_llama)
    assert torch.equal(c.tensors["blk.1.ffn_norm.weight"], dense["blk.1.ffn_norm.weight"].float())
    assert c.schemes["blk.1.ffn_norm.weight"] == Scheme("bf16")
    assert set(c.quantized) == {n for n in dense if n.startswith("blk.") and not n.endswith("norm.weight")}
    err = (c.tensors["blk.0.ffn_down.weight"] - dense["blk.0.ffn_down.weight"].float()).norm()
    assert 0 < err / dense["blk.0.ffn_down.weight"].float().norm() < 0.2


def test_per_expert_modules_are_fused_back_into_the_stacks(tiny_gemma4_moe, quantized):
    out = quantized(tiny_gemma4_moe, "nvfp4")
    c = load_candidate(out)
    stored = load_file(out / "model.safetensors")
    experts = "model.language_model.layers.2.experts"
    gate_up = c.tensors["blk.2.ffn_gate_up_exps.weight"]
    assert gate_up.shape == (4, 128, 64) and c.tensors["blk.2.ffn_down_exps.weight"].shape == (4, 64, 64)
    assert torch.equal(gate_up[3, :64], ct_dequant(stored, f"{experts}.3.gate_proj"))
    assert torch.equal(gate_up[3, 64:], ct_dequant(stored, f"{experts}.3.up_proj"))
    assert torch.equal(c.tensors["blk.2.ffn_down_exps.weight"][1], ct_dequant(stored, f"{experts}.1.down_proj"))
    assert c.schemes["blk.2.ffn_gate_up_exps.weight"] == Scheme("nvfp4", "ct", row_parts=2)
    assert c.schemes["blk.2.ffn_down_exps.weight"] == Scheme("nvfp4", "ct", row_parts=1)
    _, dense = load_hf(tiny_gemma4_moe)
    assert set(c.tensors) == set(dense)


def test_mxfp4_output(tiny_llama, quantized):
    out = quantized(tiny_llama, "mxfp4")
    c = load_candidate(out)
    stored = load_file(out / "model.safetensors")
    m = "model.layers.0.mlp.up_proj"
    want = mxfp4.dequantize(mxfp4.MXFP4Quantized(e2m1.unpack_pairs(stored[f"{m}.weight_packed"]), stored[f"{m}.weight_scale"]))
    assert torch.equal(c.tensors["blk.0.ffn_up.weight"], want)
    assert c.schemes["blk.0.ffn_up.weight"] == Scheme("mxfp4", "ct") and c.format == "compressed-tensors mxfp4"


def test_modelopt_nvfp4_multiplies_by_weight_scale_2(tiny_gemma4_moe, quantized, tmp_path):
    ct = load_candidate(quantized(tiny_gemma4_moe, "nvfp4"))
    mo = load_candidate(as_modelopt_names(quantized(tiny_gemma4_moe, "nvfp4"), tmp_path / "mo"))
    assert mo.format == "modelopt nvfp4" and set(mo.tensors) == set(ct.tensors)
    for name, t in ct.tensors.items():
        # s·(1/g) against s/g: at most an ulp or two apart
        torch.testing.assert_close(mo.tensors[name], t, rtol=3e-7, atol=0, msg=name)
    assert mo.schemes["blk.0.attn_q.weight"] == Scheme("nvfp4", "modelopt")


def test_modelopt_legacy_hf_quant_config(tiny_llama, quantized, tmp_path):
    d = as_modelopt_names(quantized(tiny_llama, "nvfp4"), tmp_path / "mo")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16}}))
    assert load_candidate(d).schemes["blk.0.attn_k.weight"] == Scheme("nvfp4", "modelopt")


def test_unknown_quantization_is_refused(tiny_llama, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'awq'"):
        load_candidate(d)
