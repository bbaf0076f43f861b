"""Tiny random Hugging Face checkpoints for tests.

Every builder writes a complete, self-contained checkpoint directory with
transformers' ``save_pretrained`` (``model.safetensors``, ``config.json``,
``generation_config.json``) plus the synthetic tokenizer of
:func:`build_tokenizer`. Nothing is downloaded. The weights depend only on
``seed`` (and the torch version): tensors are filled in sorted state-dict
order from one ``torch.Generator``.

Weight distributions (drawn in float32, then cast to ``dtype``):

* matrices, embeddings, experts: N(0, 0.05^2);
* "scale-like" tensors (norm weights, Gemma-4 ``layer_scalar``,
  ``router.scale``, ``router.per_expert_scale``): uniform [0.5, 1.5), i.e.
  away from their default of 1 so that a reader that ignores them is caught;
* Gemma-3 norm weights: uniform [-0.5, 0.5), because Gemma-3 multiplies by
  ``1 + w`` (default w = 0).

All matrix input dimensions are multiples of 64 (GGUF NVFP4 blocks are 64
wide; NVFP4/MXFP4 checkpoint groups are 16/32).

Tokenizer: a Llama-2-style byte-fallback BPE (oracle.md section 4) that
llama.cpp's converter accepts through ``gguf.LlamaHfVocab`` (llama and gemma4
paths). Gemma-3's converter only takes a SentencePiece ``tokenizer.model``
(otherwise it falls into the GPT-2 path and rejects the unknown pre-tokenizer
hash), so :func:`build_tiny_gemma3` also writes a ``tokenizer.model`` that is
generated (not trained) from the very same vocabulary and merges; real Gemma-3
checkpoints ship a ``tokenizer.model`` too, and the GGUF then carries
``tokenizer.ggml.model = "llama"`` exactly like a real Gemma-3 GGUF. No
converter monkey-patching is needed.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "GEMMA4_DIALECTS",
    "GEMMA4_VARIANTS",
    "PAD_ID",
    "TOKENIZER_VOCAB_SIZE",
    "UNK_ID",
    "build_tiny_gemma3",
    "build_tiny_gemma4",
    "build_tiny_llama",
    "build_tiny_mistral",
    "build_tiny_qwen3",
    "build_tiny_qwen3_moe",
    "build_tokenizer",
    "gemma3_config_dict",
    "gemma4_base_text_config",
    "gemma4_text_config_dict",
    "llama_config_dict",
    "qwen3_config_dict",
    "qwen3_moe_config_dict",
    "save_random_gemma4",
    "tokenizer_vocab",
]

# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_SPACE = "\u2581"  # "▁", SentencePiece's whitespace marker
# 55 single-character pieces.
_CHARS = _SPACE + "abcdefghijklmnopqrstuvwxyz" + "0123456789" + "TIAHSWBCMN" + ".,!?'-:;"
# 10 merges, in rank order; each merged piece is appended to the vocabulary.
_MERGES = (
    (_SPACE, "t"),
    ("h", "e"),
    (_SPACE + "t", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("r", "e"),
    (_SPACE, "a"),
    ("e", "n"),
)
_N_BYTE_TOKENS = 256
_FIRST_BYTE_ID = len(SPECIAL_TOKENS)
_FIRST_NORMAL_ID = _FIRST_BYTE_ID + _N_BYTE_TOKENS


def tokenizer_vocab(size: int | None = None) -> list[str]:
    """Pieces of the synthetic tokenizer, in id order; `size` pads it with pieces no text merges
    into, for models of a real vocabulary size (e.g. 128256)."""
    vocab = [*SPECIAL_TOKENS]
    vocab += [f"<0x{b:02X}>" for b in range(_N_BYTE_TOKENS)]
    vocab += list(_CHARS)
    vocab += [a + b for a, b in _MERGES]
    vocab += [f"{_SPACE}piece{i}" for i in range(max(0, (size or 0) - len(vocab)))]
    assert len(set(vocab)) == len(vocab)
    return vocab


TOKENIZER_VOCAB_SIZE = len(tokenizer_vocab())  # 4 + 256 + 55 + 10 = 325


def _tokenizer_object(size: int | None = None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {piece: i for i, piece in enumerate(tokenizer_vocab(size))}
    bpe = models.BPE(
        vocab=vocab,
        merges=list(_MERGES),
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0",
        pair="<s>:0 $A:0 <s>:1 $B:1",
        special_tokens=[("<s>", BOS_ID)],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _sentencepiece_model_bytes() -> bytes:
    """A SentencePiece BPE ``tokenizer.model`` with the same pieces and merges.

    SentencePiece's BPE picks, among adjacent pairs whose concatenation is a
    piece, the one whose piece has the highest score. Normal piece k (k-th
    after the byte tokens) gets score -k, so merged pieces (appended in rank
    order after the characters) are applied in the same order as the HF BPE
    merges.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    piece_type = sp_pb2.ModelProto.SentencePiece.Type
    for i, text in enumerate(tokenizer_vocab()):
        piece = proto.pieces.add()
        piece.piece = text
        if i == UNK_ID:
            piece.type, piece.score = piece_type.UNKNOWN, 0.0
        elif i < _FIRST_BYTE_ID:
            piece.type, piece.score = piece_type.CONTROL, 0.0
        elif i < _FIRST_NORMAL_ID:
            piece.type, piece.score = piece_type.BYTE, 0.0
        else:
            piece.type, piece.score = piece_type.NORMAL, -float(i - _FIRST_NORMAL_ID)
    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.ModelType.BPE
    ts.vocab_size = TOKENIZER_VOCAB_SIZE
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = UNK_ID, BOS_ID, EOS_ID, PAD_ID
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = SPECIAL_TOKENS
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


def build_tokenizer(out_dir: str | Path, *, sentencepiece_model: bool = False, vocab_size: int | None = None) -> int:
    """Write the synthetic tokenizer (``tokenizer.json``, ``tokenizer_config.json``).

    With ``sentencepiece_model=True`` an equivalent SentencePiece
    ``tokenizer.model`` is written as well (needed by llama.cpp's Gemma-3
    converter). Returns the vocabulary size, which the model's ``vocab_size``
    must equal (llama.cpp rejects a mismatch).
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(vocab_size),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(str(out))
    if sentencepiece_model:
        (out / "tokenizer.model").write_bytes(_sentencepiece_model_bytes())
    n = len(fast)
    assert n == (vocab_size or TOKENIZER_VOCAB_SIZE), n
    return n


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------

_STD = 0.05


def _randomize_(
    model: torch.nn.Module,
    seed: int,
    uniform_range: Callable[[str], tuple[float, float] | None],
    stream_key: Callable[[str], str] | None = None,
) -> None:
    """Overwrite every persistent tensor of ``model`` in place, deterministically.

    ``uniform_range(name)`` returns ``(lo, hi)`` for tensors drawn uniformly
    from [lo, hi), or None for N(0, _STD^2). Tied tensors are filled once.

    By default one generator fills the tensors in sorted name order. With
    ``stream_key``, each tensor gets its own generator seeded from ``seed`` and
    ``stream_key(name)``, so a tensor's values do not depend on which other
    modules (e.g. vision/audio towers) the model holds.
    """
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            if t.data_ptr() in seen or not t.is_floating_point():
                continue
            seen.add(t.data_ptr())
            if stream_key is not None:
                gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(stream_key(name).encode()))
            rng = uniform_range(name)
            if rng is None:
                vals = torch.randn(t.shape, generator=gen, dtype=torch.float32) * _STD
            else:
                lo, hi = rng
                vals = lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float32)
            t.copy_(vals)


def _is_norm(name: str) -> bool:
    return name.endswith(("norm.weight", "layernorm.weight"))


def _save(model, out_dir: Path, dtype: torch.dtype) -> None:
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(str(out_dir))


def _new_model(cls, config, seed: int):
    torch.manual_seed(seed)  # the HF init is overwritten, but keep it reproducible too
    return cls(config).eval()


# --------------------------------------------------------------------------
# Llama
# --------------------------------------------------------------------------


def llama_config_dict(vocab_size: int, tie_word_embeddings: bool = True) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def build_tiny_llama(
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    config_overrides: dict | None = None,
) -> Path:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16; `config_overrides`
    replaces config fields (e.g. head_dim)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    vocab = build_tokenizer(out)
    cfg = LlamaConfig(**(llama_config_dict(vocab, tie_word_embeddings) | (config_overrides or {})))
    model = _new_model(LlamaForCausalLM, cfg, seed)
    _randomize_(model, seed, lambda n: (0.5, 1.5) if _is_norm(n) else None)
    _save(model, out, dtype)
    return out


# --------------------------------------------------------------------------
# Mistral, Qwen3, Qwen3-MoE
# --------------------------------------------------------------------------

MISTRAL_WINDOW = 8  # shorter than every test sequence, so the window changes the logits


def _build(cls_name: str, config_name: str, out_dir, dtype, seed, overrides, sentencepiece=False) -> Path:
    import transformers

    out = Path(out_dir)
    vocab = build_tokenizer(out, sentencepiece_model=sentencepiece)
    cfg = getattr(transformers, config_name)(**overrides(vocab))
    model = _new_model(getattr(transformers, cls_name), cfg, seed)
    _randomize_(model, seed, lambda n: (0.5, 1.5) if _is_norm(n) else None)
    _save(model, out, dtype)
    return out


def build_tiny_mistral(out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """MistralForCausalLM: the tiny Llama's shapes, untied, sliding_window MISTRAL_WINDOW."""
    return _build("MistralForCausalLM", "MistralConfig", out_dir, dtype, seed,
                  lambda v: llama_config_dict(v, False) | {"sliding_window": MISTRAL_WINDOW})


def qwen3_config_dict(vocab_size: int) -> dict:
    return llama_config_dict(vocab_size, False) | {"rms_norm_eps": 1e-6}


def build_tiny_qwen3(out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Qwen3ForCausalLM: the tiny Llama's shapes plus q/k norms. llama.cpp's Qwen converter reads
    a SentencePiece tokenizer.model before it tries GPT-2 BPE, so one is written."""
    return _build("Qwen3ForCausalLM", "Qwen3Config", out_dir, dtype, seed, qwen3_config_dict, sentencepiece=True)


def qwen3_moe_config_dict(vocab_size: int) -> dict:
    return qwen3_config_dict(vocab_size) | dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[],
    )


def build_tiny_qwen3_moe(out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Qwen3MoeForCausalLM: 8 experts of width 64, top-2, renormalized; transformers writes each
    expert as its own gate/up/down Linear."""
    return _build("Qwen3MoeForCausalLM", "Qwen3MoeConfig", out_dir, dtype, seed, qwen3_moe_config_dict,
                  sentencepiece=True)


# --------------------------------------------------------------------------
# Gemma-4
# --------------------------------------------------------------------------

GEMMA4_VARIANTS = ("moe", "ple", "dense_keqv")
GEMMA4_DIALECTS = ("global", "per_layer")  # config dialects, see build_tiny_gemma4

_SLIDING, _FULL = "sliding_attention", "full_attention"
_GEMMA4_ROPE = {
    _SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
    _FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}


def gemma4_base_text_config(vocab_size: int, family: str = "gemma4") -> dict:
    """Text-config kwargs shared by every tiny Gemma-4 (hidden 64, head_dim 16/32, window 8).

    ``family`` "gemma4" (Gemma4TextConfig) adds the PLE and MoE switches, off;
    "gemma4_unified" (Gemma4UnifiedTextConfig) has no such fields.
    """
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters=copy.deepcopy(_GEMMA4_ROPE),
        sliding_window=8,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        attention_bias=False,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        attention_k_eq_v=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if family == "gemma4":
        cfg.update(
            # The default is 256 (PLE on): always set it explicitly.
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=vocab_size,
            enable_moe_block=False,
        )
    elif family != "gemma4_unified":
        raise ValueError(f"unknown Gemma-4 family {family!r}; expected 'gemma4' or 'gemma4_unified'")
    return cfg


def gemma4_text_config_dict(variant: str, vocab_size: int) -> dict:
    """The Gemma4TextConfig kwargs of a tiny variant (in the "global" dialect).

    ``global_head_dim`` / ``num_global_key_value_heads`` are the keys that
    Google's original configs carry; transformers 5.23 pops them into
    ``per_layer_config``.
    """
    if variant not in GEMMA4_VARIANTS:
        raise ValueError(f"unknown Gemma-4 variant {variant!r}; expected one of {GEMMA4_VARIANTS}")
    cfg = gemma4_base_text_config(vocab_size)
    if variant in ("moe", "dense_keqv"):
        cfg.update(
            num_hidden_layers=6,
            layer_types=[_SLIDING] * 5 + [_FULL],
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
        )
        if variant == "moe":
            cfg.update(
                enable_moe_block=True,
                num_experts=4,
                top_k_experts=2,
                moe_intermediate_size=64,
            )
    else:  # "ple"
        # first_shared = 10 - 4 = 6. transformers' donors are the last
        # non-shared layer of each type (4: sliding, 5: full); llama.cpp
        # hard-codes first_shared-2 (swa) / first_shared-1 (full): the same.
        cfg.update(
            num_hidden_layers=10,
            layer_types=[_SLIDING] * 5 + [_FULL] + [_SLIDING] * 3 + [_FULL],
            hidden_size_per_layer_input=64,
            num_kv_shared_layers=4,
            use_double_wide_mlp=True,
        )
    return cfg


# Clip bounds of the towers' clippable Linears: finite, as in a trained checkpoint (transformers
# initializes them to ±inf, i.e. no clipping).
_CLIP_BOUND_RANGES = {
    "input_min": (-4.0, -2.0),
    "output_min": (-4.0, -2.0),
    "input_max": (2.0, 4.0),
    "output_max": (2.0, 4.0),
}


def _gemma4_uniform_range(name: str) -> tuple[float, float] | None:
    if _is_norm(name) or name.endswith(("layer_scalar", "router.scale", "router.per_expert_scale")):
        return (0.5, 1.5)
    return _CLIP_BOUND_RANGES.get(name.rsplit(".", 1)[-1])


def _rewrite_gemma4_dialect(out: Path, text_cfg: dict, conditional: bool, dialect: str) -> None:
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg["text_config"] if conditional else cfg
    if dialect == "global":
        text.pop("per_layer_config", None)
        text["global_head_dim"] = text_cfg["global_head_dim"]
        if "num_global_key_value_heads" in text_cfg:
            text["num_global_key_value_heads"] = text_cfg["num_global_key_value_heads"]
    else:
        # "per_layer" is exactly what transformers 5.23's save_pretrained writes;
        # keep it, but make sure it has the expected shape.
        if "global_head_dim" in text or "num_global_key_value_heads" in text:
            raise AssertionError("transformers wrote global_head_dim; dialect assumption broken")
        plc = text.get("per_layer_config")
        full = [i for i, t in enumerate(text_cfg["layer_types"]) if t == _FULL]
        # transformers zero-pads the keys to one width ("05", "11") once an index has two digits
        if not isinstance(plc, dict) or sorted(int(k) for k in plc) != full:
            raise AssertionError(f"unexpected per_layer_config from transformers: {plc!r}")
        return
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_tiny_gemma4(
    out_dir: str | Path,
    variant: str,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    conditional: bool = True,
    dialect: str = "global",
) -> Path:
    """A tiny random Gemma-4 text decoder.

    variant:
      * ``"moe"``: 26B-A4B-like. 6 layers (5 sliding + 1 full), k_eq_v with 1
        global KV head, MoE (4 experts, top-2, Ie 64) beside the dense MLP.
      * ``"ple"``: E2B-like. 10 layers (5 s, 1 f, 3 s, 1 f), PLE width 64, last
        4 layers KV-shared, double-wide MLP in the shared layers.
      * ``"dense_keqv"``: 31B-like: ``"moe"`` without the MoE block.

    ``conditional=True`` saves ``Gemma4ForConditionalGeneration`` (text config
    nested in ``text_config``, no vision/audio tower: both configs null);
    ``conditional=False`` saves ``Gemma4ForCausalLM`` (``gemma4_text`` at top
    level).

    ``dialect="global"`` writes ``global_head_dim`` (and, for k_eq_v variants,
    ``num_global_key_value_heads``) like Google's configs; ``"per_layer"``
    writes ``per_layer_config`` with string layer keys and neither key, as a
    transformers-5.23 re-save does (gemma4.md section 1.3).
    """
    from transformers import (
        Gemma4Config,
        Gemma4ForCausalLM,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
    )

    out = Path(out_dir)
    vocab = build_tokenizer(out)
    text_cfg = gemma4_text_config_dict(variant, vocab)
    if conditional:
        cfg = Gemma4Config(
            text_config=copy.deepcopy(text_cfg),
            vision_config=None,
            audio_config=None,
            tie_word_embeddings=True,
        )
        model = _new_model(Gemma4ForConditionalGeneration, cfg, seed)
    else:
        cfg = Gemma4TextConfig(**copy.deepcopy(text_cfg))
        model = _new_model(Gemma4ForCausalLM, cfg, seed)
    return save_random_gemma4(out, model, text_cfg, conditional, dialect, dtype, seed)


def save_random_gemma4(
    out: Path,
    model: torch.nn.Module,
    text_cfg: dict,
    conditional: bool,
    dialect: str,
    dtype: torch.dtype,
    seed: int,
    stream_key: Callable[[str], str] | None = None,
) -> Path:
    """Randomize a freshly built Gemma-4 ``model`` (see :func:`_randomize_`), save it into
    ``out`` and write its config in ``dialect`` ("global" or "per_layer", see
    :func:`build_tiny_gemma4`). ``text_cfg`` is the text config it was built from."""
    if dialect not in GEMMA4_DIALECTS:
        raise ValueError(f"dialect must be one of {GEMMA4_DIALECTS}, not {dialect!r}")
    _randomize_(model, seed, _gemma4_uniform_range, stream_key)
    _save(model, out, dtype)
    _rewrite_gemma4_dialect(out, text_cfg, conditional, dialect)
    return out


# --------------------------------------------------------------------------
# Gemma-3
# --------------------------------------------------------------------------


def gemma3_config_dict(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,  # sliding-window pattern 6: layer 5 is full
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        sliding_window=32,
        query_pre_attn_scalar=16,
        layer_types=[_SLIDING] * 5 + [_FULL],
        rope_parameters={
            _SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
            _FULL: {"rope_type": "default", "rope_theta": 1000000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def build_tiny_gemma3(
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Gemma3ForCausalLM: hidden 64, 6 layers (5 sliding + 1 full), 4 heads / 1 KV.

    Norm weights are drawn around 0 (Gemma-3 multiplies by ``1 + w``). Also
    writes the SentencePiece ``tokenizer.model`` the llama.cpp converter needs.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = Path(out_dir)
    vocab = build_tokenizer(out, sentencepiece_model=True)
    cfg = Gemma3TextConfig(**gemma3_config_dict(vocab))
    model = _new_model(Gemma3ForCausalLM, cfg, seed)
    _randomize_(model, seed, lambda n: (-0.5, 0.5) if _is_norm(n) else None)
    _save(model, out, dtype)
    return out
