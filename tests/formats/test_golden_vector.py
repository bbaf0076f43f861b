"""The cross-library golden 1x32 bf16 row (tests/data/vectors_row32.json): nvq must write the
exact bytes of compressed-tensors NVFP4/MXFP4, ModelOpt NVFP4 and the gguf-py MXFP4 block."""

import json
import struct
from pathlib import Path

import pytest
import torch

from nvq.formats import e2m1, mxfp4, nvfp4
from nvq.formats.e2m1 import Rounding
from nvq.formats.nvfp4 import Profile
from nvq.formats.scales import ScaleRule, fp8_e4m3_bits
from nvq.layouts.gguf_blocks import mxfp4_to_blocks

VECTORS = json.loads((Path(__file__).parents[1] / "data" / "vectors_row32.json").read_text())


def _hex(data: torch.Tensor | bytes) -> str:
    raw = data if isinstance(data, bytes) else bytes(data.flatten().tolist())
    return " ".join(f"{b:02x}" for b in raw)


@pytest.fixture(scope="module")
def row() -> torch.Tensor:
    raw = bytearray.fromhex(VECTORS["input_bf16_hex"])
    return torch.frombuffer(raw, dtype=torch.bfloat16).reshape(1, 32).clone()


def test_input_bytes_decode_to_the_listed_values(row):
    values = row.float().flatten().tolist()
    assert values == VECTORS["input_values"]
    assert torch.signbit(row[0, 10]) and torch.signbit(row[0, 26])  # the -0.0s survive


def test_ct_nvfp4(row):
    expected = VECTORS["ct_nvfp4"]
    q = nvfp4.quantize(row)
    assert _hex(e2m1.pack_pairs(q.codes)) == expected["weight_packed"]
    assert _hex(fp8_e4m3_bits(q.block_scale)) == expected["weight_scale_fp8"]
    assert q.global_scale.item() == expected["weight_global_scale_f32"]
    assert _hex(struct.pack("<f", q.global_scale.item())) == expected["weight_global_scale_hex"]


def test_modelopt_nvfp4(row):
    expected = VECTORS["modelopt_nvfp4"]
    q = nvfp4.quantize(row, profile=Profile.MODELOPT)
    assert _hex(e2m1.pack_pairs(q.codes)) == expected["weight"]
    assert _hex(fp8_e4m3_bits(q.block_scale)) == expected["weight_scale_fp8"]
    assert nvfp4.weight_scale_2(q).item() == expected["weight_scale_2_f32"]


def test_ct_mxfp4(row):
    expected = VECTORS["ct_mxfp4"]
    q = mxfp4.quantize(row)
    assert _hex(e2m1.pack_pairs(q.codes)) == expected["weight_packed"]
    assert _hex(q.scale) == expected["weight_scale_e8m0"]


def test_gguf_mxfp4_block(row):
    q = mxfp4.quantize(row, ScaleRule.FLOOR, Rounding.GGML)
    assert _hex(mxfp4_to_blocks(q).tobytes()) == VECTORS["gguf_mxfp4_block"]


def test_ct_nvfp4_dequantizes_block_zero_to_its_tie_points(row):
    # block 0 scale 448/896 = 0.5: 0.125 -> 0 (tie), 0.375 -> 0.5 (tie up), 1.75 -> 2 (tie up)
    out = nvfp4.dequantize(nvfp4.quantize(row), torch.bfloat16)[0, :16].tolist()
    assert out == [3.0, -3.0, 0.0, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 0.0, 0.0, -0.0, 0.0, 1.0, -1.5]  # fmt: skip
