"""Offloading parked calibration activations (nvq.quant.offload) is exact: GPTQ writes the same
codes, scales and zeros whether every parking moves its activations to host memory or none does."""

from __future__ import annotations

import pytest
import torch

from nvq.io.hf import Checkpoint
from nvq.quant import calibrate, offload
from nvq.quant.pipeline import plan_convert
from tests.support.tiny_models import build_tiny_gemma3

NEVER = 2**62  # a budget no parking reaches


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), dtype=torch.bfloat16)


class _Counting(offload.Offload):
    made: list[_Counting] = []

    def __init__(self, budget: int):
        super().__init__(budget)
        self.parks = 0
        _Counting.made.append(self)

    def park(self, tensors):
        self.parks += 1
        return super().park(tensors)


def _gptq(src, device: str, budget: int | None, monkeypatch) -> tuple[dict, _Counting | None]:
    monkeypatch.setattr(calibrate, "Offload", _Counting)
    _Counting.made.clear()
    ckpt = Checkpoint.open(src)
    plan = plan_convert(src, "gptq", group_size=32)
    seqs = [torch.randint(0, 200, (24,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    out = {}

    def emit(u, q):
        out[u.out] = tuple(t.cpu().clone() for t in (q.codes, q.scale, q.zero))

    options = calibrate.GPTQOptions(32, park_budget=budget)
    calibrate.run_gptq(ckpt, plan, seqs, options, torch.device(device), emit)
    return out, (_Counting.made[0] if _Counting.made else None)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3", "tiny_gemma4_moe", "tiny_gemma4_ple"])
def test_offloading_every_parking_changes_no_byte_on_cpu(model, request, monkeypatch):
    src = request.getfixturevalue(model)
    kept, none = _gptq(src, "cpu", None, monkeypatch)
    assert none is None  # on the CPU nothing is offloaded unless asked
    moved, off = _gptq(src, "cpu", 0, monkeypatch)
    assert off.moved_bytes > 0 and off.resident == 0
    _same(kept, moved)


def test_one_parking_per_distinct_linear_input(tiny_llama, monkeypatch):
    # q/k/v share their input, as do gate/up: 4 parkings per layer and sequence (q, o, gate, down)
    _, off = _gptq(tiny_llama, "cpu", 0, monkeypatch)
    assert off.parks == 4 * 2 * 4  # sequences × layers × parkings


def test_a_budget_keeps_the_first_parkings_on_the_device(tiny_llama, monkeypatch):
    all_moved, a = _gptq(tiny_llama, "cpu", 0, monkeypatch)
    part, b = _gptq(tiny_llama, "cpu", 3 * 24 * 64 * 4, monkeypatch)  # about one sequence's state
    assert 0 < b.moved_bytes < a.moved_bytes
    _same(all_moved, part)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma4_moe"])
def test_offloading_changes_no_byte_on_cuda(model, request, monkeypatch):
    src = request.getfixturevalue(model)
    kept, on_device = _gptq(src, "cuda", NEVER, monkeypatch)
    assert on_device.moved_bytes == 0
    moved, off = _gptq(src, "cuda", 0, monkeypatch)
    assert off.moved_bytes > 0
    _same(kept, moved)
