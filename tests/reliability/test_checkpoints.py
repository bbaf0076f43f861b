"""Hostile safetensors headers: too many entries, deep nesting, unprintable tensor names."""

from __future__ import annotations

import json
import struct
import time

import pytest

from nvq.io.safetensors import MAX_TENSORS_PER_FILE
from tests.reliability.conftest import refused


def _write_raw_header(d, header_bytes: bytes, data: bytes = b"") -> None:
    for f in d.glob("*.safetensors"):
        f.unlink()
    header_bytes += b" " * (-len(header_bytes) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def test_header_with_too_many_entries_is_refused_fast(llama_copy, tmp_path):
    n = MAX_TENSORS_PER_FILE + 1
    entry = '"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}'
    header = ("{" + ",".join(entry % (i, i, i + 1) for i in range(n)) + "}").encode()
    _write_raw_header(llama_copy, header, bytes(n))
    out = tmp_path / "out"
    started = time.perf_counter()
    refused("convert", llama_copy, out, "--scheme", "nvfp4", out=out, match=f"describes {n} tensors")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("header, match", [
    (b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", "cannot be parsed"),
    (b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 1]}}', "cannot be parsed"),
])
def test_header_json_bombs(llama_copy, tmp_path, header, match):
    _write_raw_header(llama_copy, header, b"\0")
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "nvfp4", out=out, match=match)


def test_lone_surrogate_tensor_name(llama_copy):
    header = json.dumps({"bad\ud800name": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    _write_raw_header(llama_copy, header, b"\0")
    text = refused("inspect", llama_copy, "--tensors", match="lone surrogates")
    assert "\\ud800" in text
