"""Rebuild Hugging Face tokenizer files from a GGUF's `tokenizer.ggml.*` metadata.

The GGUF keeps the vocabulary (tokens, token types, SentencePiece scores or BPE merges), the
special token ids, llama.cpp's pre-tokenizer name and the chat template. What each
`tokenizer.ggml.model` becomes (as llama.cpp's `llama-vocab.cpp` tokenizes it):

| GGUF model | tokenizer.json | exactness |
|---|---|---|
| `gpt2` (byte-level BPE: SmolLM2, Llama-3, Qwen2) | BPE with the file's merges, byte-level pre-tokenizer and decoder; the regex chosen from `tokenizer.ggml.pre` (table below) | exact for the pre-tokenizers in `PRE_TOKENIZERS`; any other name falls back to GPT-2's regex with a warning |
| `llama` (SentencePiece, Llama-2 / Gemma-3) | BPE with byte fallback whose merges come from the piece scores (what transformers' own SentencePiece converter does) | approximate: equal-score ties follow piece order, and "▁" is prepended to every text segment (llama.cpp: to the first only) |
| `gemma4` | BPE with the file's merges on raw UTF-8, spaces as "▁", text split at newlines (llama.cpp's gemma4 pre-tokenizer) | approximate: llama.cpp's whole-newline-run lookup is not reproduced |

Other models (`bert`, `t5`, `rwkv`, ...) get no tokenizer files and a warning. Token types
CONTROL (3) and UNKNOWN (2) become special added tokens, USER_DEFINED (4) plain added tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvq.io.gguf import GGUFFile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's whitespace marker

# The regexes llama.cpp quotes as the original tokenizer.json patterns (llama-vocab.cpp).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTok:
    """A byte-level pre-tokenizer: optional digit split, optional explicit regex, then ByteLevel
    (with GPT-2's built-in regex when no explicit one is given)."""

    digits: bool = False
    regex: str | None = None
    ignore_merges: bool = False


_GPT2 = PreTok()
_STARCODER = PreTok(digits=True)  # "\p{N}" split, then GPT-2's regex
_LLAMA3 = PreTok(regex=_LLAMA3_REGEX, ignore_merges=True)
_QWEN2 = PreTok(regex=_QWEN2_REGEX)

# tokenizer.ggml.pre → pre-tokenizer (llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_* groups).
PRE_TOKENIZERS: dict[str, PreTok] = {
    **dict.fromkeys(("gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais", "exaone4",
                     "trillion", "granite-docling"), _GPT2),  # fmt: skip
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), _STARCODER),  # fmt: skip
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                     "smaug-bpe"), _LLAMA3),  # fmt: skip
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2),
}


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    meta: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def special_id(self, what: str) -> int | None:
        v = self.meta.get(f"tokenizer.ggml.{what}_token_id")
        return v if isinstance(v, int) and 0 <= v < len(self.tokens) else None

    def special(self, what: str) -> str | None:
        i = self.special_id(what)
        return None if i is None else self.tokens[i]


def write_tokenizer_files(gf: GGUFFile, out_dir: Path, model_max_length: int | None = None) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`; return warnings."""
    meta = gf.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return [f"{gf.path.name} holds no tokenizer (no tokenizer.ggml.model); none was written."]
    builder = BUILDERS.get(kind)
    if builder is None:
        return [
            f"{gf.path.name} has a '{kind}' tokenizer; nvq rebuilds {', '.join(sorted(BUILDERS))} "
            f"tokenizers only, so none was written."
        ]
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return ["the 'tokenizers' package is not installed, so no tokenizer files were written."]
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        return [f"{gf.path.name}: token_type has {len(types)} entries for {len(tokens)} tokens; no tokenizer was written."]
    vocab = Vocab(tokens, types, meta.get("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.merges"), meta)
    tok, add_bos_default = builder(vocab)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    _add_special_tokens(tok, vocab)
    _post_processor(tok, vocab, add_bos, add_eos)
    tok.save(str(out_dir / "tokenizer.json"))

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for what, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):  # fmt: skip
        if vocab.special(what) is not None:
            config[key] = vocab.special(what)
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = add_eos
    config["clean_up_tokenization_spaces"] = False
    if model_max_length:
        config["model_max_length"] = model_max_length
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return vocab.warnings


def _vocab_dict(vocab: Vocab) -> dict[str, int]:
    out: dict[str, int] = {}
    dup = 0
    for i, t in enumerate(vocab.tokens):
        if t in out:
            dup += 1
            continue
        out[t] = i
    if dup:
        vocab.warnings.append(
            f"{dup} token string(s) appear twice in the vocabulary; the reconstructed tokenizer "
            f"maps each to its first id."
        )
    return out


def _split_merges(vocab: Vocab) -> list[tuple[str, str]]:
    # llama.cpp splits each merge at its first space after the first character.
    out = []
    for m in vocab.merges or []:
        pos = m.find(" ", 1)
        if pos < 0:
            vocab.warnings.append(f"merge {m!r} has no separating space and was skipped.")
            continue
        out.append((m[:pos], m[pos + 1 :]))
    return out


def _byte_level_bpe(vocab: Vocab):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre_name = vocab.meta.get("tokenizer.ggml.pre", "default")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        vocab.warnings.append(
            f"pre-tokenizer '{pre_name}' is not in nvq's table; GPT-2's regex was used, so the "
            f"rebuilt tokenizer may split text differently from llama.cpp."
        )
        pre = _GPT2
    if not vocab.merges:
        vocab.warnings.append("the gpt2 vocabulary has no merges; the rebuilt tokenizer only looks tokens up.")
    model = models.BPE(
        vocab=_vocab_dict(vocab), merges=_split_merges(vocab), fuse_unk=False, byte_fallback=False,
        ignore_merges=pre.ignore_merges,
    )  # fmt: skip
    tok = Tokenizer(model)
    steps = []
    if pre.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre.regex:
        steps.append(pre_tokenizers.Split(Regex(pre.regex), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre.regex is None))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok, False


def _spm_merges(vocab: Vocab, ids: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE from piece scores, as transformers' SentencePieceExtractor
    builds them: every split of a piece into two pieces, ordered by the piece's score (highest
    first), ties in piece order."""
    scores = vocab.scores or [0.0] * len(vocab.tokens)
    ranked = []
    for piece, pid in ids.items():
        if vocab.types[pid] not in (NORMAL, USER_DEFINED) or len(piece) < 2:
            continue
        local = [
            (piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids
        ]
        local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        ranked.extend((-scores[pid], pid, lr) for lr in local)
    ranked.sort(key=lambda x: (x[0], x[1]))
    return [lr for _, _, lr in ranked]


def _sentencepiece_bpe(vocab: Vocab):
    from tokenizers import Tokenizer, decoders, models, normalizers

    ids = _vocab_dict(vocab)
    prefix = bool(vocab.meta.get("tokenizer.ggml.add_space_prefix", True))
    unk = vocab.special("unknown")
    model = models.BPE(vocab=ids, merges=_spm_merges(vocab, ids), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    steps = [normalizers.Replace(" ", SPACE)]
    if prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok, True


def _gemma4_bpe(vocab: Vocab):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = models.BPE(vocab=_vocab_dict(vocab), merges=_split_merges(vocab), fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok, True


BUILDERS: dict[str, Callable[[Vocab], tuple[Any, bool]]] = {
    "gpt2": _byte_level_bpe,
    "llama": _sentencepiece_bpe,
    "gemma4": _gemma4_bpe,
}


def _add_special_tokens(tok, vocab: Vocab) -> None:
    from tokenizers import AddedToken

    added = []
    for t, kind in zip(vocab.tokens, vocab.types, strict=True):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            added.append(AddedToken(t, special=kind != USER_DEFINED, normalized=False))
    # add_tokens keeps ids of strings already in the vocabulary.
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])


def _post_processor(tok, vocab: Vocab, add_bos: bool, add_eos: bool) -> None:
    from tokenizers import processors

    specials = []
    if add_bos and vocab.special("bos") is not None:
        specials.append(("bos", vocab.special("bos"), vocab.special_id("bos")))
    if add_eos and vocab.special("eos") is not None:
        specials.append(("eos", vocab.special("eos"), vocab.special_id("eos")))

    def seq(piece: str, type_id: int) -> list[str]:
        out = [f"{t}:{type_id}" for w, t, _ in specials if w == "bos"] + [f"{piece}:{type_id}"]
        return out + [f"{t}:{type_id}" for w, t, _ in specials if w == "eos"]

    steps = []
    if vocab.meta.get("tokenizer.ggml.model") == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))
    if specials:
        steps.append(processors.TemplateProcessing(
            single=seq("$A", 0), pair=seq("$A", 0) + seq("$B", 1),
            special_tokens=[(t, i) for _, t, i in specials],
        ))  # fmt: skip
    if steps:
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
