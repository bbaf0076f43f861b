"""The architecture protocol: what every module of nvq.models that describes an architecture
provides, checked when nvq.models registers it (`check`), so a missing or misnamed member is one
sentence at import naming the module and the member, not an AttributeError deep in a convert.

A new architecture is one module with these members (copy `llama.py`) plus its test module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import torch

from nvq.io.gguf_config import ArchSpec
from nvq.io.hf import HFConfig
from nvq.models.base import NameTable
from nvq.models.blame import Blame
from nvq.models.gguf_fields import Source
from nvq.models.layers import Observer, Taps


class Forward(Protocol):
    """A reference forward over canonical tensors under llama.cpp's tap names; `observer` sees
    every Linear's input (GPTQ calibration)."""

    def __call__(
        self,
        config: Any,
        tensors: Mapping[str, torch.Tensor],
        token_ids: torch.Tensor,
        taps: Taps | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        observer: Observer | None = None,
    ) -> Any: ...


class ArchModule(Protocol):
    """The members of an architecture module (module-level names)."""

    MODEL_TYPES: tuple[str, ...]  # config.json model_type spellings it reads; aliases included
    TABLE: NameTable  # HF ⇄ canonical (GGUF) names
    IGNORE_PATTERNS: tuple[str, ...]  # dense Linears outside the table, for compressed-tensors
    BLAME: tuple[Blame, ...]  # canonical weight → the taps it feeds first (verify's diff)
    GGUF_ARCH: str  # general.architecture of the GGUF llama.cpp's converter writes for it
    GGUF_SPEC: ArchSpec | None  # GGUF metadata → HF config; None: another module reads that GGUF
    GGUF_FIELDS: Mapping[str, Source]  # parsed config field → where the GGUF holds it (verify)
    HF_DEFAULTS: Mapping[str, Any]  # transformers' defaults of HF fields the parsed config lacks
    parse_config: Callable[[HFConfig], Any]  # the module's config dataclass
    # stepwise: yields layers.EMBEDDED, then i after `l_out-i`; returns `result_norm`
    forward_layers: Forward
    forward: Forward  # logits `[T, V]` of one sequence
    # head(config, hidden, weight_rows): logits of some vocabulary rows (the LM head in chunks)
    head: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Member:
    name: str
    is_valid: Callable[[Any], bool]
    expected: str  # what the member must be, for the error


def _strings(v: Any) -> bool:
    return isinstance(v, tuple) and all(isinstance(s, str) for s in v)


def _takes(*params: str) -> Callable[[Any], bool]:
    def ok(fn: Any) -> bool:
        if not callable(fn):
            return False
        return set(params) <= set(inspect.signature(fn).parameters)

    return ok


_FORWARD = ("config", "tensors", "token_ids", "taps", "dtype", "device", "observer")
MEMBERS = (
    Member(
        "MODEL_TYPES",
        lambda v: _strings(v) and len(v) > 0,
        "a non-empty tuple of model_type strings",
    ),
    Member("TABLE", lambda v: isinstance(v, NameTable), "a nvq.models.base.NameTable"),
    Member("IGNORE_PATTERNS", _strings, "a tuple of strings"),
    Member(
        "BLAME",
        lambda v: isinstance(v, tuple) and all(isinstance(b, Blame) for b in v),
        "a tuple of nvq.models.blame.Blame rows",
    ),
    Member(
        "GGUF_ARCH", lambda v: isinstance(v, str) and v != "", "a GGUF general.architecture string"
    ),
    Member(
        "GGUF_SPEC",
        lambda v: v is None or isinstance(v, ArchSpec),
        "a nvq.io.gguf_config.ArchSpec or None",
    ),
    Member(
        "GGUF_FIELDS",
        lambda v: isinstance(v, Mapping) and all(isinstance(s, Source) for s in v.values()),
        "a mapping of config field → nvq.models.gguf_fields.Source",
    ),
    Member(
        "HF_DEFAULTS", lambda v: isinstance(v, Mapping), "a mapping of HF config field → default"
    ),
    Member("parse_config", _takes("cfg"), "a function parse_config(cfg)"),
    Member(
        "forward_layers", _takes(*_FORWARD), f"a function forward_layers({', '.join(_FORWARD)})"
    ),
    Member("forward", _takes(*_FORWARD), f"a function forward({', '.join(_FORWARD)})"),
    Member(
        "head",
        _takes("config", "hidden", "weight_rows"),
        "a function head(config, hidden, weight_rows)",
    ),
)


class ProtocolError(TypeError):
    """An architecture module lacks a member of the protocol, or has one of the wrong kind."""


def check(module: ModuleType) -> ArchModule:
    """The module, once it has every member of the protocol; ProtocolError names the first gap."""
    for member in MEMBERS:
        if not hasattr(module, member.name):
            raise ProtocolError(
                f"architecture module {module.__name__} has no member {member.name} "
                f"({member.expected})."
            )
        if not member.is_valid(getattr(module, member.name)):
            raise ProtocolError(
                f"architecture module {module.__name__}: member {member.name} is not "
                f"{member.expected}."
            )
    return module  # type: ignore[return-value]
