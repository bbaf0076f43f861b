"""The scheme registry: one module per output scheme, looked up by name.

Each module (`nvfp4`, `mxfp4`, `gptq`, `bf16`) registers one `SchemeSpec` holding everything
nvq knows about the scheme: its group sizes, its container layout (output tensors and shape
checks, from nvq.layouts), how the pipeline quantizes with it (nvq.ops), how a checkpoint in it
decodes, what storing a weight in it does (verify's expected noise), its `quantization_config`
and where engines serve it differently. Convert, plan, recipes and verify ask the registry by
name; adding a scheme is one module in this package, plus its tests.

The modules are imported on the first lookup, not with this package: they reach into nvq.quant
and nvq.ops, which import this package for their own lookups.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nvq.errors import RecipeError

if TYPE_CHECKING:  # the CLI reads BUILTIN for its choices before torch is imported
    from torch import Tensor

    from nvq.io.safetensors import OutputTensor

SHARED_MODULES = {"compressed_tensors"}  # helpers of several schemes, not schemes
CLI_ORDER = ("nvfp4", "mxfp4", "gptq", "bf16")  # how --scheme lists these; any other module follows


def _scheme_modules() -> tuple[str, ...]:
    # found by file name, without importing them (nvq --help must not import torch)
    found = {m.name for m in pkgutil.iter_modules(__path__)} - SHARED_MODULES
    rank = {name: i for i, name in enumerate(CLI_ORDER)}
    return tuple(sorted(found, key=lambda n: (rank.get(n, len(rank)), n)))


BUILTIN = _scheme_modules()  # this package's scheme modules, in CLI order


class Layout(Protocol):
    """A quantized Linear's container at one group size (nvq.layouts.*)."""

    group_size: int

    def output_tensors(self, module: str, shape: tuple[int, int]) -> list[OutputTensor]: ...

    def shape_problem(self, shape: tuple[int, int]) -> str | None: ...


@dataclass(frozen=True)
class GlobalScale:
    """A per-tensor scale that fusion-group members share: the group's amax comes before any code."""

    suffix: str  # output tensor suffix ("weight_global_scale")
    # amax (in the weights' dtype) -> (global scale, dtype to quantize the group in)
    compute: Callable[[Tensor], tuple[Tensor, Any]]
    # (amax, dtype) -> the same scale by the reference codec, for verify's expected draws
    reference: Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class StreamOps:
    """How the streaming pipeline quantizes with a scheme, row chunk by row chunk.

    quantize(chunk, global scale or None) -> (codes, block scales);
    quantize_experts([E, N, K]) -> (codes, block scales, per-expert global scales or None);
    pack(codes, block scales) -> the output tensors by suffix.
    """

    quantize: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]
    quantize_experts: Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]
    pack: Callable[[Tensor, Tensor], dict[str, Tensor]]
    op: str  # the nvq.ops op whose backend the summary names
    experts_op: str
    global_scale: GlobalScale | None = None


@dataclass(frozen=True)
class Decoder:
    """How a checkpoint stores one quantized Linear in one profile of a scheme.

    marker: the suffix that makes a module quantized; parts: the suffixes decode consumes;
    optional: consumed when present; shape: {suffix: stored shape} -> the dense [N, K].
    format: the container's name for it, where it has one ("nvfp4-pack-quantized").
    """

    marker: str
    parts: tuple[str, ...]
    decode: Callable[[dict[str, Tensor]], Tensor]
    shape: Callable[[dict[str, tuple[int, ...]]], tuple[int, int]]
    optional: tuple[str, ...] = ()
    format: str | None = None


@dataclass(frozen=True)
class SchemeSpec:
    """One scheme's facts. Dense schemes set `dense` and `expected` only.

    group_sizes: what convert may pick, preferred first (one entry: fixed).
    layout(group_size) -> Layout; a group size the scheme cannot take is a RecipeError.
    encode(w, group_size) -> the tensors one whole [N, K] weight becomes, round to nearest.
    stream / whole_model: how convert quantizes, chunk by chunk or over the whole model at once
    (calibrated schemes, with `settings`, the options type of the run).
    decoders: profile -> Decoder, for every producer whose checkpoints verify reads.
    expected(w, storage, groups, global_scale) -> w as the candidate's storage would hold it.
    scale_block(storage, k) -> elements that share one scale along a row.
    storage_names: the candidate storage names this scheme models (dense: one per dtype).
    """

    name: str
    summary: str
    expected: Callable[..., Tensor]
    dense: bool = False
    storage_names: tuple[str, ...] = ()
    group_sizes: tuple[int, ...] = ()
    layout: Callable[[int | None], Layout] | None = None
    encode: Callable[[Tensor, int], dict[str, Tensor]] | None = None
    stream: StreamOps | None = None
    whole_model: Callable[..., Any] | None = None
    settings: type | None = None
    decoders: Mapping[str, Decoder] = field(default_factory=dict)
    scale_block: Callable[[Any, int], int] | None = None
    quantization_config: Callable[[Any, Any], dict] | None = None
    config_copies: tuple[str, ...] = ()  # files that repeat quantization_config for older loaders
    serving_notes: Callable[[str | None], list[str]] = lambda model_dtype: []
    weight_slack: float = 1.0  # how much further from the oracle its weights may legitimately sit
    judge_rows: bool = True  # whether one row's error says anything (not for GPTQ: rows move)
    column_pack: tuple[int, str] | None = None  # outputs packed N at a time along rows, and why

    def __post_init__(self) -> None:
        if not self.storage_names:
            object.__setattr__(self, "storage_names", (self.name,))


# what a quantized scheme must say; a dense one needs `expected` only
QUANTIZED_FIELDS = (
    "group_sizes",
    "layout",
    "encode",
    "decoders",
    "scale_block",
    "quantization_config",
)

_registry: dict[str, SchemeSpec] = {}
_loaded = False


def register(spec: SchemeSpec) -> SchemeSpec:
    """Add a scheme; refuse one that is incomplete or whose name or storage names are taken."""
    missing = [] if spec.dense else [f for f in QUANTIZED_FIELDS if not getattr(spec, f)]
    if not spec.dense and (spec.stream is None) == (spec.whole_model is None):
        missing.append("stream or whole_model (exactly one)")
    if spec.whole_model is not None and spec.settings is None:
        missing.append("settings (whole_model takes them)")
    if not spec.name or not callable(spec.expected):
        missing.append("name and expected")
    if missing:
        raise ValueError(f"scheme {spec.name!r} is incomplete: it lacks {', '.join(missing)}.")
    taken = {n: s.name for s in _registry.values() for n in (s.name, *s.storage_names)}
    clash = [n for n in (spec.name, *spec.storage_names) if n in taken and taken[n] != spec.name]
    if spec.name in _registry or clash:
        raise ValueError(
            f"scheme {spec.name!r}: the name(s) {clash or [spec.name]} are already registered."
        )
    _registry[spec.name] = spec
    return spec


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True  # before the imports: a module that looks a scheme up while loading sees the others
        try:
            for module in BUILTIN:
                importlib.import_module(f"{__name__}.{module}")
        except BaseException:
            _loaded = False
            raise


def all_schemes() -> list[SchemeSpec]:
    """Every scheme, built-in ones in BUILTIN order (whichever module was imported first), then
    the others as registered."""
    _load()
    rank = {name: i for i, name in enumerate(BUILTIN)}
    return sorted(_registry.values(), key=lambda s: rank.get(s.name, len(BUILTIN)))


def names() -> list[str]:
    return [s.name for s in all_schemes()]


def get(name: str) -> SchemeSpec:
    """The scheme called `name`, or a RecipeError naming the schemes there are."""
    _load()
    if name not in _registry:
        raise RecipeError(
            f"scheme '{name}' is not one nvq knows; choose one of {', '.join(names())}."
        )
    return _registry[name]


def quantizing(name: str) -> SchemeSpec:
    """The quantized scheme called `name` (one convert can write from a Hugging Face checkpoint)."""
    _load()
    spec = _registry.get(name)
    if spec is None or spec.dense:
        raise RecipeError(
            f"scheme '{name}' cannot be written by convert yet; choose one of "
            f"{', '.join(quantized_names())}."
        )
    return spec


def quantized_names() -> list[str]:
    return [s.name for s in all_schemes() if not s.dense]


def dense() -> SchemeSpec:
    """The dense scheme: a GGUF file to a dense Hugging Face checkpoint."""
    return next(s for s in all_schemes() if s.dense)


def storing(storage_name: str) -> SchemeSpec:
    """The scheme that models a candidate storage name ("nvfp4", or a dense dtype such as "f32")."""
    spec = next((s for s in all_schemes() if storage_name in s.storage_names), None)
    if spec is None:
        raise KeyError(f"no scheme models storage {storage_name!r}")
    return spec


def fixed_group(name: str, layout: Layout) -> Callable[[int | None], Layout]:
    """`layout` for scheme `name`, whose group size is fixed: another requested size is refused."""

    def at(group_size: int | None) -> Layout:
        if group_size is not None and group_size != layout.group_size:
            choosers = [s.name for s in all_schemes() if len(s.group_sizes) > 1]
            raise RecipeError(
                f"--group-size applies to --scheme {' or '.join(choosers)}; {name} has a fixed "
                f"group size of {layout.group_size}."
            )
        return layout

    return at


def pairs_shape(part: str) -> Callable[[dict[str, tuple[int, ...]]], tuple[int, int]]:
    """FP4 codes packed two to a byte along K: [N, K/2] -> [N, K]."""
    return lambda s: (s[part][0], 2 * s[part][1])
