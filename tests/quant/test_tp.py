"""--tp: row-parallel weights must split into whole groups per rank (formats.md §5.2)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from nvq.cli import app
from tests.support import tiny_models as tm

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_i96(tmp_path_factory):
    """A Llama whose MLP is 96 wide: ffn_down has K = 96, so 2 ranks get 48 columns each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama-i96")
    cfg = tm.llama_config_dict(tm.build_tokenizer(out))
    cfg["intermediate_size"] = 96
    model = tm._new_model(LlamaForCausalLM, LlamaConfig(**cfg), 0)
    tm._save(model, out, torch.bfloat16)
    return out


def _plan(src, *args):
    return runner.invoke(app, ["plan", str(src), "--json", *args])


def test_tp_names_the_row_parallel_weights_that_straddle_ranks(llama_i96):
    r = _plan(llama_i96, "--scheme", "gptq", "--group-size", "32", "--tp", "2")
    assert r.exit_code == 2, r.output
    assert "blk.0.ffn_down.weight (K 96 / 2 ranks = 48 is not a multiple of group size 32)" in r.output
    assert "blk.1.ffn_down.weight" in r.output and "attn_output" not in r.output
    assert "Traceback" not in r.output


def test_tp_passes_an_aligned_checkpoint(tiny_llama, llama_i96):
    r = _plan(tiny_llama, "--scheme", "gptq", "--group-size", "32", "--tp", "2")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["group_size"] == 32
    assert _plan(llama_i96, "--scheme", "gptq", "--group-size", "32", "--tp", "1").exit_code == 0
    assert _plan(llama_i96, "--scheme", "nvfp4", "--tp", "2").exit_code == 0  # 48 % 16 == 0


def test_tp_without_group_size_picks_one_that_aligns_and_says_what_would_break(tiny_llama):
    # attn_output has K = 64: with 2 ranks, 32 columns each, so groups of 64 would straddle ranks
    r = _plan(tiny_llama, "--scheme", "gptq", "--tp", "2")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["group_size"] == 32
    assert any("blk.0.attn_output.weight" in w for w in plan["warnings"])


def test_tp_refuses_when_no_group_size_aligns(tiny_llama):
    r = _plan(tiny_llama, "--scheme", "gptq", "--tp", "4")  # 64 / 4 = 16 columns per rank
    assert r.exit_code == 2
    assert "No group size in 128/64/32 aligns them" in r.output


def test_convert_with_tp_refuses_before_writing(llama_i96, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(llama_i96), str(out), "--scheme", "gptq", "--method", "rtn",
                            "--group-size", "32", "--tp", "2"])
    assert r.exit_code == 2 and not out.exists()
