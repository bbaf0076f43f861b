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
