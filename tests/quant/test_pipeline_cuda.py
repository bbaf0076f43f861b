"""The convert pipeline on a GPU: pinned reads, device-side finite check, streamed two-pass NVFP4
groups, all byte-identical to the CPU run. Run on a GPU machine: pytest -m cuda."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvq.errors import TensorError
from nvq.quant import pipeline
from nvq.quant.pipeline import convert

pytestmark = pytest.mark.cuda


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU; deselect with -m 'not cuda' on machines without one")


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_groups_streamed_twice_equal_the_cpu_bytes(tiny_llama, tmp_path, monkeypatch, scheme):
    cpu = convert(tiny_llama, tmp_path / "cpu", scheme, device="cpu").out
    monkeypatch.setattr(pipeline, "GROUP_CACHE_BYTES", 0)  # every NVFP4 group takes the two-pass path
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 4096)  # and several chunks per weight
    gpu = convert(tiny_llama, tmp_path / "gpu", scheme, device="cuda").out
    assert digest(gpu) == digest(cpu)


@pytest.mark.parametrize("two_pass", [False, True])
def test_nan_found_on_the_device_names_row_and_column(tiny_llama, tmp_path, monkeypatch, two_pass):
    src = tmp_path / "nan"
    shutil.copytree(tiny_llama, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 17] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    if two_pass:
        monkeypatch.setattr(pipeline, "GROUP_CACHE_BYTES", 0)
    with pytest.raises(TensorError, match=r"model.layers.1.mlp.up_proj.weight holds NaN at row 3, column 17"):
        convert(src, tmp_path / "out", "nvfp4", device="cuda")
    assert [p.name for p in tmp_path.iterdir()] == ["nan"]
