"""Fixtures shared by the client tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vllm_env():
    """The vLLM venv's python (scripts/vllm-env.sh: created on first use, minutes, then cached);
    the vllm tests skip, saying why, only when it cannot be created."""
    from tests.support.vllm_client import vllm_python

    try:
        return vllm_python()
    except RuntimeError as e:
        pytest.skip(f"the vLLM venv (scripts/vllm-env.sh) could not be created: {e}")
