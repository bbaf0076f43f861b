"""Session-wide tiny checkpoints, built once with transformers (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny_models import build_tiny_gemma4, build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_llama_untied(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_gemma4_moe(tmp_path_factory):
    """26B-A4B-like: MoE beside the dense MLP, k_eq_v full layer; Gemma4ForConditionalGeneration."""
    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4-moe"), "moe")


@pytest.fixture(scope="session")
def tiny_gemma4_dense(tmp_path_factory):
    """31B-like: dense k_eq_v, saved as Gemma4ForCausalLM."""
    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4-dense"), "dense_keqv", conditional=False)


@pytest.fixture(scope="session")
def tiny_gemma4_ple(tmp_path_factory):
    """E2B-like: per-layer embeddings, KV sharing, double-wide MLP."""
    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4-ple"), "ple")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Factory: tiny_gguf(hf_dir, outtype="f32", fuse_qkv=False) -> a GGUF of that checkpoint made
    by llama.cpp's converter, built once per session."""
    from tests.support.llamacpp import convert_to_gguf

    root = tmp_path_factory.mktemp("tiny-gguf")
    made: dict[tuple, object] = {}

    def make(hf_dir, outtype: str = "f32", fuse_qkv: bool = False):
        key = (str(hf_dir), outtype, fuse_qkv)
        if key not in made:
            name = f"{len(made)}-{outtype}{'-qkv' if fuse_qkv else ''}.gguf"
            made[key] = convert_to_gguf(hf_dir, root / name, outtype, ["--fuse-qkv"] if fuse_qkv else [])
        return made[key]

    return make
