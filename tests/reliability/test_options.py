"""Numeric options and prompt files: out-of-range values are refused before any work starts."""

from __future__ import annotations

import pytest

from nvq.errors import ConfigError
from nvq.limits import read_text_file
from tests.reliability.conftest import refused


@pytest.mark.parametrize("extra", [
    ["--group-size", "0"],
    ["--group-size", "-2"],
    ["--calib-samples", "1000000000"],
    ["--calib-seq-len", "1000000000"],
    ["--damp", "inf"],
])
def test_convert_gptq_options(llama_copy, tmp_path, extra):
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "gptq", *extra, out=out, match=extra[0])


@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_convert_max_shard_gb(llama_copy, tmp_path, value):
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "nvfp4", "--max-shard-gb", value, out=out, match="--max-shard-gb")


def test_plan_group_size_zero(llama_copy):
    refused("plan", llama_copy, "--scheme", "gptq", "--group-size", "0", match="--group-size 0")


def test_factor_nan_is_a_usage_error(llama_copy, tmp_path):
    out = tmp_path / "cert.json"
    refused("verify", llama_copy, "--oracle", tmp_path / "x.gguf", "--json", out, "--factor", "nan", out=out,
            match="--factor", usage=True)


@pytest.mark.parametrize("extra", [
    ["--factor", "inf"],
    ["--factor", "1e308"],
    ["--tokens", "1000000000"],
    ["--max-tokens", "1000000000"],
])
def test_verify_options(llama_copy, tmp_path, extra):
    out = tmp_path / "cert.json"
    refused("verify", llama_copy, "--oracle", tmp_path / "x.gguf", "--json", out, *extra, out=out,
            match=extra[0])


@pytest.mark.parametrize("make", [
    lambda d: "/dev/zero",
    lambda d: d,  # a directory
    lambda d: (d / "big.txt").write_bytes(b"a" * ((16 << 20) + 1)) and d / "big.txt",
    lambda d: (d / "bin.txt").write_bytes(b"\xff\xfe\x00") and d / "bin.txt",
])
def test_prompt_file_is_bounded(tmp_path, make):
    with pytest.raises(ConfigError, match="--prompt-file"):
        read_text_file(make(tmp_path), "--prompt-file")


def test_prompt_file_dev_zero_through_cli(llama_copy, tmp_path):
    out = tmp_path / "cert.json"
    refused("verify", llama_copy, "--oracle", tmp_path / "x.gguf", "--json", out, "--prompt-file", "/dev/zero",
            out=out, match="--prompt-file")
