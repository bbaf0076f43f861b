"""Pins the test fixtures of tests/support against transformers and llama.cpp.

* Every tiny-checkpoint builder reloads in transformers 5.23 with no missing /
  unexpected keys and runs a forward.
* llama.cpp's real converter (from the llama-cpp-python 0.3.36 sdist) accepts
  every fixture, and every GGUF tensor equals the HF tensor on disk: Llama
  after undoing the Q/K row permutation, Gemma-3 after its +1 norm shift,
  Gemma-4 bit-identical, plus the generated ``rope_freqs``.

The ``llamacpp`` tests FAIL (they do not skip) when the sdist cannot be
obtained: fetching it is part of what they check.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support import llamacpp
from tests.support.tiny_models import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TOKENIZER_VOCAB_SIZE,
    build_tiny_gemma3,
    build_tiny_gemma4,
    build_tiny_llama,
    build_tokenizer,
    tokenizer_vocab,
)

# key -> (builder, kwargs)
_BUILDS = {
    "llama": (build_tiny_llama, {}),
    "llama_untied": (build_tiny_llama, {"tie_word_embeddings": False}),
    "llama_f32": (build_tiny_llama, {"dtype": torch.float32}),
    "g4_moe": (build_tiny_gemma4, {"variant": "moe"}),
    "g4_moe_f32": (build_tiny_gemma4, {"variant": "moe", "dtype": torch.float32}),
    "g4_moe_pl": (build_tiny_gemma4, {"variant": "moe", "dialect": "per_layer"}),
    "g4_moe_causal": (build_tiny_gemma4, {"variant": "moe", "conditional": False}),
    "g4_moe_causal_pl": (
        build_tiny_gemma4,
        {"variant": "moe", "conditional": False, "dialect": "per_layer"},
    ),
    "g4_ple": (build_tiny_gemma4, {"variant": "ple"}),
    "g4_ple_pl": (build_tiny_gemma4, {"variant": "ple", "dialect": "per_layer"}),
    "g4_dense_keqv": (build_tiny_gemma4, {"variant": "dense_keqv"}),
    "g3": (build_tiny_gemma3, {}),
}
_CONVERT = [
    "llama",
    "g4_moe",
    "g4_moe_pl",
    "g4_moe_causal",
    "g4_moe_causal_pl",
    "g4_ple",
    "g4_dense_keqv",
    "g3",
]
_PROMPT = "the cat sat on the mat. Hello, World! 123 ✓"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: fn(root / k, **kw) for k, (fn, kw) in _BUILDS.items()}


def _hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _text_config(d: Path) -> dict:
    cfg = json.loads((d / "config.json").read_text())
    return cfg.get("text_config", cfg)


# --------------------------------------------------------------------------
# transformers side
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(_BUILDS))
def test_builder_reloads_and_runs(tiny, key):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny[key]
    model, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    want_dtype = _BUILDS[key][1].get("dtype", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {want_dtype}
    assert all(t.dtype == want_dtype for t in _hf_tensors(d).values())

    tok = AutoTokenizer.from_pretrained(str(d))
    assert len(tok) == TOKENIZER_VOCAB_SIZE == model.config.get_text_config().vocab_size
    ids = tok(_PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0].item() == BOS_ID
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], TOKENIZER_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert logits.float().std() > 0.01


def test_tokenizer_files(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    assert build_tokenizer(tmp_path / "a") == TOKENIZER_VOCAB_SIZE == 325
    assert not (tmp_path / "a" / "tokenizer.model").exists()
    assert build_tokenizer(tmp_path / "b", sentencepiece_model=True) == 325
    tj = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] is True
    assert tj["decoder"]["type"] == "Sequence"
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "b"))
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens(list(range(325))) == tokenizer_vocab()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "b" / "tokenizer.model"))
    assert sp.get_piece_size() == 325
    assert [sp.id_to_piece(i) for i in range(325)] == tokenizer_vocab()
    # The SentencePiece model tokenizes exactly like tokenizer.json (byte fallback included).
    for text in [_PROMPT, "then there in the end", "  two  spaces\n\ttab é", "x", ""]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert sp.encode(text) == ids, text
        assert tok.decode(ids) == text


def test_builders_are_deterministic(tmp_path, tiny):
    a = _hf_tensors(build_tiny_gemma4(tmp_path / "a", "moe", seed=0))
    b = _hf_tensors(tiny["g4_moe"])
    c = _hf_tensors(build_tiny_gemma4(tmp_path / "c", "moe", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_weight_distributions(tiny):
    for key in ("g4_moe", "g4_ple"):
        for name, t in _hf_tensors(tiny[key]).items():
            t = t.float()
            scale_like = name.endswith(
                ("norm.weight", "layer_scalar", "router.scale", "router.per_expert_scale")
            )
            if scale_like:
                # drawn from [0.5, 1.5) in f32; bf16 rounding may reach 1.5
                assert 0.5 <= t.min() and t.max() <= 1.5, name
                assert t.numel() == 1 or t.std() > 0.05, name
            else:
                assert abs(t.std().item() - 0.05) < 0.01, name
    for name, t in _hf_tensors(tiny["g3"]).items():
        if name.endswith("norm.weight"):  # Gemma-3 uses 1 + w
            assert -0.5 <= t.min() and t.max() <= 0.5 and t.float().std() > 0.1, name
    for name, t in _hf_tensors(tiny["llama"]).items():
        if name.endswith("norm.weight"):
            assert 0.5 <= t.min() and t.max() <= 1.5, name


def test_matrix_input_dims_are_multiples_of_64(tiny):
    for key in ("llama", "g4_moe", "g4_ple", "g4_dense_keqv", "g3"):
        for name, t in _hf_tensors(tiny[key]).items():
            if t.dim() >= 2:
                assert t.shape[-1] % 64 == 0, (key, name, tuple(t.shape))


def test_gemma4_variant_shapes(tiny):
    moe = {
        k.removeprefix("model.language_model."): v for k, v in _hf_tensors(tiny["g4_moe"]).items()
    }
    assert moe["layers.0.experts.gate_up_proj"].shape == (4, 128, 64)
    assert moe["layers.0.experts.down_proj"].shape == (4, 64, 64)
    assert moe["layers.0.router.proj.weight"].shape == (4, 64)
    assert moe["layers.0.router.per_expert_scale"].shape == (4,)
    assert moe["layers.5.self_attn.k_proj.weight"].shape == (32, 64)  # 1 global kv head x 32
    assert "layers.5.self_attn.v_proj.weight" not in moe  # k_eq_v
    assert moe["layers.4.self_attn.v_proj.weight"].shape == (32, 64)  # 2 kv heads x 16
    assert moe["layers.3.layer_scalar"].shape == (1,)
    assert not any("per_layer" in k for k in moe)
    assert "lm_head.weight" not in moe  # tied

    dense = _hf_tensors(tiny["g4_dense_keqv"])
    assert not any(".experts." in k or ".router." in k for k in dense)
    assert "model.language_model.layers.5.self_attn.v_proj.weight" not in dense

    ple = {
        k.removeprefix("model.language_model."): v for k, v in _hf_tensors(tiny["g4_ple"]).items()
    }
    assert ple["embed_tokens_per_layer.weight"].shape == (TOKENIZER_VOCAB_SIZE, 10 * 64)
    assert ple["per_layer_model_projection.weight"].shape == (10 * 64, 64)
    assert ple["layers.0.per_layer_input_gate.weight"].shape == (64, 64)
    assert ple["layers.5.mlp.down_proj.weight"].shape == (64, 128)
    assert ple["layers.6.mlp.down_proj.weight"].shape == (64, 256)  # double-wide in shared layers
    assert "layers.5.self_attn.v_proj.weight" in ple  # no k_eq_v
    assert ple["layers.5.self_attn.k_proj.weight"].shape == (2 * 32, 64)
    for i in range(6, 10):  # KV-shared layers have no K/V of their own
        assert f"layers.{i}.self_attn.k_proj.weight" not in ple
        assert f"layers.{i}.self_attn.v_proj.weight" not in ple


def test_llama_tying(tiny):
    assert "lm_head.weight" not in _hf_tensors(tiny["llama"])
    untied = _hf_tensors(tiny["llama_untied"])
    assert untied["lm_head.weight"].shape == (TOKENIZER_VOCAB_SIZE, 64)
    assert not torch.equal(untied["lm_head.weight"], untied["model.embed_tokens.weight"])
    assert (
        json.loads((tiny["llama_untied"] / "config.json").read_text())["tie_word_embeddings"]
        is False
    )


def test_gemma4_ple_kv_sharing_layout(tiny):
    """transformers' donors equal llama.cpp's hard-coded first_shared-2 / -1."""
    from transformers import AutoConfig

    tc = AutoConfig.from_pretrained(str(tiny["g4_ple"])).get_text_config()
    first_shared = tc.num_hidden_layers - tc.num_kv_shared_layers
    modes = tc.kv_sharing_modes
    stores = {tc.layer_types[i]: i for i, m in enumerate(modes) if m == "store"}
    assert stores == {"sliding_attention": first_shared - 2, "full_attention": first_shared - 1}
    assert modes[first_shared:] == ["reuse"] * tc.num_kv_shared_layers
    assert tc.layer_types[-1] == "full_attention"
    assert tc.hidden_size_per_layer_input == 64 and tc.vocab_size_per_layer_input == 325


@pytest.mark.parametrize(
    "key, conditional",
    [("g4_moe", True), ("g4_moe_causal", False), ("g4_ple", True)],
)
def test_gemma4_config_dialects(tiny, key, conditional):
    """Both on-disk dialects hold the same facts, and transformers builds the same model."""
    from transformers import AutoModelForCausalLM

    g, p = tiny[key], tiny[key + "_pl"]
    top_g = json.loads((g / "config.json").read_text())
    assert ("text_config" in top_g) == conditional
    assert top_g["architectures"] == (
        ["Gemma4ForConditionalGeneration"] if conditional else ["Gemma4ForCausalLM"]
    )
    if conditional:
        assert top_g["model_type"] == "gemma4"
        assert top_g["vision_config"] is None and top_g["audio_config"] is None
    tg, tp = _text_config(g), _text_config(p)
    assert tg["model_type"] == tp["model_type"] == "gemma4_text"
    keqv = tg["attention_k_eq_v"]
    full = [str(i) for i, t in enumerate(tg["layer_types"]) if t == "full_attention"]
    # "global": Google's keys, no per_layer_config
    assert "per_layer_config" not in tg
    assert tg["global_head_dim"] == 32
    assert tg.get("num_global_key_value_heads") == (1 if keqv else None)
    # "per_layer": string layer keys, no global keys
    assert "global_head_dim" not in tp and "num_global_key_value_heads" not in tp
    override = {"head_dim": 32, **({"num_key_value_heads": 1} if keqv else {})}
    assert tp["per_layer_config"] == {i: override for i in full}
    assert {
        k: v for k, v in tg.items() if k not in ("global_head_dim", "num_global_key_value_heads")
    } == {k: v for k, v in tp.items() if k != "per_layer_config"}

    mg = AutoModelForCausalLM.from_pretrained(str(g))
    mp = AutoModelForCausalLM.from_pretrained(str(p))
    sg, sp = mg.state_dict(), mp.state_dict()
    assert {k: v.shape for k, v in sg.items()} == {k: v.shape for k, v in sp.items()}
    assert all(torch.equal(sg[k], sp[k]) for k in sg)
    ids = torch.tensor([[BOS_ID, 17, 300, 5, 270, 320, 299, 42, 261, 12, 280, 318]])
    with torch.no_grad():
        assert torch.equal(mg(ids).logits, mp(ids).logits)
    assert mg.config.get_text_config().final_logit_softcapping == 30.0


# --------------------------------------------------------------------------
# llama.cpp side
# --------------------------------------------------------------------------

_G4_TOP = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}
_G4_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
}
_LLAMA_TOP = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str, top: dict[str, str], layer: dict[str, str]) -> str:
    for prefix in ("model.language_model.", "model."):
        if hf_name.startswith(prefix):
            hf_name = hf_name[len(prefix) :]
            break
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".", 2)
    assert parts[0] == "layers" and parts[2] in layer, hf_name
    return f"blk.{parts[1]}.{layer[parts[2]]}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute (GGUF rows -> HF rotate-half rows)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.fixture(scope="module")
def converted(tiny):
    """Start every conversion at once (in threads, each a child process); tests
    collect their own result, so a converter failure fails only that test."""
    workers = max(1, min(4, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers)
    prep: Future = pool.submit(llamacpp.converter_dir)  # sdist + extraction, once

    def job(key: str) -> llamacpp.GGUFContents:
        prep.result()
        out = llamacpp.convert_to_gguf(tiny[key], tiny[key].parent / f"{key}-f32.gguf", "f32")
        return llamacpp.read_gguf(out)

    futures = {k: pool.submit(job, k) for k in _CONVERT}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _check_all_tensors(
    g: llamacpp.GGUFContents, hf: dict[str, torch.Tensor], top, layer, transform
):
    expected = {}
    for name, t in hf.items():
        expected[_gguf_name(name, top, layer)] = transform(name, t.float().numpy())
    extra = set(g.tensors) - set(expected)
    assert set(expected) <= set(g.tensors), sorted(set(expected) - set(g.tensors))
    for name, want in expected.items():
        got = g.tensors[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert np.array_equal(got, want), (name, float(np.abs(got - want).max()))
    assert all(t == "F32" for t in g.types.values()), g.types
    return extra


@pytest.mark.llamacpp
def test_llamacpp_converter_files():
    d = llamacpp.converter_dir()
    assert (d / "convert_hf_to_gguf.py").is_file()
    assert (d / "conversion" / "gemma.py").is_file()
    assert (d / "gguf-py" / "gguf" / "gguf_reader.py").is_file()
    assert llamacpp.sdist_path().name == "llama_cpp_python-0.3.36.tar.gz"


@pytest.mark.llamacpp
def test_llamacpp_llama(tiny, converted):
    g = converted["llama"].result()
    md = g.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 2 and md["llama.embedding_length"] == 64
    assert md["llama.attention.head_count"] == 4 and md["llama.attention.head_count_kv"] == 2
    assert md["llama.vocab_size"] == TOKENIZER_VOCAB_SIZE
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.tokens"] == tokenizer_vocab()
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (
        BOS_ID,
        EOS_ID,
    )
    assert md["tokenizer.ggml.padding_token_id"] == PAD_ID

    # Q/K rows are permuted (HF rotate-half -> ggml interleaved pairs): compare
    # after undoing it, and check that they really are permuted.
    hf = _hf_tensors(tiny["llama"])
    n_heads = {"attn_q.weight": 4, "attn_k.weight": 2}
    unpermuted = {}
    for k, v in g.tensors.items():
        n = n_heads.get(k.split(".", 2)[-1]) if k.startswith("blk.") else None
        unpermuted[k] = _unpermute(v, n) if n else v
    extra = _check_all_tensors(
        g._replace(tensors=unpermuted), hf, _LLAMA_TOP, _LLAMA_LAYER, lambda n, w: w
    )
    assert extra == set()  # tied: no output.weight
    q = hf["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    assert not np.array_equal(g.tensors["blk.0.attn_q.weight"], q)


@pytest.mark.llamacpp
@pytest.mark.parametrize("key", ["g4_moe", "g4_moe_pl", "g4_moe_causal", "g4_moe_causal_pl"])
def test_llamacpp_gemma4_moe(tiny, converted, key):
    g = converted[key].result()
    md = g.metadata
    assert md["general.architecture"] == "gemma4"
    assert md["gemma4.block_count"] == 6
    assert md["gemma4.attention.head_count_kv"] == [2, 2, 2, 2, 2, 1]
    assert md["gemma4.attention.key_length"] == 32 and md["gemma4.attention.key_length_swa"] == 16
    assert md["gemma4.rope.dimension_count"] == 32 and md["gemma4.rope.dimension_count_swa"] == 16
    assert md["gemma4.attention.sliding_window"] == 8
    assert md["gemma4.attention.sliding_window_pattern"] == [True] * 5 + [False]
    assert md["gemma4.expert_count"] == 4 and md["gemma4.expert_used_count"] == 2
    assert md["gemma4.expert_feed_forward_length"] == 64
    assert md["gemma4.feed_forward_length"] == 128
    assert md["gemma4.embedding_length_per_layer_input"] == 0
    assert md["gemma4.attention.shared_kv_layers"] == 0
    assert md["gemma4.final_logit_softcapping"] == 30.0
    assert md["gemma4.rope.freq_base"] == 1e6 and md["gemma4.rope.freq_base_swa"] == 1e4
    assert md["tokenizer.ggml.model"] == "gemma4"
    assert md["tokenizer.ggml.tokens"] == tokenizer_vocab()

    extra = _check_all_tensors(g, _hf_tensors(tiny[key]), _G4_TOP, _G4_LAYER, lambda n, w: w)
    assert extra == {"rope_freqs.weight"}
    # proportional RoPE, global_head_dim 32, partial_rotary_factor 0.25: 4 of 16 pairs rotate
    rope_freqs = np.array([1.0] * 4 + [1e30] * 12, dtype=np.float32)
    assert np.array_equal(g.tensors["rope_freqs.weight"], rope_freqs)
    assert len(g.tensors) == 134
    assert "blk.5.attn_v.weight" not in g.tensors and "blk.4.attn_v.weight" in g.tensors


@pytest.mark.llamacpp
def test_llamacpp_gemma4_dialects_give_the_same_gguf(converted):
    ref = converted["g4_moe"].result()
    for key in ("g4_moe_pl", "g4_moe_causal", "g4_moe_causal_pl"):
        g = converted[key].result()
        skip = {"general.name"}
        assert {k: v for k, v in g.metadata.items() if k not in skip} == {
            k: v for k, v in ref.metadata.items() if k not in skip
        }, key
        assert g.tensors.keys() == ref.tensors.keys()
        assert all(np.array_equal(g.tensors[k], ref.tensors[k]) for k in ref.tensors), key


@pytest.mark.llamacpp
def test_llamacpp_gemma4_ple(tiny, converted):
    g = converted["g4_ple"].result()
    md = g.metadata
    assert md["gemma4.block_count"] == 10
    assert md["gemma4.attention.shared_kv_layers"] == 4
    assert md["gemma4.embedding_length_per_layer_input"] == 64
    assert md["gemma4.feed_forward_length"] == [128] * 6 + [256] * 4
    assert md["gemma4.attention.head_count_kv"] == 2  # no num_global_key_value_heads
    assert md["gemma4.attention.sliding_window_pattern"] == [True] * 5 + [False] + [True] * 3 + [
        False
    ]
    assert "gemma4.expert_count" not in md

    extra = _check_all_tensors(g, _hf_tensors(tiny["g4_ple"]), _G4_TOP, _G4_LAYER, lambda n, w: w)
    assert extra == {"rope_freqs.weight"}
    assert g.tensors["per_layer_token_embd.weight"].shape == (TOKENIZER_VOCAB_SIZE, 640)
    assert not any(f"blk.{i}.attn_k.weight" in g.tensors for i in range(6, 10))


@pytest.mark.llamacpp
def test_llamacpp_gemma4_dense_keqv(tiny, converted):
    g = converted["g4_dense_keqv"].result()
    assert g.metadata["gemma4.attention.head_count_kv"] == [2, 2, 2, 2, 2, 1]
    assert "gemma4.expert_count" not in g.metadata
    extra = _check_all_tensors(
        g, _hf_tensors(tiny["g4_dense_keqv"]), _G4_TOP, _G4_LAYER, lambda n, w: w
    )
    assert extra == {"rope_freqs.weight"}
    assert not any("exps" in k or "gate_inp" in k for k in g.tensors)


@pytest.mark.llamacpp
def test_llamacpp_gemma3(tiny, converted):
    g = converted["g3"].result()
    md = g.metadata
    assert md["general.architecture"] == "gemma3"
    assert md["gemma3.block_count"] == 6
    assert md["gemma3.attention.head_count_kv"] == 1
    assert md["gemma3.attention.key_length"] == 16
    assert md["gemma3.attention.sliding_window"] == 32
    assert md["gemma3.rope.freq_base"] == 1e6 and md["gemma3.rope.freq_base_swa"] == 1e4
    assert "gemma3.final_logit_softcapping" not in md
    # tokenizer.model path (SentencePiece), like a real Gemma-3 GGUF
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.tokens"] == tokenizer_vocab()

    def plus_one(name, w):
        # Gemma3RMSNorm multiplies by (1 + w); the converter stores 1 + w in f32.
        return w + np.float32(1.0) if name.endswith("norm.weight") else w

    extra = _check_all_tensors(g, _hf_tensors(tiny["g3"]), _G4_TOP, _G4_LAYER, plus_one)
    assert extra == set()
    # ...so undoing it recovers the HF values (to f32 rounding of 1 + w).
    hf = _hf_tensors(tiny["g3"])["model.layers.0.input_layernorm.weight"].float().numpy()
    np.testing.assert_allclose(g.tensors["blk.0.attn_norm.weight"] - 1.0, hf, rtol=0, atol=1e-7)
