"""Architectures: one module per HF model_type, each with every member of the architecture
protocol (nvq.models.protocol), registered when this package is imported.

Every module of this package that is not one of the shared ones below is an architecture and is
checked at registration, so a module lacking a member fails at import with its name and the
member's. The registry, not the file system, answers lookups: model_type "layers" or "__init__"
is an unknown architecture.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from nvq.errors import ConfigError, UnknownArchitectureError
from nvq.io.gguf import GGUFFile
from nvq.io.gguf_config import ArchSpec
from nvq.io.hf import HFConfig
from nvq.models import config_rules
from nvq.models.base import NameTable
from nvq.models.blame import Blame
from nvq.models.protocol import ArchModule, ProtocolError, check

# Modules of this package that serve every architecture.
SHARED_MODULES = frozenset({"base", "blame", "config_rules", "gguf_fields", "layers", "load", "protocol"})

ARCHITECTURES: dict[str, ArchModule] = {}  # module name → module
REGISTRY: dict[str, str] = {}  # model_type (aliases included) → module name
GGUF_READERS: dict[str, str] = {}  # GGUF general.architecture → the module whose GGUF_SPEC reads it


def register(module: ModuleType) -> ArchModule:
    """Check the module against the protocol and make its model_types and GGUF findable. Raises
    ProtocolError for a missing member or a model_type / GGUF another module already claims."""
    arch = check(module)
    name = module.__name__.rsplit(".", 1)[-1]
    taken = [t for t in arch.MODEL_TYPES if REGISTRY.get(t, name) != name]
    if taken:
        raise ProtocolError(f"architecture module {module.__name__} claims model_type {taken[0]!r}, "
                            f"which nvq.models.{REGISTRY[taken[0]]} already reads.")
    if arch.GGUF_SPEC is not None and GGUF_READERS.get(arch.GGUF_ARCH, name) != name:
        raise ProtocolError(f"architecture module {module.__name__} reads '{arch.GGUF_ARCH}' GGUFs, which "
                            f"nvq.models.{GGUF_READERS[arch.GGUF_ARCH]} already reads.")
    ARCHITECTURES[name] = arch
    REGISTRY.update(dict.fromkeys(arch.MODEL_TYPES, name))
    if arch.GGUF_SPEC is not None:
        GGUF_READERS[arch.GGUF_ARCH] = name
    return arch


def _register_package() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in SHARED_MODULES:
            register(importlib.import_module(f"{__name__}.{info.name}"))


@dataclass(frozen=True)
class Architecture:
    name: str  # module name, e.g. "gemma4"
    model_type: str  # as written in config.json
    module: ArchModule
    config: Any  # the module's parsed config dataclass

    @property
    def table(self) -> NameTable:
        return self.module.TABLE

    @property
    def ignore_patterns(self) -> tuple[str, ...]:
        return self.module.IGNORE_PATTERNS

    @property
    def blame(self) -> tuple[Blame, ...]:
        return self.module.BLAME

    @property
    def gguf_arch(self) -> str:
        return self.module.GGUF_ARCH


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
    module = ARCHITECTURES[name]
    return Architecture(name=name, model_type=model_type, module=module, config=parse_checked(module, cfg))


def for_gguf(gf: GGUFFile) -> tuple[str, ArchSpec]:
    """(module name, GGUF metadata mapping) of the architecture that reads this GGUF."""
    name = GGUF_READERS.get(gf.architecture)
    if name is None:
        raise ConfigError(f"{gf.path} is a '{gf.architecture}' GGUF; nvq reads {', '.join(sorted(GGUF_READERS))}.")
    return name, ARCHITECTURES[name].GGUF_SPEC


def parse_checked(module: ArchModule, cfg: HFConfig) -> Any:
    """The module's parsed config, after FIELD_RULES; a value the rules do not cover (a string
    where a list belongs, an unknown activation) still ends in one sentence, not a traceback."""
    config_rules.check_fields(cfg)
    try:
        return module.parse_config(cfg)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        raise ConfigError(f"{cfg.path}: the configuration cannot be read as a {module.__name__.rsplit('.', 1)[-1]} "
                          f"model ({type(e).__name__}: {' '.join(str(e).split())[:200]}).") from None


_register_package()
