"""Helpers shared by the reliability corpus: a CLI runner, source copies, a tiny GGUF."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from nvq.cli import app

runner = CliRunner()


def nvq(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, *words):
    """Exit 2 with one sentence naming what is wrong, and no traceback."""
    text = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert text.startswith("error: ") and "\n" not in text, text
    assert "Traceback" not in result.output
    for w in words:
        assert w in text, text


def tree(root):
    """Every path under root with its bytes, to show that nothing changed."""
    return {p.relative_to(root): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture
def src(tiny_llama, tmp_path):
    """A private copy of the tiny llama checkpoint, free to alter."""
    return shutil.copytree(tiny_llama, tmp_path / "src")


@pytest.fixture
def small_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
