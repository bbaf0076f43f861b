"""transformers 5.23 as a client: it loads nvq's NVFP4/MXFP4 output with no missing or unexpected
keys, its weights equal nvq's dequantization, and a forward runs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from nvq.formats import e2m1, nvfp4
from nvq.quant.pipeline import convert


def load_reporting_keys(path):
    return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma4_dense"])
def test_transformers_loads_output_without_missing_or_unexpected_keys(model, scheme, request, tmp_path):
    src = request.getfixturevalue(model)
    out = tmp_path / "out"
    convert(src, out, scheme, device="cpu")
    hf_logging.set_verbosity_error()
    loaded, info = load_reporting_keys(out)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        logits = loaded(ids).logits
    assert logits.shape == (1, 5, loaded.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()


def test_transformers_nvfp4_weights_equal_nvq_dequantization(tiny_llama, tmp_path):
    out = tmp_path / "out"
    convert(tiny_llama, out, "nvfp4", device="cpu")
    hf_logging.set_verbosity_error()
    model, _ = load_reporting_keys(out)
    tensors = load_file(out / "model.safetensors")
    m = "model.layers.1.self_attn.k_proj"
    q = nvfp4.NVFP4Quantized(
        e2m1.unpack_pairs(tensors[f"{m}.weight_packed"]), tensors[f"{m}.weight_scale"], tensors[f"{m}.weight_global_scale"]
    )
    module = model.get_submodule(m)
    assert not hasattr(module, "weight")  # loaded compressed: weight_packed, weight_scale, weight_global_scale
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # the first forward decompresses (compressed-tensors hook)
    weight = module.weight.detach()
    assert torch.equal(weight, nvfp4.dequantize(q, weight.dtype))
