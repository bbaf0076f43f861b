"""Bad input gives exit 2, one sentence on stderr, no traceback, and no certificate file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nvq.cli import app
from nvq.errors import RecipeError
from nvq.verify.candidate import load_candidate
from nvq.verify.oracle import default_prompts, token_ids
from nvq.verify.run import load_thresholds

runner = CliRunner()


def refused(tmp_path, *args, match):
    out = tmp_path / "cert.json"
    result = runner.invoke(app, ["verify", *map(str, args), "--json", str(out)])
    assert result.exit_code == 2, result.output
    text = result.output
    assert match in text and "Traceback" not in text
    assert not out.exists() and not list(tmp_path.glob(".cert.json*"))
    return text


def test_missing_oracle(tiny_llama, tmp_path):
    refused(tmp_path, tiny_llama, "--oracle", tmp_path / "nope.gguf", match="does not exist")


def test_oracle_option_is_required(tiny_llama, tmp_path):
    refused(tmp_path, tiny_llama, match="--oracle")


def test_oracle_that_is_not_a_gguf(tiny_llama, tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    refused(tmp_path, tiny_llama, "--oracle", bad, match="not a GGUF file")


def test_prompt_and_tokens_exclude_each_other(tiny_llama, tmp_path):
    refused(tmp_path, tiny_llama, "--oracle", tmp_path / "o.gguf", "--prompt", "hi", "--tokens", "8", match="exclude")


def test_certificate_directory_must_exist(tiny_llama, tmp_path):
    result = runner.invoke(app, ["verify", str(tiny_llama), "--oracle", "x.gguf", "--junit", str(tmp_path / "no" / "c.xml")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.llamacpp
def test_oracle_of_another_architecture(tiny_llama, tiny_gemma4_dense, tiny_gguf, tmp_path):
    text = refused(tmp_path, tiny_llama, "--oracle", tiny_gguf(tiny_gemma4_dense, "f32"), match="gemma4 model")
    assert "llama" in text


@pytest.mark.llamacpp
def test_vocab_mismatch(tiny_llama, tiny_gguf, tmp_path):
    cand = tmp_path / "c"
    shutil.copytree(tiny_llama, cand)
    t = load_file(cand / "model.safetensors")
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:300].contiguous()
    save_file(t, cand / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((cand / "config.json").read_text())
    cfg["vocab_size"] = 300
    (cand / "config.json").write_text(json.dumps(cfg))
    refused(tmp_path, cand, "--oracle", tiny_gguf(tiny_llama, "f32"), match="vocabularies")


@pytest.mark.llamacpp
def test_oracle_with_other_depth(tiny_llama, tiny_gguf, tmp_path):
    cand = tmp_path / "c"
    shutil.copytree(tiny_llama, cand)
    t = load_file(cand / "model.safetensors")
    save_file({k: v for k, v in t.items() if ".layers.1." not in k}, cand / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((cand / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (cand / "config.json").write_text(json.dumps(cfg))
    refused(tmp_path, cand, "--oracle", tiny_gguf(tiny_llama, "f32"), match="num_hidden_layers 2")


def test_token_ids(tiny_llama, tmp_path):
    cand = load_candidate(tiny_llama)
    default = token_ids(cand)
    assert len(default.sequences) == len(default_prompts()) == 4 and default.count == 128
    assert all(int(s[0]) == 1 for s in default.sequences)  # the tokenizer's BOS
    a, b = token_ids(cand, n_tokens=50), token_ids(cand, n_tokens=50)
    assert torch.equal(a.sequences[0], b.sequences[0]) and a.count == 50 and a.source == "--tokens 50"
    f = tmp_path / "p.txt"
    f.write_text("the theme")
    assert token_ids(cand, prompt_file=f).sequences[0].tolist() == token_ids(cand, prompt="the theme").sequences[0].tolist()
    shutil.copytree(tiny_llama, tmp_path / "notok")
    (tmp_path / "notok" / "tokenizer.json").unlink()
    with pytest.raises(Exception, match="--tokens N"):
        token_ids(load_candidate(tmp_path / "notok"))


def test_thresholds_from_recipe_and_flag(tmp_path):
    assert load_thresholds().weight_factor == 1.25
    r = tmp_path / "r.yaml"
    r.write_text("verify: {tap_factor: 4, kld_floor: 0.001}\n")
    assert load_thresholds(r).tap_factor == 4.0
    th = load_thresholds(r, factor=3)
    assert (th.weight_factor, th.tap_factor, th.kld_factor, th.kld_floor, th.tap_floor) == (3.0, 3.0, 3.0, 0.001, 1e-4)
    r.write_text("verify: {weight_factor: 0.5}\n")
    with pytest.raises(RecipeError, match="every factor ≥ 1"):
        load_thresholds(r)
    r.write_text("verify: {fudge: 1}\n")
    with pytest.raises(RecipeError, match="fudge"):
        load_thresholds(r)
    with pytest.raises(RecipeError, match="neither a file nor a preset"):
        load_thresholds(tmp_path / "missing.yaml")
    assert load_thresholds("default").kld_factor == 2.0
