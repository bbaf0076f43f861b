"""compressed-tensors 0.20.0 as a client: it parses nvq's config and decompresses nvq's tensors
into exactly the weights nvq's own dequantization gives."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.model_compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from transformers.utils.quantization_config import CompressedTensorsConfig

from nvq.quant.pipeline import convert
from tests.support.ct_dequant import DEQUANT, ct_modules


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma4_moe"])
def test_compressed_tensors_decompresses_to_nvq_dequantization(model, scheme, request, tmp_path):
    src = request.getfixturevalue(model)
    out = tmp_path / "out"
    convert(src, out, scheme, device="cpu")
    qc_dict = json.loads((out / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(qc_dict)  # pydantic, extra="forbid": unknown keys fail here
    # the route transformers takes on load: its CompressedTensorsConfig, then CT's ModelCompressor
    assert ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(dict(qc_dict))) is not None
    group = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    modules = ct_modules(load_file(out / "model.safetensors"))
    assert modules
    for module, state in modules.items():
        weight = compressor.decompress(dict(state), group)["weight"]
        ours = DEQUANT[scheme](state, weight.dtype)
        assert weight.shape == ours.shape, module
        assert torch.equal(weight, ours), module
    if model == "tiny_gemma4_moe":
        experts = [m for m in modules if ".experts." in m]
        assert len(experts) == 6 * 4 * 3  # layers × experts × (gate, up, down)
