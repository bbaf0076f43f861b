"""Our own safetensors reader and sharded writer, built for streaming.

Reads copy rows with positional reads into fresh tensors that own their memory: no mmap, so
converting a model holds only the rows in flight, and mapped file pages never count in RSS.
The writer creates every shard at full size up front and fills each tensor with positional
writes, in any order across tensors. It lays out header and data as `safetensors.torch.save_file`
does (its bytes are equal when "format" is the only metadata key), except that metadata keys are
sorted: save_file emits them in Rust HashMap order, which changes from run to run.

File layout: 8-byte little-endian header length N, N bytes of JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data
region; data_offsets are relative to the start of the data region.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from nvq.errors import CheckpointError
from nvq.io.files import pread_exact

# safetensors refuses headers above 100 MB (MAX_HEADER_SIZE in its tensor.rs); so do we, before
# allocating anything for a length field that may be garbage.
MAX_HEADER_BYTES = 100_000_000
# Parsing costs about 40 µs and 3 KB per tensor entry, so a 100 MB header of tiny entries takes a
# minute and gigabytes. Real shards hold at most some tens of thousands of tensors.
MAX_TENSORS_PER_FILE = 100_000

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class DType(NamedTuple):
    torch: torch.dtype
    itemsize: int


# Listed in safetensors' layout order (its Dtype enum, descending): save_file stores larger items
# first, so every tensor lands naturally aligned with no padding. The writer follows this order.
DTYPES: dict[str, DType] = {
    "U64": DType(torch.uint64, 8),
    "I64": DType(torch.int64, 8),
    "F64": DType(torch.float64, 8),
    "F32": DType(torch.float32, 4),
    "U32": DType(torch.uint32, 4),
    "I32": DType(torch.int32, 4),
    "BF16": DType(torch.bfloat16, 2),
    "F16": DType(torch.float16, 2),
    "U16": DType(torch.uint16, 2),
    "I16": DType(torch.int16, 2),
    "F8_E4M3": DType(torch.float8_e4m3fn, 1),
    "F8_E5M2": DType(torch.float8_e5m2, 1),
    "I8": DType(torch.int8, 1),
    "U8": DType(torch.uint8, 1),
    "BOOL": DType(torch.bool, 1),
}
_LAYOUT_RANK = {code: rank for rank, code in enumerate(DTYPES)}
_CODE_OF_TORCH = {d.torch: code for code, d in DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype ("BF16" for torch.bfloat16)."""
    try:
        return _CODE_OF_TORCH[dtype]
    except KeyError:
        raise ValueError(
            f"torch dtype {dtype} has no safetensors code; allowed: {', '.join(DTYPES)}"
        ) from None


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


def _size(n: int) -> str:
    if n < 1 << 20:
        return f"{n} bytes"
    return f"{n} bytes ({n / (1 << 20):.1f} MiB)"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `offset` is absolute in the file, `nbytes` its data size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype].torch

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_rows(self) -> int:
        """Rows of the 2-D view [prod(shape[:-1]), shape[-1]]; elements for 0-D and 1-D tensors."""
        return math.prod(self.shape[:-1]) if len(self.shape) >= 2 else self.numel


# ---------------------------------------------------------------------------------------------
# Reading


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header.

    Returns the tensors in header order and the `__metadata__` map. Raises CheckpointError when
    the file is not safetensors, is truncated, or its header disagrees with itself or the data:
    unknown dtype, sizes that do not match shape x dtype, overlapping offsets, offsets past the
    end, or data bytes that no tensor covers (safetensors itself refuses such files).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise CheckpointError(
                    f"{path} is not a safetensors file: it holds {file_size} bytes, fewer than "
                    f"the 8-byte header length field."
                )
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path} is not a safetensors file: its header length field says "
                    f"{header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit."
                )
            if header_len > file_size - 8:
                raise CheckpointError(
                    f"{path} is truncated: its header length field says {_size(header_len)} "
                    f"but only {_size(file_size - 8)} follow it."
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}.") from e

    entries = raw.count(b'"data_offsets"')  # a C-speed count, before any JSON object is built
    if entries > MAX_TENSORS_PER_FILE:
        raise CheckpointError(
            f"{path}: its header describes {entries} tensors, more than the {MAX_TENSORS_PER_FILE} "
            f"nvq reads from one file."
        )
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{path} is not a safetensors file: its {header_len}-byte header is not UTF-8 text."
        ) from None
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: the header names '{e.key}' twice.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not a safetensors file: its header is not valid JSON "
            f"({e.msg} at line {e.lineno} column {e.colno})."
        ) from None
    except (RecursionError, ValueError) as e:  # nesting too deep, integers too long
        raise CheckpointError(f"{path} is not a safetensors file: its header cannot be parsed ({e}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} is not a safetensors file: its header is a JSON "
            f"{type(header).__name__}, not an object."
        )

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: the header's __metadata__ must map strings to strings.")

    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 output can print.
        if not name.isprintable():
            raise CheckpointError(f"{path}: tensor name {ascii(name)} holds control characters or lone "
                                  "surrogates; names are printable UTF-8 text.")
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has a header entry that is not a JSON object.")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(
                f"{where} has unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}."
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(
                f"{where} has shape {shape!r}; a shape is a list of non-negative integers."
            )
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(
                f"{where} has data_offsets {offsets!r}; they must be [begin, end] with "
                f"0 <= begin <= end."
            )
        begin, end = offsets
        shape_t = tuple(shape)
        need = _nbytes(dtype, shape_t)
        if end - begin != need:
            raise CheckpointError(
                f"{where} claims {end - begin} bytes (data_offsets [{begin}, {end}]) but its "
                f"shape {list(shape_t)} of {dtype} needs {need}."
            )
        tensors[name] = TensorInfo(name, dtype, shape_t, path, data_start + begin, need)
        spans.append((begin, end, name))

    spans.sort()
    cursor, prev = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            raise CheckpointError(
                f"{path}: tensors '{prev}' and '{name}' overlap (data bytes {begin}..{cursor})."
            )
        if begin > cursor:
            raise CheckpointError(
                f"{path}: data bytes {cursor}..{begin} before tensor '{name}' belong to no "
                f"tensor; safetensors requires the tensors to tile the data region."
            )
        cursor, prev = end, name
    if cursor > data_size:
        raise CheckpointError(
            f"{path} is truncated: its header says {_size(cursor)} of tensor data (tensor "
            f"'{prev}' ends there) but the file holds {_size(data_size)}."
        )
    if cursor < data_size:
        raise CheckpointError(
            f"{path}: its last {data_size - cursor} bytes belong to no tensor; safetensors "
            f"requires the tensors to tile the data region exactly."
        )
    return tensors, metadata


def _read_bytes(info: TensorInfo, start: int, nbytes: int) -> torch.Tensor:
    """nbytes from `start` (relative to the tensor) into a fresh uint8 tensor that owns them."""
    if nbytes == 0:  # numpy's empty array converts with stride 0, which later views reject
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(pread_exact(info.path, info.offset + start, nbytes, f"tensor '{info.name}'"))


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The whole tensor, in a fresh CPU buffer that it owns (never mapped from the file)."""
    return _read_bytes(info, 0, info.nbytes).view(info.torch_dtype).reshape(info.shape)


def read_rows(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of the tensor's 2-D view [prod(shape[:-1]), shape[-1]].

    For a 3-D expert stack [E, R, C], rows e*R..(e+1)*R are expert e. The result has shape
    [stop - start, shape[-1]]; for 0-D and 1-D tensors rows are elements and the result is 1-D.
    """
    if not 0 <= start <= stop <= info.num_rows:
        raise ValueError(
            f"rows {start}..{stop} are outside tensor '{info.name}', which has "
            f"{info.num_rows} rows (shape {list(info.shape)})."
        )
    row_len = info.shape[-1] if len(info.shape) >= 2 else 1
    row_bytes = row_len * DTYPES[info.dtype].itemsize
    data = _read_bytes(info, start * row_bytes, (stop - start) * row_bytes)
    data = data.view(info.torch_dtype)
    return data.reshape(stop - start, row_len) if len(info.shape) >= 2 else data


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


@dataclass
class _Slot:
    """One planned tensor: its shard, absolute file offset, and how many bytes are written."""

    tensor: OutputTensor
    shard: int
    offset: int
    written: int = 0


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _header_bytes(entries: list[tuple[OutputTensor, int]], metadata: dict[str, str]) -> bytes:
    # Compact JSON, __metadata__ first with sorted keys, tensors in data order, spaces to a
    # multiple of 8: what safetensors writes, so the data region (and every tensor) is aligned.
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    for t, begin in entries:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [begin, begin + t.nbytes],
        }
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardedWriter:
    """Write a planned set of tensors into safetensors shards with positional writes.

    Tensors go to shards greedily in the given order: a new shard starts when the next tensor
    would push the current one past `max_shard_bytes` of data (a tensor larger than the limit
    gets a shard of its own). Call `write(name, chunk)` any number of times per tensor, whole
    rows in order, tensors in any order; then `close()`. Used as a context manager, an exception
    closes the files without the completeness check.

    Ranks of a distributed run share one layout: rank 0 creates the files (`create=True`), the
    others open them after a barrier (`create=False`); each writes and checks only the tensors
    it `owns`, at the same offsets, so the files equal those of a single-process run. Only the
    creator writes the index. A shard is fsynced as soon as its owned bytes are all written.
    """

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        *,
        create: bool = True,
        owned: set[str] | None = None,
    ):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
        meta = dict(metadata or {})
        if meta.get("format", "pt") != "pt":
            raise ValueError(f"metadata 'format' must be 'pt', got {meta['format']!r}.")
        meta["format"] = "pt"
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata must map str to str; got {k!r}: {v!r}.")
        seen: set[str] = set()
        for t in tensors:
            if t.dtype not in DTYPES:
                raise ValueError(
                    f"tensor '{t.name}' has dtype {t.dtype!r}; allowed: {', '.join(DTYPES)}."
                )
            if not all(_is_count(d) for d in t.shape):
                raise ValueError(f"tensor '{t.name}' has invalid shape {t.shape!r}.")
            if (
                not isinstance(t.name, str)
                or not t.name
                or t.name in seen
                or t.name == "__metadata__"
            ):
                raise ValueError(f"tensor name {t.name!r} is empty, reserved or repeated.")
            seen.add(t.name)

        groups: list[list[OutputTensor]] = []
        size = 0
        for t in tensors:
            if not groups or (groups[-1] and size + t.nbytes > max_shard_bytes):
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        if not groups:
            groups.append([])

        self.out_dir = Path(out_dir)
        self.metadata = meta
        self.files: list[Path] = [self.out_dir / n for n in shard_names(len(groups))]
        self._slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._state = "open"  # -> "closed" after a checked close, "aborted" otherwise
        self._creator = create
        if create:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            for shard, (group, file) in enumerate(zip(groups, self.files, strict=True)):
                ordered = sorted(group, key=lambda t: (_LAYOUT_RANK[t.dtype], t.name))
                entries, begin = [], 0
                for t in ordered:
                    entries.append((t, begin))
                    begin += t.nbytes
                head = _header_bytes(entries, meta)
                for t, rel in entries:
                    self._slots[t.name] = _Slot(t, shard, len(head) + rel)
                if create:
                    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                    self._fds.append(fd)
                    _pwrite_all(fd, memoryview(head), 0)
                    os.ftruncate(fd, len(head) + begin)
                else:
                    self._fds.append(os.open(file, os.O_RDWR))
        except BaseException:
            self.abort()
            raise
        self.weight_map = {name: self.files[s.shard].name for name, s in self._slots.items()}
        self._owned = set(self._slots) if owned is None else set(owned)
        unknown = self._owned - set(self._slots)
        if unknown:
            self.abort()
            raise KeyError(f"owned tensor(s) {sorted(unknown)[:3]} were not planned for this writer.")
        # Bytes still to write per shard; a shard is fsynced when its count reaches 0.
        self._unwritten = [0] * len(self.files)
        self._synced: set[int] = set()
        for name in self._owned:
            self._unwritten[self._slots[name].shard] += self._slots[name].tensor.nbytes

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append `chunk` (whole rows, the tensor's dtype) to tensor `name` at its cursor."""
        if self._state != "open":
            raise RuntimeError(f"write to tensor '{name}' after the writer was {self._state}.")
        slot = self._slots.get(name)
        if slot is None or name not in self._owned:
            raise KeyError(f"tensor '{name}' was not planned for this writer.")
        t = slot.tensor
        want = DTYPES[t.dtype].torch
        if chunk.dtype != want:
            raise ValueError(f"tensor '{name}' is {t.dtype} ({want}); got a {chunk.dtype} chunk.")
        if len(t.shape) >= 2 and chunk.dim() >= 1 and chunk.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"tensor '{name}' has rows of {t.shape[-1]} elements; got a chunk of shape "
                f"{list(chunk.shape)}."
            )
        data = chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if slot.written + data.numel() > t.nbytes:
            raise ValueError(
                f"tensor '{name}' holds {t.nbytes} bytes; this chunk of {data.numel()} would "
                f"end at byte {slot.written + data.numel()}."
            )
        _pwrite_all(self._fds[slot.shard], memoryview(data.numpy()), slot.offset + slot.written)
        _start_writeback(self._fds[slot.shard], slot.offset + slot.written, data.numel())
        slot.written += data.numel()
        self._unwritten[slot.shard] -= data.numel()
        if self._unwritten[slot.shard] == 0 and data.numel():
            os.fsync(self._fds[slot.shard])  # while later shards are still being computed
            self._synced.add(slot.shard)

    def close(self) -> list[Path]:
        """Check every tensor is complete, fsync, write the index if sharded; return the files."""
        if self._state == "closed":
            return self.written_files
        if self._state == "aborted":
            raise RuntimeError("close() after the writer was aborted; its files are incomplete.")
        for name in self._owned:
            slot = self._slots[name]
            if slot.written != slot.tensor.nbytes:
                self.abort()
                raise RuntimeError(
                    f"internal error: tensor '{name}' got {slot.written} of its "
                    f"{slot.tensor.nbytes} bytes before the writer was closed."
                )
        for shard, fd in enumerate(self._fds):
            if shard not in self._synced:
                os.fsync(fd)
        self._close_fds()
        self._state = "closed"
        if len(self.files) > 1 and self._creator:
            index = {
                "metadata": {"total_size": sum(s.tensor.nbytes for s in self._slots.values())},
                "weight_map": self.weight_map,
            }
            path = self.out_dir / INDEX_NAME
            with open(path, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        return self.written_files

    @property
    def written_files(self) -> list[Path]:
        extra = [self.out_dir / INDEX_NAME] if len(self.files) > 1 else []
        return [*self.files, *extra]

    def abort(self) -> None:
        """Close the files without checks; the caller discards the directory."""
        if self._state == "open":
            self._state = "aborted"
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_MIN_BYTES = 4 << 20


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_RANGE = _sync_file_range() if sys.platform.startswith("linux") else None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask Linux to start writing these pages to disk now, without waiting, so the fsync at the
    end of a shard finds little left to flush instead of the whole shard."""
    if _SYNC_RANGE is not None and nbytes >= _WRITEBACK_MIN_BYTES:
        _SYNC_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: errors are ignored


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)
