"""Cases of the reliability issue that the other modules of this corpus did not pin yet: OUT that
is the GGUF input itself, options written in exponent form, an oversized safetensors header, and
GGUF files whose values are Inf or cut short."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from tests.reliability.conftest import SMALL_LLAMA, assert_refused, nvq, refused, tree
from tests.reliability.test_gguf_inputs import _gguf


@pytest.mark.parametrize("flag", ["--force", "--force-replace-any"])
def test_gguf_convert_onto_the_gguf_itself_is_refused(small_gguf, flag):
    before = tree(small_gguf.parent)
    result = nvq("convert", small_gguf, small_gguf, "--scheme", "bf16", flag)
    assert_refused(result)
    assert tree(small_gguf.parent) == before


@pytest.mark.parametrize("extra", [["--calib-samples", "1e9"], ["--calib-seq-len", "1e9"]])
def test_convert_options_in_exponent_form(llama_copy, tmp_path, extra):
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "gptq", *extra, out=out, match=" ".join(extra))


@pytest.mark.parametrize("extra", [["--tokens", "1e9"], ["--max-tokens", "1e9"], ["--factor", "1e308"]])
def test_verify_options_in_exponent_form(llama_copy, tmp_path, extra):
    out = tmp_path / "cert.json"
    refused("verify", llama_copy, "--oracle", tmp_path / "x.gguf", "--json", out, *extra, out=out, match=extra[0])


def test_safetensors_header_over_the_limit_is_refused_before_reading_it(llama_copy, tmp_path):
    (llama_copy / "model.safetensors").write_bytes(struct.pack("<Q", 200_000_000) + b"{}" + b" " * 6)
    out = tmp_path / "out"
    started = time.perf_counter()
    refused("convert", llama_copy, out, "--scheme", "nvfp4", out=out, match="limit")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_gguf_to_bf16_refuses_infinite_values(tmp_path, value):
    src = _gguf(tmp_path / "m.gguf", SMALL_LLAMA, values={"blk.0.attn_q.weight": np.full((8, 8), value, np.float32)})
    out = tmp_path / "o"
    refused("convert", src, out, "--scheme", "bf16", out=out, match="NaN or Inf")


def test_gguf_to_bf16_refuses_a_file_cut_short(tmp_path):
    src = _gguf(tmp_path / "m.gguf", SMALL_LLAMA)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 200])  # the last tensors' values are missing
    out = tmp_path / "o"
    refused("convert", src, out, "--scheme", "bf16", out=out)
