"""Rounding cells of GGUF tensors: the original values lie in them, their widths predict the
storage noise, and the K-quant steps read off the grid are the grid's own spacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

from nvq.io.gguf import GGUFFile  # noqa: E402
from nvq.io.gguf_cells import _CODE_BYTES, read_cells  # noqa: E402

QUANTIZABLE = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _write(path, tensors: dict[str, tuple[np.ndarray, str]]) -> GGUFFile:
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, kind) in tensors.items():
        w.add_tensor(name, data, raw_dtype=GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile.open(path)


@pytest.fixture(scope="module")
def weights():
    return (np.random.default_rng(0).standard_normal((64, 512)) * 0.02).astype(np.float32)


def test_originals_lie_in_their_cells_and_widths_predict_the_noise(tmp_path, weights):
    gf = _write(tmp_path / "q.gguf", {k: (quants.quantize(weights, GGMLQuantizationType[k]), k) for k in QUANTIZABLE})
    w = torch.from_numpy(weights)
    for kind in QUANTIZABLE:
        values = gf.read_rows(kind, 0, 64)
        cells = read_cells(gf, kind, 0, 64, values)
        inside = ((w >= values + cells.lower - 1e-7) & (w <= values + cells.upper + 1e-7)).float().mean().item()
        predicted = (cells.width() ** 2 / 12).mean().item()
        actual = ((w - values) ** 2).mean().item()
        assert inside >= 0.98, (kind, inside)
        assert 0.8 <= predicted / actual <= 1.25, (kind, predicted / actual)


def test_exact_types_have_no_cells(tmp_path, weights):
    gf = _write(tmp_path / "f.gguf", {"F32": (weights, "F32")})
    assert read_cells(gf, "F32", 0, 64, gf.read_rows("F32", 0, 64)) is None


@pytest.mark.parametrize("kind", K_QUANTS)
def test_k_quant_steps_are_the_grid_spacing(tmp_path, kind):
    """Random K-quant blocks (gguf-py cannot quantize them): every value minus its block's zero-code
    value is a whole number of the step read off the grid."""
    qtype = GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(8, 4 * size), dtype=np.uint8)
    # sane fp16 super-scales: d (and dmin) at the block's d offset
    d_at = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[kind]
    blocks = raw.reshape(-1, size)
    for off in d_at:
        blocks[:, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    gf = _write(tmp_path / "k.gguf", {kind: (blocks.reshape(8, -1), kind)})
    values = gf.read_rows(kind, 0, 8)
    cells = read_cells(gf, kind, 0, 8, values)
    step = cells.width()
    zeroed = blocks.copy()
    for start, stop, zero, _one in _CODE_BYTES[kind]:
        zeroed[:, start:stop] = zero
    base = torch.from_numpy(quants.dequantize(zeroed.reshape(8, -1), qtype).astype(np.float32))
    nonzero = step > 0
    codes = (values - base)[nonzero] / step[nonzero]
    assert nonzero.float().mean() > 0.5
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert 4 * block == values.shape[1]
