"""Architectures: one module per HF model_type, found by import (the file system is the registry)."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from nvq.errors import UnknownArchitectureError
from nvq.io.hf import HFConfig
from nvq.models.base import NameTable

# model_type spellings that share another module's decoder.
ALIASES = {
    "gemma4_text": "gemma4",
    "gemma4_unified": "gemma4",
    "gemma4_unified_text": "gemma4",
    "gemma3_text": "gemma3",
    "mistral": "llama",
}
_NOT_ARCHITECTURES = {"base"}


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
    here = importlib.import_module(__name__).__path__
    names = {m.name for m in pkgutil.iter_modules(here)} - _NOT_ARCHITECTURES
    return sorted(names | set(ALIASES))


def for_config(cfg: HFConfig) -> Architecture:
    model_type = cfg.model_type
    name = ALIASES.get(model_type, model_type)
    if name in _NOT_ARCHITECTURES or not name.isidentifier():
        module = None
    else:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            module = None
    if module is None:
        raise UnknownArchitectureError(
            f"{cfg.path}: model_type '{model_type}' is not supported; supported: {', '.join(supported())}."
        )
    return Architecture(name=name, model_type=model_type, module=module, config=module.parse_config(cfg))
