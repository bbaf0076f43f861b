"""GGUF inputs: empty dimensions, GGUF → bf16 from files that lack layers or hold NaN, and a NaN
oracle whose logit statistics must never read as a perfect match."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch

from nvq.verify.diff import logit_stats
from tests.reliability.conftest import refused
from tests.test_gguf_convert import SMALL_LLAMA


def _gguf(path, tensors, layers=1, values=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    for name, shape in tensors:
        w.add_tensor(name, (values or {}).get(name, np.ones(shape, np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_small_llama_gguf_converts(tmp_path):
    from typer.testing import CliRunner

    from nvq.cli import app

    result = CliRunner().invoke(app, ["convert", str(_gguf(tmp_path / "m.gguf", SMALL_LLAMA)), str(tmp_path / "o"),
                                      "--scheme", "bf16"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case, match", [
    ("missing_layer", "'num_hidden_layers' is 2 but no tensor of layer 1"),
    ("missing_output_norm", "'output_norm.weight' is missing"),
    ("nan_values", "holds NaN or Inf"),
    ("zero_dim", "every dimension must be at least 1"),
])
def test_gguf_to_bf16_refuses(tmp_path, case, match):
    tensors, layers, values = list(SMALL_LLAMA), 1, None
    if case == "missing_layer":
        layers = 2
    elif case == "missing_output_norm":
        tensors = [t for t in tensors if t[0] != "output_norm.weight"]
    elif case == "nan_values":
        values = {"blk.0.ffn_up.weight": np.full((16, 8), np.nan, np.float32)}
    elif case == "zero_dim":
        tensors = [*tensors, ("extra.weight", (0, 8))]
    src = _gguf(tmp_path / "m.gguf", tensors, layers, values)
    out = tmp_path / "o"
    refused("convert", src, out, "--scheme", "bf16", out=out, match=match)


def test_nan_oracle_logits_are_not_ok():
    ids = torch.arange(6)
    good = torch.randn(6, 10, dtype=torch.float64)
    bad = good.clone()
    bad[2, 3] = math.nan
    stats = logit_stats(bad, good, [ids])
    assert math.isnan(stats["mean_kld"]), stats
    assert not stats["mean_kld"] <= 1.0
    assert logit_stats(good, good, [ids])["mean_kld"] == 0
