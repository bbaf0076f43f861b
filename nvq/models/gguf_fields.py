"""Where a GGUF holds each field of an architecture's parsed config (member GGUF_FIELDS), for
verify's config check (nvq.verify.config_check): field name (RoPE specs flattened to
`rope_full.theta`, ...) → a `Source`:

| source | meaning | a difference |
|---|---|---|
| `meta(key)` | metadata key `<arch>.<key>`; when absent llama.cpp falls back to a hard-coded value (oracle.md §1) | present: FAIL; absent: a note naming llama.cpp's fallback |
| `optional(key)` | the converter writes the key only when the feature is on, so absence says "off" | FAIL |
| `TENSORS` | which tensors exist and their shapes (tied head = no `output.weight`) | FAIL |
| `ARCH` | nothing to read: `general.architecture` fixes it (llama.cpp's graph hard-codes it) | FAIL |

A field the table lacks is not carried by the GGUF: a difference is a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARSED = object()  # Source.fallback: llama.cpp's default is what nvq's GGUF parse already filled in


@dataclass(frozen=True)
class Source:
    keys: tuple[str, ...] = ()  # metadata keys without the "<arch>." prefix; any present carries it
    absent_means_off: bool = False  # the converter omits the key exactly when the feature is off
    tensors: bool = False
    arch: bool = False
    fallback: Any = PARSED  # llama.cpp's hard-coded value when no key is present
    semantic: bool = True  # False: a difference changes no computed value (context length)


def meta(*keys: str, fallback: Any = PARSED) -> Source:
    return Source(keys=keys, fallback=fallback)


def optional(*keys: str) -> Source:
    return Source(keys=keys, absent_means_off=True)


TENSORS = Source(tensors=True)
ARCH = Source(arch=True)

# RoPE sub-fields that only the llama3 scaling uses; llama.cpp encodes that as a rope_freqs tensor.
_LLAMA3_ROPE = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_fields(
    prefix: str, theta: Source, kind: Source, factor: Source, partial: Source, llama3: Source
) -> dict[str, Source]:
    """The fields of one L.RopeSpec, flattened under `prefix`."""
    return {
        f"{prefix}.theta": theta,
        f"{prefix}.kind": kind,
        f"{prefix}.factor": factor,
        f"{prefix}.partial_rotary_factor": partial,
        **{f"{prefix}.{k}": llama3 for k in _LLAMA3_ROPE},
    }


# Fields every decoder has, held the same way by every GGUF.
COMMON_FIELDS = {
    "hidden_size": meta("embedding_length"),
    "num_layers": meta("block_count"),
    "num_heads": meta("attention.head_count"),
    "vocab_size": TENSORS,  # token_embd rows
    "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"),
    "tie_word_embeddings": TENSORS,  # no output.weight = tied
    "max_position_embeddings": Source(keys=("context_length",), semantic=False),
}
