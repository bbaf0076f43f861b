"""llama.cpp's converter (llama-cpp-python 0.3.36 sdist) as a client of nvq's GPTQ output: it
dequantizes every GPTQ module (its `dequant_gptq`, after GPTQModel) to exactly nvq's weights."""

from __future__ import annotations

import pytest
import torch

from nvq.quant.gptq_write import GPTQSettings
from nvq.quant.pipeline import convert
from nvq.verify.candidate import load_candidate
from nvq.verify.oracle import load_oracle
from tests.support.llamacpp import convert_to_gguf

pytestmark = pytest.mark.llamacpp


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma4_dense"])
def test_converter_dequantizes_nvq_gptq_to_the_same_weights(model, request, tmp_path):
    src = request.getfixturevalue(model)
    out = tmp_path / "gptq"
    convert(src, out, "gptq", device="cpu", gptq=GPTQSettings(group_size=32, samples=4, seq_len=64))
    gguf_path = convert_to_gguf(out, tmp_path / "model.gguf", outtype="f32")
    cand = load_candidate(out)
    # the oracle loader maps the GGUF back to HF conventions (Llama Q/K un-permuted, experts fused)
    orc = load_oracle(gguf_path, cand)
    quantized = sorted(cand.quantized)
    assert quantized
    for name in quantized:
        assert torch.equal(orc.tensors[name], cand.tensors[name]), name


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="llama.cpp bug: Gemma4Model.filter_tensors appends '.weight' to per-expert tensor names "
                          "before dequantization (experts.E.down_proj.g_idx -> g_idx.weight), so no GPTQ Gemma-4 MoE "
                          "checkpoint converts; the same bug as for compressed-tensors names")
def test_llamacpp_converter_bug_gemma4_moe_gptq_expert_names(tiny_gemma4_moe, tmp_path):
    out = tmp_path / "gptq"
    convert(tiny_gemma4_moe, out, "gptq", device="cpu", gptq=GPTQSettings(method="rtn", group_size=32))
    convert_to_gguf(out, tmp_path / "model.gguf", outtype="f32")
