"""Rows decoded by torch (nvq.io.gguf_torch) equal gguf-py's dequantization bit for bit, and the
Q8_0 steps read off the block scales equal the generic all-1-minus-all-0 codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

from nvq.io import gguf_cells, gguf_torch  # noqa: E402
from tests.io.test_gguf_cells import _write  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    w = np.random.default_rng(3).standard_normal((48, 256)).astype(np.float32) * 0.05
    w[0, :32] = 0.0  # an all-zero Q8_0 block (scale 0)
    w[1, :4] = [65504.0, -1e-8, 3e-5, -7.0]  # F16's largest, a subnormal, tiny values
    return w


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(gguf_torch.DECODERS))
def test_torch_rows_equal_gguf_py(tmp_path, weights, kind, device):
    data = weights if kind == "F32" else quants.quantize(weights, GGMLQuantizationType[kind])
    gf = _write(tmp_path / "t.gguf", {"w": (data, kind)})
    t = gf.info("w")
    raw = np.fromfile(gf.path, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(t.num_rows, t.row_bytes)
    want = np.asarray(quants.dequantize(raw, GGMLQuantizationType[kind]), dtype=np.float32)
    for start, stop in ((0, 48), (5, 17), (7, 7)):
        got = gf.read_rows("w", start, stop, torch.device(device))
        assert got.dtype == torch.float32 and got.device.type == device
        assert np.array_equal(got.cpu().numpy().view(np.uint32), want[start:stop].view(np.uint32)), (kind, start)


@pytest.mark.parametrize("device", DEVICES)
def test_q8_0_steps_equal_the_generic_grid_reading(tmp_path, weights, monkeypatch, device):
    gf = _write(tmp_path / "q.gguf", {"w": (quants.quantize(weights, GGMLQuantizationType.Q8_0), "Q8_0")})
    values = gf.read_rows("w", 3, 40, torch.device(device))
    fast = gguf_cells.read_cells(gf, "w", 3, 40, values)
    monkeypatch.setattr(gguf_torch, "STEPS", {})
    generic = gguf_cells.read_cells(gf, "w", 3, 40, values)
    assert fast.lower.device.type == generic.lower.device.type == device
    assert torch.equal(fast.lower, generic.lower) and torch.equal(fast.upper, generic.upper)
    assert float(fast.width().min()) >= 0.0
