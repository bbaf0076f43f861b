"""Load a dense Hugging Face checkpoint as canonical tensors for the reference forward.

HF values are the canonical convention (architecture decision 2), so this only renames: every
tensor goes through the architecture's name table; towers (vision/audio) and tensors dropped on
purpose (e.g. K/V of KV-shared Gemma-4 layers) are skipped. Quantized checkpoints and GGUF files
have loaders of their own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nvq.errors import CheckpointError
from nvq.io.hf import Checkpoint
from nvq.models import Architecture, for_config

_QUANTIZED_SUFFIXES = (
    ".weight_packed",
    ".weight_scale",
    ".qweight",
    ".scales",
    ".qzeros",
    ".g_idx",
)


def load_hf(path: str | Path) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """(architecture, {canonical name: tensor}) of a dense HF checkpoint, tensors as stored
    (dtype unchanged; the forward casts). Raises UnmappedTensorError for a tensor the table does
    not know, CheckpointError for a quantized checkpoint or an untied model without an LM head.

    Tied embeddings: when the config sets `tie_word_embeddings` true, `output.weight` is left out
    even if an `lm_head.weight` was saved, and the forward reads `token_embd.weight` for the LM
    head, as transformers does. When the key is absent, a saved lm_head is used if present.
    """
    ckpt = Checkpoint.open(path)
    quantized = sorted(n for n in ckpt.tensors if n.endswith(_QUANTIZED_SUFFIXES))
    if quantized:
        raise CheckpointError(
            f"{ckpt.path} holds quantized tensors (e.g. '{quantized[0]}'); load_hf reads dense "
            f"checkpoints only."
        )
    arch = for_config(ckpt.config)
    names = canonical_names(ckpt, arch, ckpt.tensors)
    return arch, {canonical: ckpt.read(source) for source, canonical in names.items()}


def canonical_names(ckpt: Checkpoint, arch: Architecture, sources) -> dict[str, str]:
    """{HF source name: canonical name} for the tensors named in `sources`, through the name
    table: towers and tensors dropped on purpose are left out, and so is a saved lm_head when
    the config ties the embeddings. Raises CheckpointError for two sources on one canonical name,
    a missing embedding, or an untied config without an lm_head."""
    tie = ckpt.config.get("tie_word_embeddings")
    names: dict[str, str] = {}
    for m in arch.table.resolve_all(sorted(sources), arch.config):
        if m.canonical is None:  # tower, or dropped on purpose
            continue
        if m.canonical == "output.weight" and tie is True:
            continue
        if m.canonical in names.values():
            raise CheckpointError(
                f"{ckpt.path}: tensors '{m.source}' and another one both map to '{m.canonical}'."
            )
        names[m.source] = m.canonical
    if "token_embd.weight" not in names.values():
        raise CheckpointError(f"{ckpt.path} has no token embedding (embed_tokens.weight).")
    if tie is False and "output.weight" not in names.values():
        raise CheckpointError(
            f"{ckpt.path}: the config unties the embeddings (tie_word_embeddings false) but the "
            f"checkpoint has no lm_head.weight."
        )
    return names

