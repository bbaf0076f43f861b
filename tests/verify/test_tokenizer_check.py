"""`nvq verify` compares the candidate's tokenizer with the GGUF's vocabulary: a changed BOS id, a
flipped add_bos or two swapped token strings exit 1 naming the first differing id; a candidate
without tokenizer files gets a note. Tests are named after the tokenizer bug they pin."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from nvq.cli import app
from nvq.io.gguf_tokenizer import NORMAL, UNUSED
from nvq.io.hf import HFConfig
from nvq.verify import tokenizer_check
from tests.support.tiny_models import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_tokenizer,
    tokenizer_vocab,
)
from tests.verify import faults

runner = CliRunner()


def verify(tmp_path, candidate, oracle, code):
    path = tmp_path / "cert.json"
    result = runner.invoke(app, ["verify", str(candidate), "--oracle", str(oracle), "--json", str(path), "--tokens", "24"])
    assert result.exit_code == code, result.output
    return json.loads(path.read_text()), result.output


def only_failure(cert):
    bad = [d for d in cert["tokenizer"] if not d["ok"]]
    assert len(bad) == 1, cert["tokenizer"]
    return bad[0]


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", ["llama_f32", "gemma4_moe_f32"])
def test_two_token_strings_swapped(model, request, tiny_gguf, tmp_path):
    src = request.getfixturevalue(model)
    cand = faults.token_strings_swapped(src, tmp_path / "c", 300, 301)
    vocab = tokenizer_vocab()
    cert, out = verify(tmp_path, cand, tiny_gguf(src, "f32"), code=1)
    d = only_failure(cert)
    assert (d["field"], d["token_id"], d["candidate"], d["oracle"]) == ("token", 300, vocab[301], vocab[300])
    assert f"token id 300 is {vocab[301]!r} in the candidate but {vocab[300]!r}" in d["hint"]
    assert cert["first_divergence"]["field"] == "token" and "token id 300" in out


@pytest.mark.llamacpp
def test_bos_id_changed_in_tokenizer_config(llama_f32, tiny_gguf, tmp_path):
    cand = faults.tokenizer_edited(llama_f32, tmp_path / "c", tokenizer_config=lambda c: c.update(bos_token="</s>"))
    cert, out = verify(tmp_path, cand, tiny_gguf(llama_f32, "f32"), code=1)
    d = only_failure(cert)
    assert (d["field"], d["candidate"], d["oracle"]) == ("bos_token_id", EOS_ID, BOS_ID)
    assert "bos_token_id is 2 in the candidate" in d["hint"] and "but 1 in the oracle GGUF" in d["hint"]
    assert "bos_token_id" in out


@pytest.mark.llamacpp
def test_bos_prepended_by_the_post_processor_is_another_token(llama_f32, tiny_gguf, tmp_path):
    def edit(tok):  # the template's "<s>" now stands for id 2
        tok["post_processor"]["special_tokens"]["<s>"].update(ids=[EOS_ID], tokens=["</s>"])
    cand = faults.tokenizer_edited(llama_f32, tmp_path / "c", tokenizer=edit)
    cert, _ = verify(tmp_path, cand, tiny_gguf(llama_f32, "f32"), code=1)
    d = only_failure(cert)
    assert (d["field"], d["candidate"], d["oracle"]) == ("bos_token_id", EOS_ID, BOS_ID)
    assert "prepends id 2" in d["hint"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("how", ["tokenizer_config", "post_processor"])
def test_add_bos_flipped(how, llama_f32, tiny_gguf, tmp_path):
    if how == "tokenizer_config":
        cand = faults.tokenizer_edited(llama_f32, tmp_path / "c", tokenizer_config=lambda c: c.update(add_bos_token=False))
    else:
        cand = faults.tokenizer_edited(llama_f32, tmp_path / "c", tokenizer=lambda t: t.update(post_processor=None))
    cert, out = verify(tmp_path, cand, tiny_gguf(llama_f32, "f32"), code=1)
    d = only_failure(cert)
    assert (d["field"], d["candidate"], d["oracle"], d["token_id"]) == ("add_bos_token", False, True, BOS_ID)
    assert "BOS is id 1" in d["hint"] and "add_bos_token" in out


@pytest.mark.llamacpp
def test_candidate_without_tokenizer_files_gets_a_note(llama_f32, tiny_gguf, tmp_path):
    cand = tmp_path / "c"
    shutil.copytree(llama_f32, cand)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (cand / name).unlink()
    cert, _ = verify(tmp_path, cand, tiny_gguf(llama_f32, "f32"), code=0)
    assert [(d["verdict"], d["ok"]) for d in cert["tokenizer"]] == [("note", True)]
    assert any("has no tokenizer.json" in n for n in cert["notes"])


# ---------------------------------------------------------------------------------------------
# Against synthetic GGUF metadata (no llama.cpp needed)
# ---------------------------------------------------------------------------------------------


def metadata(tokens, **extra):
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [NORMAL] * len(tokens),
            "tokenizer.ggml.bos_token_id": BOS_ID, "tokenizer.ggml.eos_token_id": EOS_ID,
            "tokenizer.ggml.padding_token_id": PAD_ID, "tokenizer.ggml.unknown_token_id": UNK_ID,
            "tokenizer.ggml.add_bos_token": True}
    meta.update(extra)
    return meta


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


def test_matching_vocabulary_has_no_findings(tokenizer_dir):
    assert tokenizer_check.compare(tokenizer_dir, None, metadata(tokenizer_vocab())) == []


def test_vocabulary_padded_by_the_converter_is_no_difference(tokenizer_dir):
    tokens = tokenizer_vocab() + ["[PAD325]", "[PAD326]"]
    meta = metadata(tokens)
    meta["tokenizer.ggml.token_type"] = [NORMAL] * 325 + [UNUSED] * 2
    assert tokenizer_check.compare(tokenizer_dir, None, meta) == []


def test_gguf_with_one_more_token_names_that_id(tokenizer_dir):
    found = tokenizer_check.compare(tokenizer_dir, None, metadata(tokenizer_vocab() + ["extra"]))
    assert [(f.field, f.token_id, f.candidate, f.oracle) for f in found] == [("token", 325, None, "extra")]


def test_special_ids_come_from_config_json_without_tokenizer_config(tokenizer_dir, tmp_path):
    cand = tmp_path / "c"
    shutil.copytree(tokenizer_dir, cand)
    (cand / "tokenizer_config.json").unlink()
    hf = HFConfig(cand / "config.json", {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, 7], "pad_token_id": 9})
    found = tokenizer_check.compare(cand, hf, metadata(tokenizer_vocab()))
    # eos: the GGUF's id is one of the candidate's; pad differs; unk: only the GGUF defines it
    assert [(f.field, f.verdict) for f in found] == [("pad_token_id", "fail"), ("unk_token_id", "note")]


def test_add_bos_absent_from_the_gguf_is_a_note_naming_llamacpp_default(tokenizer_dir):
    meta = metadata(tokenizer_vocab())
    del meta["tokenizer.ggml.add_bos_token"]
    meta["tokenizer.ggml.model"] = "gpt2"  # llama.cpp adds no BOS for a gpt2 vocabulary by default
    found = tokenizer_check.compare(tokenizer_dir, None, meta)
    assert [(f.field, f.verdict, f.candidate, f.oracle) for f in found] == [("add_bos_token", "note", True, False)]
