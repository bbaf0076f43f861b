"""Verify fixtures: fp32 tiny checkpoints, their f32 GGUF oracles (llama.cpp's converter), and
nvq's NVFP4 / MXFP4 outputs of them, each built once per session."""

from __future__ import annotations

import pytest
import torch

from nvq.quant.pipeline import convert
from tests.support.tiny_models import build_tiny_gemma4, build_tiny_llama


@pytest.fixture(scope="session")
def llama_f32(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("v-llama-f32"), dtype=torch.float32)


@pytest.fixture(scope="session")
def gemma4_moe_f32(tmp_path_factory):
    return build_tiny_gemma4(tmp_path_factory.mktemp("v-gemma4-moe-f32"), "moe", dtype=torch.float32)


@pytest.fixture(scope="session")
def gemma4_ple_f32(tmp_path_factory):
    return build_tiny_gemma4(tmp_path_factory.mktemp("v-gemma4-ple-f32"), "ple", dtype=torch.float32)


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """Factory: quantized(hf_dir, scheme) -> nvq's output directory, converted once."""
    made = {}

    def make(src, scheme="nvfp4"):
        key = (str(src), scheme)
        if key not in made:
            out = tmp_path_factory.mktemp(f"v-{scheme}") / "out"
            convert(src, out, scheme, device="cpu")
            made[key] = out
        return made[key]

    return make
