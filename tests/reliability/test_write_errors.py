"""Disk full, read-only targets and failed runs: one sentence, exit 2, nothing left behind."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from nvq.errors import ConfigError
from nvq.io import safetensors
from nvq.quant import pipeline
from tests.reliability.conftest import assert_refused, nvq

QUANTIZED = ("--scheme", "nvfp4", "--device", "cpu")
DENSE = ("--scheme", "bf16")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


@pytest.fixture(params=["hf", "gguf"])
def source(request, src, small_gguf):
    """(SRC, convert options) for a quantized HF convert and a GGUF -> bf16 convert."""
    return (src, QUANTIZED) if request.param == "hf" else (small_gguf, DENSE)


def test_disk_full_while_writing_shards(source, tmp_path, monkeypatch):
    path, options = source
    monkeypatch.setattr(safetensors.os, "pwrite", _disk_full)
    out = tmp_path / "new" / "deeper" / "o"
    assert_refused(nvq("convert", path, out, *options), "could not be written", "No space left")
    assert not (tmp_path / "new").exists()  # the parents this run made are gone again


def test_disk_full_while_copying_side_files(src, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "copyfileobj", _disk_full)
    out = tmp_path / "o"
    assert_refused(nvq("convert", src, out, *QUANTIZED), "could not be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_read_only_output_location(source, tmp_path, monkeypatch):
    path, options = source
    monkeypatch.setattr(os, "mkdir", _read_only)
    out = tmp_path / "o"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_refused(nvq("convert", path, out, *options), "could not be written", "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_failed_convert_removes_the_parents_it_made(src, tmp_path, monkeypatch):
    def bad_config(*args):
        raise ConfigError("config.json cannot be written for this test.")

    monkeypatch.setattr(pipeline, "_write_config", bad_config)  # fails after the shards are written
    assert_refused(nvq("convert", src, tmp_path / "a" / "b" / "o", *QUANTIZED), "for this test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_convert_keeps_parents_that_existed(small_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.os, "pwrite", _disk_full)
    (tmp_path / "a").mkdir()
    assert nvq("convert", small_gguf, tmp_path / "a" / "b" / "o", *DENSE).exit_code == 2
    assert (tmp_path / "a").is_dir() and not (tmp_path / "a" / "b").exists()
