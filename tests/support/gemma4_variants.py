"""Miniature Gemma-4 checkpoints, one per released variant, built with transformers 5.23.

Each miniature keeps the structure of its release (gemma4.md §7) at hidden size 64, a few layers
and the 325-token synthetic vocabulary of :func:`tiny_models.build_tokenizer`:

| variant | layers (full at) | Hq | KV sliding/full | k_eq_v | extras |
|---|---|---|---|---|---|
| ``e2b`` | 10 (i%5==4: 4, 9) | 4 | 1 / 1 | no | PLE 64; layers 5-9 KV-shared (donors 3, 4); double-wide MLP there |
| ``e4b`` | 12 (i%6==5: 5, 11) | 4 | 2 / 2 | no | PLE 64; layers 6-11 KV-shared (donors 4, 5) |
| ``12b-unified`` | 6 (5) | 4 | 2 / 1 | yes | ``gemma4_unified`` classes; no PLE, no MoE |
| ``26b-a4b`` | 6 (5) | 8 | 4 / 2 | yes | MoE beside the dense MLP: 8 experts, top-2, Ie 64 |
| ``31b`` | 6 (5) | 8 | 4 / 1 | yes | dense |

The KV-shared layouts put the last non-shared layer on a full layer and the one before it on a
sliding layer, as in E2B/E4B: llama.cpp hard-codes its donors as first_shared−1 (full) and
first_shared−2 (sliding) and asserts on anything else (gemma4.md §2.6).

``form``: "causal" saves the text-only ``Gemma4ForCausalLM`` (``Gemma4UnifiedForCausalLM`` for the
unified variant); "conditional" saves ``Gemma4ForConditionalGeneration``
(``Gemma4UnifiedForConditionalGeneration``) with a small vision and audio tower. transformers 5.23
builds both towers for every ``Gemma4Config``, so every conditional miniature carries both (the
released 26B-A4B and 31B ship a vision tower only); the unified family's "towers" are its
encoder-free embedders ``embed_vision`` and ``embed_audio``.

``dialect``: "global" writes ``global_head_dim`` / ``num_global_key_value_heads`` like Google's
configs, "per_layer" the ``per_layer_config`` that a transformers 5.23 re-save writes (§1.3).

Decoder weights are drawn per tensor from the seed and the tensor's decoder-relative name, so the
text weights of one variant and seed are identical in every form and dialect.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.support.tiny_models import (
    GEMMA4_DIALECTS,
    _new_model,
    build_tokenizer,
    gemma4_base_text_config,
    save_random_gemma4,
)

__all__ = [
    "GEMMA4_DIALECTS",
    "GEMMA4_FORMS",
    "GEMMA4_VARIANTS",
    "VARIANTS",
    "Variant",
    "build_gemma4_variant",
    "variant_text_config",
]

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _layer_types(n_layers: int, period: int) -> list[str]:
    """`period - 1` sliding layers, then one full layer, repeated (full at i % period == period - 1)."""
    return [_FULL if i % period == period - 1 else _SLIDING for i in range(n_layers)]


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # "gemma4" or "gemma4_unified": which transformers classes build it
    text: dict  # text-config kwargs over tiny_models.gemma4_base_text_config
    release: str  # what it miniaturizes
    towers: tuple[str, ...] = field(default=("vision", "audio"))


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "e2b",
            "gemma4",
            dict(
                num_hidden_layers=10,
                layer_types=_layer_types(10, 5),
                num_attention_heads=4,
                num_key_value_heads=1,
                intermediate_size=256,
                hidden_size_per_layer_input=64,
                num_kv_shared_layers=5,
                use_double_wide_mlp=True,
            ),
            "google/gemma-4-E2B",
        ),
        Variant(
            "e4b",
            "gemma4",
            dict(
                num_hidden_layers=12,
                layer_types=_layer_types(12, 6),
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=256,
                hidden_size_per_layer_input=64,
                num_kv_shared_layers=6,
            ),
            "google/gemma-4-E4B",
        ),
        Variant(
            "12b-unified",
            "gemma4_unified",
            dict(
                num_hidden_layers=6,
                layer_types=_layer_types(6, 6),
                num_attention_heads=4,
                num_key_value_heads=2,
                num_global_key_value_heads=1,
                attention_k_eq_v=True,
                intermediate_size=256,
                sliding_window=16,
            ),
            "google/gemma-4-12B",
        ),
        Variant(
            "26b-a4b",
            "gemma4",
            dict(
                num_hidden_layers=6,
                layer_types=_layer_types(6, 6),
                num_attention_heads=8,
                num_key_value_heads=4,
                num_global_key_value_heads=2,
                attention_k_eq_v=True,
                intermediate_size=64,
                sliding_window=16,
                enable_moe_block=True,
                num_experts=8,
                top_k_experts=2,
                moe_intermediate_size=64,
            ),
            "google/gemma-4-26B-A4B",
        ),
        Variant(
            "31b",
            "gemma4",
            dict(
                num_hidden_layers=6,
                layer_types=_layer_types(6, 6),
                num_attention_heads=8,
                num_key_value_heads=4,
                num_global_key_value_heads=1,
                attention_k_eq_v=True,
                intermediate_size=256,
                sliding_window=16,
            ),
            "google/gemma-4-31B",
        ),
    )
}
GEMMA4_VARIANTS = tuple(VARIANTS)
GEMMA4_FORMS = ("conditional", "causal")

# Tower configs, small but complete: every module transformers builds for a tower is present.
_TOWER_CONFIGS = {
    ("gemma4", "vision"): dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
    ),
    ("gemma4", "audio"): dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        subsampling_conv_channels=[8, 4],
        conv_kernel_size=3,
        output_proj_dims=32,
    ),
    ("gemma4_unified", "vision"): dict(
        patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=32
    ),
    ("gemma4_unified", "audio"): dict(audio_embed_dim=32),
}

# Decoder prefixes of the two forms; stripping them gives a form-independent random stream.
_DECODER_PREFIXES = ("model.language_model.", "model.")


def variant_text_config(variant: str, vocab_size: int) -> dict:
    """The text-config kwargs of a miniature, in the "global" dialect."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Gemma-4 variant {variant!r}; expected one of {GEMMA4_VARIANTS}")
    spec = VARIANTS[variant]
    cfg = gemma4_base_text_config(vocab_size, spec.family)
    cfg.update(copy.deepcopy(spec.text))
    if cfg.get("hidden_size_per_layer_input"):
        cfg["vocab_size_per_layer_input"] = vocab_size
    return cfg


def _classes(family: str) -> dict:
    import transformers

    # attribute names of the transformers classes, per family and role
    stem = {"gemma4": "Gemma4", "gemma4_unified": "Gemma4Unified"}[family]
    names = {
        "config": f"{stem}Config",
        "text_config": f"{stem}TextConfig",
        "vision": f"{stem}VisionConfig",
        "audio": f"{stem}AudioConfig",
        "causal": f"{stem}ForCausalLM",
        "conditional": f"{stem}ForConditionalGeneration",
    }
    return {role: getattr(transformers, name) for role, name in names.items()}


def _stream_key(name: str) -> str:
    # Tower names lose "model." too, but only the conditional form has towers: no collision.
    prefix = next((p for p in _DECODER_PREFIXES if name.startswith(p)), "")
    return name[len(prefix) :]


def build_gemma4_variant(
    out_dir: str | Path,
    variant: str,
    form: str = "conditional",
    dialect: str = "global",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    text_overrides: dict | None = None,
) -> Path:
    """Write the miniature of `variant` (one of GEMMA4_VARIANTS) into `out_dir` and return it.

    form: "conditional" (multimodal class with vision and audio towers) or "causal" (text only).
    dialect: "global" or "per_layer" (module docstring).
    text_overrides: text-config fields replaced after the variant's own (e.g. head_dim).
    """
    if form not in GEMMA4_FORMS:
        raise ValueError(f"form must be one of {GEMMA4_FORMS}, not {form!r}")
    if dialect not in GEMMA4_DIALECTS:
        raise ValueError(f"dialect must be one of {GEMMA4_DIALECTS}, not {dialect!r}")
    out = Path(out_dir)
    text_cfg = variant_text_config(variant, build_tokenizer(out)) | (text_overrides or {})
    spec = VARIANTS[variant]
    cls = _classes(spec.family)
    conditional = form == "conditional"
    if conditional:
        towers = {
            f"{kind}_config": (
                cls[kind](**_TOWER_CONFIGS[(spec.family, kind)]) if kind in spec.towers else None
            )
            for kind in ("vision", "audio")
        }
        config = cls["config"](
            text_config=cls["text_config"](**copy.deepcopy(text_cfg)),
            tie_word_embeddings=True,
            **towers,
        )
    else:
        config = cls["text_config"](**copy.deepcopy(text_cfg))
    model = _new_model(cls[form], config, seed)
    return save_random_gemma4(out, model, text_cfg, conditional, dialect, dtype, seed, _stream_key)
