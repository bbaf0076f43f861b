"""Mistral (model_type mistral): Llama's decoder and names plus a sliding attention window.

Every layer attends to at most `sliding_window` keys back (transformers' Mistral mask: key k is
seen from query q when 0 ≤ q − k < W); `sliding_window: null` (Mistral v0.2 and later) is full
causal attention.

llama.cpp disagrees: its converter writes MistralForCausalLM as a `llama` GGUF with no window key,
and its llama graph attends causally over the whole context (src/models/llama.cpp builds its
attention input with `build_attn_inp_kv`, not the sliding-window `_iswa` one; llama-cpp-python 0.3.36). transformers is right (Mistral-7B
v0.1 was trained with W = 4096), and the two agree only while a sequence is no longer than W.
nvq follows transformers; verify takes the window from the candidate, because a llama GGUF cannot
hold one (`GGUF_ARCH`, and a note in the certificate's config findings).

Taps: as llama (nvq.models.llama).
"""

from __future__ import annotations

from dataclasses import replace

from nvq.io.hf import HFConfig
from nvq.models import llama
from nvq.models.llama import LlamaConfig, forward, forward_layers, head  # noqa: F401  (the module's protocol)

MODEL_TYPES = ("mistral",)
TABLE = llama.TABLE
IGNORE_PATTERNS = llama.IGNORE_PATTERNS
BLAME = llama.BLAME
GGUF_FIELDS = llama.GGUF_FIELDS
HF_DEFAULTS = {"tie_word_embeddings": False, "max_position_embeddings": 131072}
# llama.cpp converts Mistral to a llama GGUF, which nvq.models.llama reads back (as LlamaForCausalLM)
GGUF_ARCH = llama.GGUF_ARCH
GGUF_SPEC = None


def parse_config(cfg: HFConfig) -> LlamaConfig:
    window = cfg.get("sliding_window")
    return replace(llama.parse_config(cfg), sliding_window=None if window is None else int(window))
