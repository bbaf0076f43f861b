"""A GGUF model read in nvq's canonical convention: GGUF names, Hugging Face values, float32.

Architecture decision 2: conventions are undone once, here. Llama's attn_q / attn_k rows are
un-permuted, Gemma-1..3 norms lose their +1, a fused attn_qkv is split into attn_q / attn_k /
attn_v, and tensors that llama.cpp generates (Gemma-4 `rope_freqs`) are consumed into the config
instead of being returned. Tied embeddings show as a missing `output.weight` and
`tie_word_embeddings: true` in the config.

Everything streams: `GGUFModel.units` says what each canonical tensor is made of, `read(unit)`
converts one tensor, `read_rows(unit, a, b)` some of its rows, and `chunks(unit)` yields it a few
row blocks at a time, so a converter never holds more than one chunk. `GGUFSource` is the lazy
`Mapping` view the reference forward reads from; `load_canonical` is the small-model convenience
that materialises it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvq.errors import CheckpointError, ConfigError
from nvq.io.gguf import GGUFFile
from nvq.io.gguf_cells import Cells, is_exact, read_cells
from nvq.io.gguf_config import ArchSpec, Fix, Unpermute, head_rows, hf_config
from nvq.io.rows import read_row_set
from nvq.models import for_gguf

CHUNK_ELEMENTS = 1 << 24  # float32 elements per chunk: 64 MiB
_QKV = re.compile(r"blk\.(?P<bid>\d+)\.attn_qkv\.(?P<kind>weight|bias)")
_BID = re.compile(r"blk\.(?P<bid>\d+)\.")


@dataclass(frozen=True)
class Unit:
    """One canonical tensor: rows `rows` of GGUF tensor `source` (of its 2-D view [prod(ne[1:]),
    ne[0]]; of its elements when it is 1-D), with `fix` undone."""

    canonical: str
    source: str
    rows: tuple[int, int]
    shape: tuple[int, ...]  # numpy order
    bid: int | None = None
    fix: Fix | None = None
    dims: tuple[int, int, int] | None = None  # (n_head, n_kv_head, head_dim) of layer `bid`

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFModel:
    path: Path
    gguf: GGUFFile
    arch_name: str  # the nvq.models module that reads it ("llama", "gemma3", "gemma4", ...)
    spec: ArchSpec
    config: dict  # HF-style config.json of the causal-LM class
    units: list[Unit]
    consumed: dict[str, str] = field(default_factory=dict)  # GGUF tensor → why it is not a weight
    device: torch.device | None = None  # where rows are decoded (None: the host)

    @classmethod
    def open(cls, path: str | Path) -> GGUFModel:
        gf = GGUFFile.open(path)
        arch_name, spec = for_gguf(gf)
        config = hf_config(gf, spec)
        units, consumed = _plan(gf, spec, config)
        return cls(Path(path), gf, arch_name, spec, config, units, consumed)

    def source_bytes(self, unit: Unit, rows: int) -> int:
        info = self.gguf.info(unit.source)
        if len(info.ne) == 1:
            return info.nbytes * rows // max(info.ne[0], 1)
        return rows * info.row_bytes

    def chunks(self, unit: Unit, max_elements: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(source rows read, float32 chunk) pairs covering the unit in order, conventions undone.
        Chunks of a tensor of 2 or more dims are [rows, ne[0]] of about `max_elements` (default
        CHUNK_ELEMENTS) elements, whole heads where a fix works per head; a 1-D unit comes whole."""
        max_elements = max_elements or CHUNK_ELEMENTS
        info = self.gguf.info(unit.source)
        first, last = unit.rows
        if len(info.ne) == 1:
            x = self.gguf.read(unit.source, self.device)[first:last]
            yield last - first, self._fix(unit, x)
            return
        row_len = info.ne[0]
        group = unit.fix.transform.group_rows(unit.dims) if unit.fix else 1
        step = max(group, (max_elements // max(row_len, 1)) // group * group)
        for a in range(first, last, step):
            b = min(a + step, last)
            yield b - a, self._fix(unit, self.gguf.read_rows(unit.source, a, b, self.device))

    def read(self, unit: Unit) -> torch.Tensor:
        """The whole canonical tensor: dequantized, conventions undone, float32."""
        parts = [x for _, x in self.chunks(unit)]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x.reshape(unit.shape)

    def storage(self, unit: Unit) -> str:
        """The ggml type the unit is stored in ("F32", "Q8_0", ...)."""
        return self.gguf.info(unit.source).type_name

    def read_cells(self, unit: Unit) -> Cells | None:
        """The rounding cells of the unit's values (nvq.io.gguf_cells), in the canonical row order;
        None when its type stores values exactly. A value shift (Gemma-3 norms) moves a cell's
        centre, not its edges, so only row permutations are applied."""
        if is_exact(self.storage(unit)):
            return None
        info = self.gguf.info(unit.source)
        first, last = unit.rows
        if len(info.ne) == 1:
            values = self.gguf.read(unit.source, self.device)[first:last].reshape(1, -1)
            cells = read_cells(self.gguf, unit.source, 0, 1, values)
            return None if cells is None else _reshaped(cells, unit.shape)
        parts, step = [], max(1, CHUNK_ELEMENTS // max(info.ne[0], 1))
        for a in range(first, last, step):
            b = min(a + step, last)
            parts.append(read_cells(self.gguf, unit.source, a, b, self.gguf.read_rows(unit.source, a, b, self.device)))
        lower, upper = torch.cat([c.lower for c in parts]), torch.cat([c.upper for c in parts])
        if unit.fix is not None and isinstance(unit.fix.transform, Unpermute):
            lower, upper = unit.fix.transform(lower, unit.dims), unit.fix.transform(upper, unit.dims)
        return _reshaped(Cells(lower, upper, any(c.approximate for c in parts)), unit.shape)

    def read_rows(self, unit: Unit, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the unit's 2-D view [prod(shape[:-1]), shape[-1]] (elements of a
        1-D unit), conventions undone. A per-head fix needs whole heads, so the heads around the
        range are read and the range is cut out of them; quantized rows are whole blocks, so
        the rows are exact."""
        first, last = unit.rows
        if not 0 <= start <= stop <= last - first:
            raise ValueError(
                f"rows {start}..{stop} are outside tensor '{unit.canonical}', which has "
                f"{last - first} rows."
            )
        group = unit.fix.transform.group_rows(unit.dims) if unit.fix else 1
        a, b = start - start % group, min(-(-stop // group) * group, last - first)
        if len(self.gguf.info(unit.source).ne) == 1:
            x = self.gguf.read(unit.source, self.device)[first + a : first + b]
        else:
            x = self.gguf.read_rows(unit.source, first + a, first + b, self.device)
        return self._fix(unit, x)[start - a : stop - a]

    def read_cell_rows(self, unit: Unit, start: int, stop: int) -> Cells | None:
        """`read_cells` of rows [start, stop) of the unit's 2-D view only."""
        if is_exact(self.storage(unit)):
            return None
        info = self.gguf.info(unit.source)
        if len(info.ne) == 1:
            cells = self.read_cells(unit)
            return None if cells is None else Cells(cells.lower.reshape(-1)[start:stop],
                                                    cells.upper.reshape(-1)[start:stop], cells.approximate)
        first = unit.rows[0]
        group = unit.fix.transform.group_rows(unit.dims) if unit.fix else 1
        a, b = start - start % group, min(-(-stop // group) * group, unit.rows[1] - first)
        cells = read_cells(self.gguf, unit.source, first + a, first + b,
                           self.gguf.read_rows(unit.source, first + a, first + b, self.device))
        lower, upper = cells.lower, cells.upper
        if unit.fix is not None and isinstance(unit.fix.transform, Unpermute):
            lower, upper = unit.fix.transform(lower, unit.dims), unit.fix.transform(upper, unit.dims)
        return Cells(lower[start - a : stop - a], upper[start - a : stop - a], cells.approximate)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for unit in self.units:
            yield unit.canonical, self.read(unit)

    @staticmethod
    def _fix(unit: Unit, x: torch.Tensor) -> torch.Tensor:
        return unit.fix.transform(x, unit.dims) if unit.fix else x


def _reshaped(cells: Cells, shape: tuple[int, ...]) -> Cells:
    return Cells(cells.lower.reshape(shape), cells.upper.reshape(shape), cells.approximate)

class GGUFSource(Mapping[str, torch.Tensor]):
    """A GGUF model as {canonical name: float32 tensor}, each tensor read from the file when it is
    accessed (positional reads of its bytes only) and never kept: holding it is the caller's
    choice. Beside `[]`, partial reads for the streamed forward (nvq.models.layers.Weights):
    `rows(name, ids)` (embedding lookup), `row_block(name, start, stop)` (LM head chunks) and
    `expert(name, e)` (one expert of a fused stack); `storage(name)` is the ggml type it is
    stored in ("F16", "Q8_0"). `exclude` hides tensors the model never reads."""

    def __init__(self, model: GGUFModel, exclude: Iterable[str] = ()) -> None:
        hidden = set(exclude)
        self.model = model
        self._units = {u.canonical: u for u in model.units if u.canonical not in hidden}

    @classmethod
    def open(cls, path: str | Path, exclude: Iterable[str] = ()) -> GGUFSource:
        return cls(GGUFModel.open(path), exclude)

    @property
    def arch_name(self) -> str:
        return self.model.arch_name

    @property
    def config(self) -> dict:
        return self.model.config

    def unit(self, name: str) -> Unit:
        try:
            return self._units[name]
        except KeyError:
            raise KeyError(f"{self.model.path} has no tensor '{name}' (canonical name)") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.model.read(self.unit(name))

    def __contains__(self, name: object) -> bool:
        return name in self._units  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def decode_on(self, device: torch.device) -> None:
        """Decode rows on `device` from now on: a GPU turns an 8B model's F16 into float32 many
        times faster than numpy on the host (`nvq.io.gguf_torch`)."""
        self.model.device = torch.device(device)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.unit(name).shape

    def storage(self, name: str) -> str:
        return self.model.storage(self.unit(name))

    def cells(self, name: str) -> Cells | None:
        """Rounding cells of the tensor's values (None when stored exactly)."""
        return self.model.read_cells(self.unit(name))

    def cell_rows(self, name: str, start: int, stop: int) -> Cells | None:
        """Rounding cells of rows [start, stop) of the tensor's 2-D view."""
        return self.model.read_cell_rows(self.unit(name), start, stop)

    @property
    def lossy(self) -> bool:
        """Whether any tensor is stored in a type that rounds (has cells)."""
        return any(not is_exact(self.storage(n)) for n in self)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any order, repeats allowed) of a 2-D tensor, reading only those rows."""
        unit = self.unit(name)
        return read_row_set(lambda a, b: self.model.read_rows(unit, a, b), ids)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor's 2-D view."""
        return self.model.read_rows(self.unit(name), start, stop)

    def expert(self, name: str, e: int) -> torch.Tensor:
        """Expert e `[rows, cols]` of a fused `[E, rows, cols]` stack."""
        unit = self.unit(name)
        if len(unit.shape) != 3 or not 0 <= e < unit.shape[0]:
            raise ValueError(f"tensor '{name}' of shape {list(unit.shape)} has no expert {e}.")
        n = unit.shape[1]
        return self.model.read_rows(unit, e * n, (e + 1) * n).reshape(unit.shape[1:])


def load_canonical(path: str | Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(architecture module name, HF-style config dict, {canonical name: float32 tensor}).

    Values follow HF conventions (no Q/K permutation, Gemma-3 norms without +1); names are
    GGUF's. The whole model is materialised: for big models read through `GGUFSource`.
    """
    source = GGUFSource.open(path)
    return source.arch_name, source.config, dict(source.items())


@dataclass
class CanonicalGGUF:
    """A whole GGUF in canonical form, with how each tensor was stored and its rounding cells."""

    arch_name: str
    config: dict
    tensors: dict[str, torch.Tensor]
    storage: dict[str, str]  # canonical name -> ggml type name
    cells: dict[str, Cells]  # canonical name -> cells, for tensors stored lossily
    metadata: dict  # the GGUF's metadata keys, as read


def load_canonical_with_cells(path: str | Path) -> CanonicalGGUF:
    model = GGUFModel.open(path)
    tensors, storage, cells = {}, {}, {}
    for unit in model.units:
        tensors[unit.canonical] = model.read(unit)
        storage[unit.canonical] = model.storage(unit)
        c = model.read_cells(unit)
        if c is not None:
            cells[unit.canonical] = c
    return CanonicalGGUF(model.arch_name, model.config, tensors, storage, cells, dict(model.gguf.metadata))


def _plan(gf: GGUFFile, spec: ArchSpec, config: dict) -> tuple[list[Unit], dict[str, str]]:
    units: list[Unit] = []
    consumed: dict[str, str] = {}
    for info in gf:
        if info.name in spec.consumed:
            consumed[info.name] = spec.consumed[info.name]
            continue
        m = _BID.match(info.name)
        bid = int(m["bid"]) if m else None
        dims = _dims(gf, spec, config, bid, info.name) if bid is not None else None
        qkv = _QKV.fullmatch(info.name)
        if qkv:
            units.extend(_split_qkv(gf, spec, info, bid, dims, qkv["kind"]))
            continue
        n_rows = info.ne[0] if len(info.ne) == 1 else info.num_rows
        units.append(_unit(gf, spec, info.name, info.name, (0, n_rows), info.shape, bid, dims))
    seen: dict[str, str] = {}
    for u in units:
        if u.canonical in seen:
            raise CheckpointError(
                f"{gf.path}: tensors '{seen[u.canonical]}' and '{u.source}' both give '{u.canonical}'."
            )
        seen[u.canonical] = u.source
    return units, consumed


def _dims(gf: GGUFFile, spec: ArchSpec, config: dict, bid: int, name: str) -> tuple[int, int, int]:
    if not 0 <= bid < config["num_hidden_layers"]:
        raise CheckpointError(
            f"{gf.path}: tensor '{name}' belongs to block {bid}, but the model has "
            f"{config['num_hidden_layers']} blocks."
        )
    return spec.attn_dims(config, bid)


def _unit(gf, spec, canonical, source, rows, shape, bid, dims) -> Unit:
    fix = next((f for f in spec.fixes if f.matches(canonical)), None)
    if fix is not None and isinstance(fix.transform, Unpermute):
        n_head, n_kv, d = dims
        heads = n_head if fix.transform.heads == "q" else n_kv
        if shape[0] != heads * d or d % 2:
            raise ConfigError(
                f"{gf.path}: tensor '{canonical}' has {shape[0]} rows, but {heads} heads of "
                f"{d} rows are expected; the metadata's head counts do not fit the tensors."
            )
    return Unit(canonical, source, rows, tuple(shape), bid, fix, dims)


def _split_qkv(gf, spec, info, bid, dims, kind) -> list[Unit]:
    """A fused attn_qkv (converter --fuse-qkv) = cat(q, k, v) along rows (gemma4.md §4.1)."""
    q, k, v = head_rows(dims)
    total = info.shape[0]
    if q + k + v != total:
        raise CheckpointError(
            f"{gf.path}: tensor '{info.name}' has {total} rows; q + k + v of {dims[0]} heads, "
            f"{dims[1]} KV heads and head_dim {dims[2]} make {q + k + v}."
        )
    out, start = [], 0
    for part, n in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
        shape = (n, *info.shape[1:])
        name = f"blk.{bid}.{part}.{kind}"
        out.append(_unit(gf, spec, name, info.name, (start, start + n), shape, bid, dims))
        start += n
    return out
