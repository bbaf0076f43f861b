"""A GGUF oracle whose weights are NaN: the certificate fails, and its logits are never 'ok'."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from nvq.cli import app
from nvq.io.gguf import GGUFFile


def test_nan_oracle_never_reads_as_a_match(tiny_llama, tiny_gguf, tmp_path):
    src = tiny_gguf(tiny_llama, "f32")
    oracle = tmp_path / "nan.gguf"
    oracle.write_bytes(src.read_bytes())
    t = GGUFFile.open(oracle).tensors["output_norm.weight"]
    with open(oracle, "r+b") as f:
        f.seek(t.offset)
        f.write(np.full(t.nbytes // 4, np.nan, np.float32).tobytes())
    cert = tmp_path / "cert.json"
    result = CliRunner().invoke(app, ["verify", str(tiny_llama), "--oracle", str(oracle), "--tokens", "8",
                                      "--device", "cpu", "--json", str(cert)])
    assert result.exit_code == 1, result.output  # a verdict: the oracle disagrees, with NaN
    assert "Traceback" not in result.output
    logits = json.loads(cert.read_text())["logits"]
    # before: NaN logits fell under the log p > -16 cut-off, so KLD 0 and "ok"
    assert logits["ok"] is False and logits["mean_kld"] is None, logits
