"""Our own GGUF reader: a fast, validating header parser plus per-tensor dequantization.

gguf-py's `GGUFReader` builds one numpy array per metadata string, which costs seconds on a
256k-token vocabulary (oracle.md §1); this parser walks the header with `struct` and keeps
every value as plain Python, string arrays included. Tensor data is read with positional reads
of exactly the tensor's byte range (never a mapping of the whole file) and dequantized with
`gguf.quants.dequantize`, which is bit-identical with ggml's own `to_float`.

File layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor_count,
u64 kv_count; kv_count × (string key, u32 value type, value); tensor_count × (string name,
u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset); padding to `general.alignment`
(default 32); the data region. Tensor offsets are relative to the data region, aligned, and
`ne[0]` is the innermost (contiguous) axis, so numpy/torch shapes are `ne` reversed.
A string is a u64 byte length followed by UTF-8 bytes; an array is (u32 element type,
u64 count, elements).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nvq.errors import CheckpointError
from nvq.io import gguf_torch
from nvq.io.files import pread_exact

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4


class ValueType(IntEnum):
    """GGUF metadata value types (the same numbering as gguf-py's GGUFValueType)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct / numpy codes of the fixed-size value types.
_SCALAR = {
    ValueType.UINT8: ("<B", "<u1"),
    ValueType.INT8: ("<b", "<i1"),
    ValueType.UINT16: ("<H", "<u2"),
    ValueType.INT16: ("<h", "<i2"),
    ValueType.UINT32: ("<I", "<u4"),
    ValueType.INT32: ("<i", "<i4"),
    ValueType.FLOAT32: ("<f", "<f4"),
    ValueType.BOOL: ("<?", "<u1"),
    ValueType.UINT64: ("<Q", "<u8"),
    ValueType.INT64: ("<q", "<i8"),
    ValueType.FLOAT64: ("<d", "<f8"),
}
_STRUCTS = {t: struct.Struct(code) for t, (code, _) in _SCALAR.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Integer / f64 tensor types gguf-py does not dequantize but that are plain numpy arrays.
_PLAIN_TENSOR_DTYPES = {24: "<i1", 25: "<i2", 26: "<i4", 27: "<i8", 28: "<f8"}  # I8 I16 I32 I64 F64


def _quant_sizes() -> dict[int, tuple[str, int, int]]:
    """ggml type id → (name, block size, bytes per block), from gguf-py's GGML_QUANT_SIZES."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (t.name, bs, ts) for t, (bs, ts) in GGML_QUANT_SIZES.items()}


def dequantizable_types() -> list[str]:
    """Names of the ggml types `GGUFFile.read` can turn into floats (gguf-py 0.19: 26 + I*/F64)."""
    from gguf import quants

    sizes = _quant_sizes()
    ids = {0, 1, *(int(t) for t in quants._type_traits), *_PLAIN_TENSOR_DTYPES}
    return [sizes[i][0] for i in sorted(ids) if i in sizes]


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lives. `ne` is GGUF order (ne[0] innermost); `shape` is numpy order."""

    name: str
    ggml_type: int
    type_name: str
    ne: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int
    path: Path
    block_size: int = 1
    type_size: int = 4

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def numel(self) -> int:
        return math.prod(self.ne)

    @property
    def num_rows(self) -> int:
        """Rows of the 2-D view [prod(ne[1:]), ne[0]]."""
        return math.prod(self.ne[1:])

    @property
    def row_bytes(self) -> int:
        return self.ne[0] // self.block_size * self.type_size


@dataclass
class GGUFFile:
    """A parsed GGUF header: metadata, tensor infos, and lazy per-tensor reads."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    file_size: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[ValueType, ...]]  # key → (type,) or (ARRAY, element type)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        return _parse(Path(path))

    # -- metadata -------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise CheckpointError(f"{self.path} has no 'general.architecture' string in its metadata.")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    # -- tensors --------------------------------------------------------------------------

    def info(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor named '{name}'.") from None

    def raw(self, name: str) -> bytes:
        """The tensor's bytes exactly as stored."""
        t = self.info(name)
        return _pread(t, 0, t.nbytes).tobytes()

    def read(self, name: str, device: torch.device | None = None) -> torch.Tensor:
        """The whole tensor as float32 in numpy/torch order (`ne` reversed)."""
        t = self.info(name)
        return self.read_rows(name, 0, t.num_rows, device).reshape(t.shape)

    def read_rows(self, name: str, start: int, stop: int, device: torch.device | None = None) -> torch.Tensor:
        """Rows start..stop of the 2-D view [prod(ne[1:]), ne[0]] as float32 [stop-start, ne[0]],
        decoded on `device` (default CPU) where torch decodes the type (`nvq.io.gguf_torch`).

        Each row is whole blocks, so any row range is a contiguous, independently decodable
        byte range: converters stream big tensors with it.
        """
        t = self.info(name)
        if not 0 <= start <= stop <= t.num_rows:
            raise ValueError(
                f"rows {start}..{stop} are outside tensor '{name}', which has {t.num_rows} rows."
            )
        data = _pread(t, start * t.row_bytes, (stop - start) * t.row_bytes)
        rows = data.reshape(stop - start, t.row_bytes)
        if t.type_name in gguf_torch.DECODERS:
            return gguf_torch.decode_rows(torch.from_numpy(rows).to(device), t.type_name, t.ne[0])
        return torch.from_numpy(np.ascontiguousarray(_dequantize(t, rows, self.path))).to(device)

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())


def _dequantize(t: GGUFTensor, rows: np.ndarray, path: Path) -> np.ndarray:
    if t.ggml_type in _PLAIN_TENSOR_DTYPES:
        return rows.view(_PLAIN_TENSOR_DTYPES[t.ggml_type]).astype(np.float32)
    from gguf import GGMLQuantizationType, quants

    try:
        out = quants.dequantize(rows, GGMLQuantizationType(t.ggml_type))
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor '{t.name}' has ggml type {t.type_name}, which gguf-py cannot "
            f"dequantize; readable types: {', '.join(dequantizable_types())}."
        ) from None
    return np.asarray(out, dtype=np.float32)


def _pread(t: GGUFTensor, start: int, nbytes: int) -> np.ndarray:
    return pread_exact(t.path, t.offset + start, nbytes, f"tensor '{t.name}'")


# ---------------------------------------------------------------------------------------------
# Header parsing


class _Truncated(Exception):
    pass


class _Cursor:
    """Reads little-endian values from the file's header, bounds-checked against the file size.

    The header is read into a `bytes` buffer that grows on demand (slicing bytes is faster than
    slicing an mmap, and the header of a 256k vocabulary is only megabytes)."""

    __slots__ = ("f", "buf", "pos", "end")

    def __init__(self, f, end: int):
        self.f, self.buf, self.pos, self.end = f, b"", 0, end

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise _Truncated
        if self.pos + n > len(self.buf):
            self._grow(self.pos + n)

    def _grow(self, upto: int) -> None:
        want = min(self.end, max(upto, 2 * len(self.buf), 1 << 20))
        self.f.seek(len(self.buf))
        more = self.f.read(want - len(self.buf))
        if len(self.buf) + len(more) < upto:
            raise _Truncated  # the file shrank while we read it
        self.buf += more

    def u32(self) -> int:
        self.need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, strict: bool = False) -> str:
        n = self.u64()
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8") if strict else raw.decode("utf-8", "replace")

    def scalar(self, vtype: ValueType) -> Any:
        s = _STRUCTS[vtype]
        self.need(s.size)
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def strings(self, count: int) -> list[str]:
        # The hot loop of big vocabularies: locals only, one bounds check per string.
        out = [""] * count
        buf, pos, have, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        for i in range(count):
            if pos + 8 > have:
                self.pos = pos
                self.need(8)
                buf, have = self.buf, len(self.buf)
            (n,) = unpack(buf, pos)
            pos += 8
            stop = pos + n
            if stop > have:
                self.pos = pos
                self.need(n)
                buf, have = self.buf, len(self.buf)
            out[i] = buf[pos:stop].decode("utf-8", "replace")
            pos = stop
        self.pos = pos
        return out

    def array(self, vtype: ValueType, count: int) -> list:
        if vtype == ValueType.STRING:
            # Each string takes at least its 8-byte length: refuse absurd counts before allocating.
            if self.pos + 8 * count > self.end:
                raise _Truncated
            return self.strings(count)
        _, np_code = _SCALAR[vtype]
        size = np.dtype(np_code).itemsize
        self.need(size * count)
        a = np.frombuffer(self.buf, dtype=np_code, count=count, offset=self.pos)
        self.pos += size * count
        return a.astype(bool).tolist() if vtype == ValueType.BOOL else a.tolist()


def _value_type(path: Path, key: str, raw: int) -> ValueType:
    try:
        return ValueType(raw)
    except ValueError:
        raise CheckpointError(
            f"{path}: metadata key '{key}' has value type {raw}, which is not a GGUF type (0-12)."
        ) from None


def _read_value(cur: _Cursor, path: Path, key: str) -> tuple[Any, tuple[ValueType, ...]]:
    vtype = _value_type(path, key, cur.u32())
    if vtype == ValueType.STRING:
        return cur.string(), (vtype,)
    if vtype != ValueType.ARRAY:
        return cur.scalar(vtype), (vtype,)
    etype = _value_type(path, key, cur.u32())
    count = cur.u64()
    if etype == ValueType.ARRAY:
        raise CheckpointError(f"{path}: metadata key '{key}' is an array of arrays, which nvq does not read.")
    return cur.array(etype, count), (vtype, etype)


def _parse(path: Path) -> GGUFFile:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}.") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise CheckpointError(
                f"{path} is not a GGUF file: it holds {size} bytes, fewer than the 24-byte header."
            )
        head = f.read(4)
        if head != GGUF_MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file: it starts with {head!r}, not b'GGUF'.")
        cur = _Cursor(f, size)
        cur.pos = 4
        try:
            return _parse_header(path, cur, size)
        except _Truncated:
            raise CheckpointError(
                f"{path} is truncated or corrupt: its header runs past the end of the "
                f"{size}-byte file (at byte {cur.pos})."
            ) from None
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read: {e.strerror or e}.") from e


def _parse_header(path: Path, cur: _Cursor, size: int) -> GGUFFile:
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version >> 24 in SUPPORTED_VERSIONS:
            raise CheckpointError(
                f"{path} is a big-endian GGUF; nvq reads little-endian files (gguf-convert-endian "
                f"converts it)."
            )
        raise CheckpointError(
            f"{path} is GGUF version {version}; nvq reads versions {', '.join(map(str, SUPPORTED_VERSIONS))}."
        )
    n_tensors, n_kv = cur.u64(), cur.u64()
    # Every kv takes ≥ 12 bytes and every tensor info ≥ 24: refuse counts the file cannot hold.
    if 12 * n_kv + 24 * n_tensors > size:
        raise CheckpointError(
            f"{path} is corrupt: its header claims {n_kv} metadata keys and {n_tensors} tensors, "
            f"more than a {size}-byte file can hold."
        )

    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[ValueType, ...]] = {}
    for _ in range(n_kv):
        try:
            key = cur.string(strict=True)
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: a metadata key at byte {cur.pos} is not UTF-8.") from None
        if key in metadata:
            raise CheckpointError(f"{path}: metadata key '{key}' appears twice.")
        metadata[key], value_types[key] = _read_value(cur, path, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        "general.alignment" in metadata
        and value_types["general.alignment"] != (ValueType.UINT32,)
    ) or not (isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0):
        raise CheckpointError(
            f"{path}: general.alignment is {alignment!r}; it must be a power-of-two u32."
        )

    sizes = _quant_sizes()
    raw_infos = []
    for _ in range(n_tensors):
        try:
            name = cur.string(strict=True)
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: a tensor name at byte {cur.pos} is not UTF-8.") from None
        n_dims = cur.u32()
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise CheckpointError(
                f"{path}: tensor '{name}' has {n_dims} dimensions; GGUF allows 1 to {GGML_MAX_DIMS}."
            )
        ne = tuple(cur.u64() for _ in range(n_dims))
        ggml_type = cur.u32()
        offset = cur.u64()
        raw_infos.append((name, ne, ggml_type, offset))

    data_offset = cur.pos + (-cur.pos % alignment)
    tensors: dict[str, GGUFTensor] = {}
    for name, ne, ggml_type, offset in raw_infos:
        if not name.isprintable():
            raise CheckpointError(f"{path}: tensor name {ascii(name)} holds control characters; names are printable text.")
        where = f"{path}: tensor '{name}'"
        if name in tensors:
            raise CheckpointError(f"{path}: tensor '{name}' is listed twice.")
        if ggml_type not in sizes:
            raise CheckpointError(
                f"{where} has ggml type {ggml_type}, which gguf-py {_gguf_version()} does not know; "
                f"readable types: {', '.join(dequantizable_types())}."
            )
        type_name, block, type_size = sizes[ggml_type]
        if any(d >= 1 << 62 for d in ne) or math.prod(ne) >= 1 << 62:
            raise CheckpointError(f"{where} has dimensions {list(ne)}, too large for any file.")
        if 0 in ne:  # an empty weight is no part of a model, and every row reader divides by ne[0]
            raise CheckpointError(f"{where} has dimensions {list(ne)}; every dimension must be at least 1.")
        if ne[0] % block:
            raise CheckpointError(
                f"{where} has ne[0] = {ne[0]}, not a multiple of {type_name}'s block of {block} elements."
            )
        nbytes = math.prod(ne[1:]) * (ne[0] // block) * type_size
        if offset % alignment:
            raise CheckpointError(
                f"{where} starts at data offset {offset}, not a multiple of the file's alignment {alignment}."
            )
        start = data_offset + offset
        if start + nbytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor '{name}' ({type_name} {list(ne)}) needs bytes "
                f"{start}..{start + nbytes} but the file holds {size}."
            )
        tensors[name] = GGUFTensor(
            name, ggml_type, type_name, ne, start, nbytes, path, block, type_size
        )

    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise CheckpointError(
                f"{path}: tensors '{name_a}' and '{name_b}' overlap (bytes {begin_b}..{end_a})."
            )
    return GGUFFile(
        path=path, version=version, alignment=alignment, data_offset=data_offset, file_size=size,
        metadata=metadata, value_types=value_types, tensors=tensors,
    )  # fmt: skip


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001 - only used in a message
        return "(installed)"


def is_gguf(path: str | Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic (or is named *.gguf)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
