"""Every registered scheme round-trips a small weight: encode → its layout's tensors → decode,
and decode equals what verify expects storing the weight in that scheme to do."""

from __future__ import annotations

import pytest
import torch

from nvq import schemes
from nvq.io.safetensors import DTYPES
from nvq.verify.candidate import Scheme
from nvq.verify.metrics import rel_l2

SHAPE = (32, 256)


def _weight(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(SHAPE, generator=g) * 0.05).to(dtype)


def _quantized():
    return [pytest.param(s, id=s.name) for s in schemes.all_schemes() if not s.dense]


@pytest.mark.parametrize("spec", _quantized())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_encoded_tensors_fill_the_layout_and_decode_to_the_expected_weight(spec, dtype):
    w = _weight(dtype)
    group = spec.group_sizes[-1]
    layout = spec.layout(group)
    assert layout.shape_problem(SHAPE) is None
    tensors = spec.encode(w, group)
    declared = {t.name.removeprefix("m."): t for t in layout.output_tensors("m", SHAPE)}
    assert set(tensors) == set(declared)
    for suffix, t in tensors.items():
        assert tuple(t.shape) == tuple(declared[suffix].shape), suffix
        assert t.dtype == DTYPES[declared[suffix].dtype].torch, suffix
    written = next(d for d in spec.decoders.values() if set(d.parts) <= set(tensors))
    assert written.shape({s: tuple(t.shape) for s, t in tensors.items()}) == SHAPE
    decoded = written.decode(tensors)
    storage = Scheme(spec.name, "ct" if "ct" in spec.decoders else None, group_size=group)
    assert torch.equal(decoded, spec.expected(w, storage, None, None))
    assert 0 < rel_l2(decoded, w.float()) < 0.2  # quantized, and still the same weight


@pytest.mark.parametrize("spec", _quantized())
def test_a_shape_off_the_group_is_a_problem(spec):
    group = spec.group_sizes[-1]
    assert spec.layout(group).shape_problem((SHAPE[0], SHAPE[1] + group // 2)) is not None


@pytest.mark.parametrize("storage", schemes.dense().storage_names)
def test_dense_storage_rounds_to_its_dtype(storage):
    w = _weight(torch.float64)
    got = schemes.storing(storage).expected(w, Scheme(storage), None, None)
    want = {
        "f32": torch.float32,
        "bf16": torch.bfloat16,
        "f16": torch.float16,
        "f64": torch.float64,
    }[storage]
    assert got.dtype == torch.float32 and torch.equal(got, w.to(want).float())
