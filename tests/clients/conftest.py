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


@pytest.fixture(scope="session")
def gptqmodel_env():
    """The transformers + optimum + gptqmodel venv's python (scripts/gptqmodel-env.sh: created on
    first use, ~6 GB and minutes, then cached); its tests skip, saying why, only when it cannot be
    created."""
    from tests.support.gptqmodel_client import gptqmodel_python

    try:
        return gptqmodel_python()
    except RuntimeError as e:
        pytest.skip(f"the gptqmodel venv (scripts/gptqmodel-env.sh) could not be created: {e}")
