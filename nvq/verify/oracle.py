"""The GGUF oracle and the token ids both sides run on.

Path A of oracle.md §6: the GGUF's tensors are dequantized with gguf-py's arithmetic and read in
the canonical convention (`nvq.io.gguf_model.GGUFModel`: Llama Q/K un-permuted, Gemma-3 norms
without their +1), then run through the same reference forward as the candidate. The config the
GGUF implies is parsed too (`arch_config`); `nvq.verify.config_check` compares it with the
candidate's and picks the values the oracle forward runs under, and `metadata` keeps the GGUF's
keys for that and for `nvq.verify.tokenizer_check`.

Token ids come from the candidate's `tokenizer.json` (the `tokenizers` library) over the embedded
prompt set `nvq/data/prompts.txt` (openings of Austen, Lincoln, Dickens and Melville, all in the
public domain), or over `--prompt` / `--prompt-file`, or are `--tokens N` deterministic
pseudo-random ids. Each prompt is one sequence; the total is capped at `max_tokens`, shared between the prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from nvq import limits
from nvq.errors import ConfigError, NvqError
from nvq.io.gguf_cells import is_exact
from nvq.io.gguf_model import GGUFSource
from nvq.io.hf import HFConfig
from nvq.io.tokenizer import load_tokenizer
from nvq.models import for_config
from nvq.verify.candidate import Candidate
from nvq.verify.sources import shape_of

DEFAULT_MAX_TOKENS = 128
TOKEN_SEED = 0  # --tokens N draws from torch.Generator().manual_seed(TOKEN_SEED)


# Parsed-config fields that the weights themselves prove (tensor shapes and which tensors exist):
# where the GGUF disagrees with the candidate on these, the candidate's config is wrong.
STRUCTURAL_FIELDS = frozenset({
    "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
    "mlp_width", "has_v_proj", "first_kv_shared", "per_layer_input_size", "num_experts",
    "moe_intermediate_size", "vocab_size", "vocab_size_per_layer_input",
})


@dataclass
class Oracle:
    path: Path
    arch_name: str  # nvq.models module ("llama", "gemma3", "gemma4")
    config: dict  # HF-style config the GGUF implies
    tensors: GGUFSource  # canonical name → float32, HF conventions, read on access
    arch_config: Any = None  # the GGUF's own parsed config (None if it does not parse)
    ignored: list[str] = dataclasses.field(default_factory=list)  # tensors the model never reads
    metadata: dict = dataclasses.field(default_factory=dict)  # the GGUF's metadata keys, as read
    storage: dict[str, str] = dataclasses.field(default_factory=dict)  # canonical name -> ggml type

    @property
    def lossy(self) -> bool:
        """Whether the GGUF rounds any compared tensor (its own storage noise enters the band)."""
        return any(not is_exact(t) for t in self.storage.values())

    @property
    def exactness(self) -> dict[str, int]:
        """How many compared tensors the GGUF stores in each type (the oracle's own noise)."""
        counts: dict[str, int] = {}
        for name in self.tensors:
            kind = self.storage.get(name, "F32")
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))


def load_oracle(path: str | Path, candidate: Candidate) -> Oracle:
    """Read the GGUF and check it is an oracle for this candidate: same architecture, same
    vocabulary, same depth and width (ConfigError, exit 2, otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"oracle {path} does not exist or is not a file; --oracle takes a .gguf file.")
    gguf = GGUFSource.open(path)
    arch_name, config = gguf.arch_name, gguf.config
    # a Mistral candidate's GGUF is a llama one: llama.cpp converts it so (nvq.models.mistral)
    if gguf.model.gguf.architecture != candidate.arch.gguf_arch:
        raise ConfigError(
            f"oracle {path} is a {arch_name} model but the candidate {candidate.path} is "
            f"{candidate.arch.name}; verify needs a GGUF of the same model."
        )
    ours = shape_of(candidate.tensors, "token_embd.weight")
    theirs = gguf.shape("token_embd.weight") if "token_embd.weight" in gguf else None
    if theirs is None or tuple(theirs) != ours:
        got = "none" if theirs is None else "×".join(map(str, theirs))
        raise ConfigError(
            f"oracle {path} has a token embedding of {got} but the candidate's is "
            f"{'×'.join(map(str, ours))}: the vocabularies (or widths) differ, so this GGUF "
            f"is not an oracle for this model."
        )
    for key in ("num_hidden_layers", "hidden_size"):
        a, b = candidate.config.get(key), config.get(key)
        if a is not None and b is not None and int(a) != int(b):
            raise ConfigError(
                f"oracle {path} has {key} {b} but the candidate's config says {a}; this GGUF is "
                f"not an oracle for this model."
            )
    try:
        theirs = for_config(HFConfig(path, config)).config
    except (NvqError, KeyError, ValueError, TypeError):
        theirs = None
    # e.g. vestigial K/V of Gemma-4 KV-shared layers (gemma4.md §3.1): llama.cpp copies them
    # into the GGUF, but the model never reads them, so no candidate is asked to have them.
    table, arch_config = candidate.arch.table, theirs or candidate.arch.config
    ignored = sorted(n for n in gguf if table.drop_reason(n, arch_config))
    tensors = GGUFSource(gguf.model, exclude=ignored)
    storage = {n: tensors.storage(n) for n in tensors}
    return Oracle(path, arch_name, config, tensors, theirs, ignored, dict(gguf.model.gguf.metadata), storage)


# ---------------------------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    sequences: list[torch.Tensor]  # one 1-D int64 tensor per prompt
    source: str  # "default prompts", "--prompt", "--prompt-file FILE", "--tokens N"

    @property
    def count(self) -> int:
        return sum(int(s.numel()) for s in self.sequences)


def default_prompts() -> list[str]:
    text = resources.files("nvq.data").joinpath("prompts.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def token_ids(
    candidate: Candidate,
    prompt: str | None = None,
    prompt_file: str | Path | None = None,
    n_tokens: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    n_sequences: int = 1,
) -> Tokens:
    """The token sequences both forwards run on. At most one of prompt / prompt_file / n_tokens;
    `n_sequences` splits the --tokens ids into that many sequences (attention stays per sequence,
    so more evidence costs no more memory than its longest sequence)."""
    given = [x for x in (prompt, prompt_file, n_tokens) if x is not None]
    if len(given) > 1:
        raise ConfigError("--prompt, --prompt-file and --tokens exclude each other; give at most one.")
    vocab = int(shape_of(candidate.tensors, "token_embd.weight")[0])
    if n_tokens is not None:
        if n_tokens < 2:
            raise ConfigError(f"--tokens {n_tokens}: at least 2 tokens are needed (one prediction).")
        if n_sequences < 1 or n_tokens < 2 * n_sequences:
            raise ConfigError(f"--tokens {n_tokens} --sequences {n_sequences}: every sequence needs at least 2 tokens.")
        gen = torch.Generator().manual_seed(TOKEN_SEED)
        ids = torch.randint(0, vocab, (n_tokens,), generator=gen)
        source = f"--tokens {n_tokens}" + (f" in {n_sequences} sequences" if n_sequences > 1 else "")
        return Tokens(list(ids.tensor_split(n_sequences)), source)
    if prompt_file is not None:
        texts, source = [limits.read_text_file(prompt_file, "--prompt-file")], f"--prompt-file {prompt_file}"
    elif prompt is not None:
        texts, source = [prompt], "--prompt"
    else:
        texts, source = default_prompts(), "default prompts"
    tok = load_tokenizer(candidate.path, "pass --tokens N to verify on random token ids")
    encoded = [tok.encode(text).ids for text in texts]
    sequences = []
    for ids, cap in zip(encoded, _shares([len(e) for e in encoded], max_tokens), strict=True):
        ids = ids[:cap]
        if len(ids) < 2:
            raise ConfigError(f"{source}: a prompt gives {len(ids)} token(s); at least 2 are needed.")
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise ConfigError(
                f"{candidate.path}: the tokenizer gives id {bad[0]} but the embedding has {vocab} rows: "
                f"tokenizer and model vocabularies do not match."
            )
        sequences.append(torch.tensor(ids, dtype=torch.long))
    return Tokens(sequences, source)


def _shares(lengths: list[int], budget: int) -> list[int]:
    """Tokens per prompt: the budget shared as evenly as the lengths allow (short prompts whole,
    what they leave spread over the longer ones), so the total is min(sum of lengths, budget)."""
    caps = [0] * len(lengths)
    left, todo = budget, sorted(range(len(lengths)), key=lengths.__getitem__)
    for k, i in enumerate(todo):
        caps[i] = min(lengths[i], left // (len(todo) - k))
        left -= caps[i]
    return caps

