"""The candidate's tokenizer against the GGUF's vocabulary (`tokenizer.ggml.*`).

Compared, each a FAIL on a difference:
- the token string of every id (`tokenizer.json` through the `tokenizers` library, added tokens
  included, against `tokenizer.ggml.tokens`); the first differing id is named. Ids the converter
  padded the GGUF's vocabulary with (`[PAD<i>]`, type UNUSED) may be absent from the candidate;
- the BOS / EOS / PAD / UNK ids: the candidate's from `tokenizer_config.json` (`bos_token`, ...),
  else from `config.json` (`bos_token_id`, ...), against `tokenizer.ggml.<what>_token_id`;
- add_bos / add_eos: the candidate's `tokenizer_config.json` flag where it has one, else what its
  `tokenizer.json` post-processor does to a text, against `tokenizer.ggml.add_bos_token` (absent:
  llama.cpp's default for the GGUF's tokenizer model, a note when it differs). A BOS that the
  post-processor prepends must be the GGUF's BOS id.

A special id that only one side defines is a note. A candidate without `tokenizer.json` gets a
note (nothing to compare), as does a GGUF without a vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvq.errors import ConfigError
from nvq.io.gguf_tokenizer import UNUSED
from nvq.io.tokenizer import load_tokenizer
from nvq.verify.findings import FAIL, NOTE, Finding

# (name in the findings, tokenizer_config.json key, config.json key, GGUF key)
SPECIALS = (
    ("bos_token_id", "bos_token", "bos_token_id", "tokenizer.ggml.bos_token_id"),
    ("eos_token_id", "eos_token", "eos_token_id", "tokenizer.ggml.eos_token_id"),
    ("pad_token_id", "pad_token", "pad_token_id", "tokenizer.ggml.padding_token_id"),
    ("unk_token_id", "unk_token", None, "tokenizer.ggml.unknown_token_id"),
)
# llama.cpp's add_bos when the GGUF has no tokenizer.ggml.add_bos_token (llama-vocab.cpp, per model)
DEFAULT_ADD_BOS = {"llama": True, "gemma4": True, "gpt2": False}
PROBE_TEXT = "Hello world"  # any text: what the post-processor adds around it is what is checked


def compare(candidate_dir: Path, candidate_hf: Any, metadata: Mapping[str, Any]) -> list[Finding]:
    """Findings of the candidate's tokenizer against the GGUF's; `candidate_hf` is its config.json
    (anything with `.get`)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        return [_note("vocabulary", "tokenizer: the GGUF carries no vocabulary (tokenizer.ggml.tokens); "
                                    "the tokenizer was not compared.")]
    if not (Path(candidate_dir) / "tokenizer.json").is_file():
        return [_note("vocabulary", f"tokenizer: {candidate_dir} has no tokenizer.json; the tokenizer was not "
                                    f"compared with the GGUF's vocabulary.")]
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return [_note("vocabulary", "tokenizer: the 'tokenizers' package is not installed; the tokenizer was "
                                    "not compared with the GGUF's vocabulary.")]
    try:
        tok = load_tokenizer(candidate_dir, "")
    except ConfigError as e:
        return [Finding("tokenizer", "tokenizer.json", None, None, FAIL, f"tokenizer: {e}")]
    config = _tokenizer_config(Path(candidate_dir))
    findings = _vocabulary(tok, tokens, metadata.get("tokenizer.ggml.token_type"))
    ids = {}
    for name, cfg_key, hf_key, gguf_key in SPECIALS:
        ours, where = _candidate_special(tok, config, candidate_hf, cfg_key, hf_key)
        ids[name] = ours
        theirs = metadata.get(gguf_key)
        findings += _special(name, ours, where, theirs, gguf_key)
    findings += _added_specials(tok, config, metadata, ids)
    return findings


def _note(name: str, message: str) -> Finding:
    return Finding("tokenizer", name, None, None, NOTE, message)


def _tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read as JSON ({e}).") from None
    return data if isinstance(data, dict) else {}


def _vocabulary(tok, tokens: list[str], types: list[int] | None) -> list[Finding]:
    """The first id whose token string differs."""
    by_id: dict[int, str] = {}
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        by_id.setdefault(i, text)
    n = max(len(tokens), max(by_id, default=-1) + 1)
    for i in range(n):
        ours, theirs = by_id.get(i), tokens[i] if i < len(tokens) else None
        if ours == theirs:
            continue
        if ours is None and _padding(i, theirs, types):
            continue
        a = "absent" if ours is None else repr(ours)
        b = "absent" if theirs is None else repr(theirs)
        msg = (f"tokenizer: token id {i} is {a} in the candidate but {b} in the oracle GGUF "
               f"(candidate {len(by_id)} tokens, GGUF {len(tokens)}).")
        return [Finding("tokenizer", "token", ours, theirs, FAIL, msg, "tokenizer.ggml.tokens", token_id=i)]
    return []


def _padding(i: int, text: str | None, types: list[int] | None) -> bool:
    """A vocabulary slot the converter filled because the model's vocab_size exceeds the tokenizer's."""
    return text == f"[PAD{i}]" or (types is not None and i < len(types) and types[i] == UNUSED)


def _candidate_special(tok, config: dict, hf: Any, cfg_key: str, hf_key: str | None) -> tuple[Any, str]:
    """(id or list of ids or None, where it came from)."""
    value = config.get(cfg_key)
    if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
        value = value.get("content")
    if isinstance(value, str):
        i = tok.token_to_id(value)
        return (i if i is not None else f"{value!r} (not in the vocabulary)"), f"tokenizer_config.json {cfg_key}"
    if hf_key is not None and hf is not None and hf.get(hf_key) is not None:
        return hf.get(hf_key), f"config.json {hf_key}"
    return None, ""


def _special(name: str, ours, where: str, theirs, gguf_key: str) -> list[Finding]:
    if ours is None and theirs is None:
        return []
    if ours is None or theirs is None:
        side = "the oracle GGUF" if ours is None else "the candidate"
        value = theirs if ours is None else ours
        return [Finding("tokenizer", name, ours, theirs, NOTE,
                        f"tokenizer: only {side} defines {name} ({value!r}); not compared.", gguf_key)]
    same = theirs in ours if isinstance(ours, list) else ours == theirs
    if same:
        return []
    msg = f"tokenizer: {name} is {ours!r} in the candidate ({where}) but {theirs!r} in the oracle GGUF ({gguf_key})."
    return [Finding("tokenizer", name, ours, theirs, FAIL, msg, gguf_key, token_id=theirs)]


def _around(tok, text: str) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after the text's own ids."""
    bare = tok.encode(text, add_special_tokens=False).ids
    full = tok.encode(text, add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k], full[k + len(bare) :]
    return [], []


def _added_specials(tok, config: dict, metadata: Mapping[str, Any], ids: dict) -> list[Finding]:
    before, after = _around(tok, PROBE_TEXT)
    findings = []
    gguf_bos = metadata.get("tokenizer.ggml.bos_token_id")
    if before and gguf_bos is not None and before[0] != gguf_bos:
        findings.append(Finding(
            "tokenizer", "bos_token_id", before[0], gguf_bos, FAIL,
            f"tokenizer: the candidate's tokenizer.json prepends id {before[0]} "
            f"({tok.id_to_token(before[0])!r}) but the oracle GGUF's BOS is {gguf_bos}.",
            "tokenizer.ggml.bos_token_id", token_id=gguf_bos))
    model = metadata.get("tokenizer.ggml.model")
    for what, added in (("bos", bool(before)), ("eos", bool(after))):
        flag = f"add_{what}_token"
        ours = config.get(flag) if isinstance(config.get(flag), bool) else added
        where = f"tokenizer_config.json {flag}" if isinstance(config.get(flag), bool) else "tokenizer.json post-processor"
        key = f"tokenizer.ggml.{flag}"
        if key in metadata:
            theirs, verdict = bool(metadata[key]), FAIL
            msg = f"tokenizer: {flag} is {ours} in the candidate ({where}) but {theirs} in the oracle GGUF ({key})."
        else:
            # llama.cpp adds BOS by its vocabulary type's default and no EOS unless told
            theirs, verdict = (DEFAULT_ADD_BOS.get(model, False) if what == "bos" else False), NOTE
            msg = (f"tokenizer: {flag} is {ours} in the candidate ({where}); the GGUF has no {key}, so llama.cpp "
                   f"falls back to {theirs} for a '{model}' vocabulary.")
        if ours != theirs:
            special = ids.get(f"{what}_token_id")
            if isinstance(special, int):
                msg = msg[:-1] + f"; {what.upper()} is id {special}."
            findings.append(Finding("tokenizer", flag, ours, theirs, verdict, msg, key,
                                    token_id=special if isinstance(special, int) else None))
    return findings
