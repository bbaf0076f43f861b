"""Architectures: one module per HF model_type, listed in REGISTRY. The table, not the file
system, decides what an architecture is, so model_type "layers" or "__init__" is never imported."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from nvq.errors import ConfigError, UnknownArchitectureError
from nvq.io.hf import HFConfig
from nvq.models import config_rules
from nvq.models.base import NameTable

# model_type → module of nvq.models holding its config parser, name table and forward.
REGISTRY = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "gemma4": "gemma4",
    "gemma4_text": "gemma4",
    "gemma4_unified": "gemma4",
    "gemma4_unified_text": "gemma4",
}
# model_type spellings that share another module's decoder.
ALIASES = {k: v for k, v in REGISTRY.items() if k != v}


@dataclass(frozen=True)
class Architecture:
    name: str  # module name, e.g. "gemma4"
    model_type: str  # as written in config.json
    module: ModuleType
    config: Any  # the module's parsed config dataclass

    @property
    def table(self) -> NameTable:
        return self.module.TABLE

    @property
    def ignore_patterns(self) -> tuple[str, ...]:
        return self.module.IGNORE_PATTERNS


def supported() -> list[str]:
    return sorted(REGISTRY)


def for_config(cfg: HFConfig) -> Architecture:
    model_type = cfg.model_type
    name = REGISTRY.get(model_type)
    if name is None:
        shown = model_type if len(model_type) <= 64 else model_type[:64] + "…"
        raise UnknownArchitectureError(
            f"{cfg.path}: model_type {shown!r} is not supported; supported: {', '.join(supported())}."
        )
    module = importlib.import_module(f"{__name__}.{name}")
    return Architecture(name=name, model_type=model_type, module=module, config=parse_checked(module, cfg))


def parse_checked(module: ModuleType, cfg: HFConfig) -> Any:
    """The module's parsed config, after FIELD_RULES; a value the rules do not cover (a string
    where a list belongs, an unknown activation) still ends in one sentence, not a traceback."""
    config_rules.check_fields(cfg)
    try:
        return module.parse_config(cfg)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        raise ConfigError(f"{cfg.path}: the configuration cannot be read as a {module.__name__.rsplit('.', 1)[-1]} "
                          f"model ({type(e).__name__}: {' '.join(str(e).split())[:200]}).") from None
