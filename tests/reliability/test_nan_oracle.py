"""A GGUF oracle whose weights are NaN is bad input (exit 2, one sentence naming the tensor, no
certificate), and NaN logits never read as a match."""

from __future__ import annotations

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
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert text.startswith("error: ") and "\n" not in text and "'output_norm.weight'" in text, text
    assert not cert.exists()


def test_nan_logits_are_never_ok():
    """Before: NaN logits fell under the log p > -16 cut-off, so KLD 0 and "ok"."""
    import torch

    from nvq.verify.diff import logit_stats

    seq = [torch.tensor([1, 2, 3, 4])]
    good = torch.randn(4, 10)
    stats = logit_stats(good, torch.full_like(good, float("nan")), seq)
    assert not stats["mean_kld"] <= 1e9  # NaN, never a small KLD
