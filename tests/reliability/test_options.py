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


@pytest.mark.parametrize("flag", ["--factor", "--tokens", "--max-tokens", "--sequences", "--draws"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc", "1e400"])
def test_verify_numeric_option_not_a_finite_number(llama_copy, tmp_path, flag, value):
    # `--factor nan` used to end in typer's "Invalid value" box instead of one sentence
    out = tmp_path / "cert.json"
    line = refused("verify", llama_copy, "--oracle", tmp_path / "x.gguf", "--json", out, flag, value, out=out,
                   match=f"{flag} ")
    assert "must be" in line


@pytest.mark.parametrize("flag", ["--max-shard-gb", "--damp", "--calib-samples", "--calib-seq-len", "--tp",
                                  "--group-size"])
@pytest.mark.parametrize("value", ["nan", "inf", "abc"])
def test_convert_numeric_option_not_a_finite_number(llama_copy, tmp_path, flag, value):
    out = tmp_path / "out"
    refused("convert", llama_copy, out, "--scheme", "gptq", flag, value, out=out, match=f"{flag} {value}")


@pytest.mark.parametrize("extra", [["--tp", "0"], ["--tp", "nan"], ["--group-size", "inf"], ["--group-size", "32.5"]])
def test_plan_numeric_options(llama_copy, extra):
    refused("plan", llama_copy, "--scheme", "gptq", *extra, match=" ".join(extra))


@pytest.mark.parametrize("extra", [["--tokens", "2.5"], ["--draws", "17"], ["--draws", "0"], ["--sequences", "0"]])
def test_verify_integer_options(llama_copy, tmp_path, extra):
    out = tmp_path / "cert.json"
    refused("verify", llama_copy, "--oracle", tmp_path / "x.gguf", "--json", out, *extra, out=out,
            match=" ".join(extra))


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
