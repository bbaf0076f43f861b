"""Helpers shared by the reliability corpus: a CLI runner, source copies, a small GGUF. Every bad
input runs through the CLI and must end with exit 2, one line on stderr, no traceback, and
nothing written."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from nvq.cli import app

runner = CliRunner()
# a one-layer Llama GGUF with every tensor its config calls for
SMALL_LLAMA = [("token_embd.weight", (10, 8)), ("output_norm.weight", (8,)),
               ("blk.0.attn_norm.weight", (8,)), ("blk.0.ffn_norm.weight", (8,)),
               *[(f"blk.0.attn_{p}.weight", (8, 8)) for p in ("q", "k", "v", "output")],
               ("blk.0.ffn_gate.weight", (16, 8)), ("blk.0.ffn_up.weight", (16, 8)),
               ("blk.0.ffn_down.weight", (8, 16))]


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
    for name, shape in SMALL_LLAMA:  # complete: a GGUF missing tensors is itself refused
        w.add_tensor(name, np.full(shape, 0.01, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def refused(*args, out=None, match: str = "") -> str:
    """Run `nvq ARGS`; assert exit 2, a single 'error: ...' line naming `match`, no output dir."""
    result = runner.invoke(app, [str(a) for a in args])
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert match in lines[0], text
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "output left behind"
    return lines[0]


@pytest.fixture
def llama_copy(tiny_llama, tmp_path):
    """A writable copy of the session's tiny Llama."""
    return shutil.copytree(tiny_llama, tmp_path / "src")
