"""fp32 copies of the tiny checkpoints (the session fixtures in tests/conftest.py are bf16) and the
token ids the forward tests run on."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny_models import (
    TOKENIZER_VOCAB_SIZE,
    build_tiny_gemma3,
    build_tiny_gemma4,
    build_tiny_llama,
)


@pytest.fixture(scope="session")
def token_ids():
    """12 random ids, special tokens excluded."""
    return torch.randint(
        4, TOKENIZER_VOCAB_SIZE, (12,), generator=torch.Generator().manual_seed(1234)
    )


@pytest.fixture(scope="session")
def tiny_llama_f32(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-f32"), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_gemma3_f32(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3-f32"), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_gemma4_moe_f32(tmp_path_factory):
    return build_tiny_gemma4(
        tmp_path_factory.mktemp("tiny-gemma4-moe-f32"), "moe", dtype=torch.float32
    )


@pytest.fixture(scope="session")
def tiny_gemma4_ple_f32(tmp_path_factory):
    return build_tiny_gemma4(
        tmp_path_factory.mktemp("tiny-gemma4-ple-f32"), "ple", dtype=torch.float32
    )
