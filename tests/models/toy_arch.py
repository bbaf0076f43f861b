"""A toy architecture for tests/models/test_registry.py: Llama's decoder under a model_type and a
GGUF architecture of its own, declared only here, as a new architecture module would be."""

from __future__ import annotations

from dataclasses import replace

from nvq.models import llama
from nvq.models.llama import forward, forward_layers, head, parse_config  # noqa: F401  (the module's protocol)

MODEL_TYPES = ("toyllama", "toyllama_text")
TABLE = llama.TABLE
IGNORE_PATTERNS = llama.IGNORE_PATTERNS
BLAME = llama.BLAME
GGUF_FIELDS = llama.GGUF_FIELDS
HF_DEFAULTS = llama.HF_DEFAULTS
GGUF_ARCH = "toyllama"
# llama's metadata mapping, without the Q/K permutation llama.cpp applies to real llama GGUFs
GGUF_SPEC = replace(
    llama.GGUF_SPEC, architecture="ToyLlamaForCausalLM", model_type="toyllama", fixes=()
)
