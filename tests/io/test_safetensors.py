import hashlib
import json
import math
import random
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvq.errors import CheckpointError
from nvq.io.safetensors import (
    DTYPES,
    INDEX_NAME,
    OutputTensor,
    ShardedWriter,
    dtype_code,
    read_header,
    read_rows,
    read_tensor,
)

SHAPES = [(5, 7), (2, 3, 4), (9,), (), (0, 4), (3, 1)]


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes viewed as `dtype` (any bit pattern, NaN included: compare as bytes)."""
    item = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (math.prod(shape) * item,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _all_dtype_tensors() -> dict[str, torch.Tensor]:
    out = {}
    for i, (code, d) in enumerate(DTYPES.items()):
        shape = SHAPES[i % len(SHAPES)]
        out[f"t.{code.lower()}"] = _random(d.torch, shape, seed=i)
    out["z.bf16.big"] = _random(torch.bfloat16, (16, 32), seed=99)
    out["a.f8.experts"] = _random(torch.float8_e4m3fn, (3, 4, 8), seed=98)
    return out


def _plan(tensors: dict[str, torch.Tensor]) -> list[OutputTensor]:
    return [OutputTensor(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()]


def _write(out: Path, tensors, max_shard_bytes=1 << 30, metadata=None, seed=0, rows=2):
    """Write every tensor in chunks of `rows` rows, interleaving tensors in a shuffled order."""
    chunks = []
    for name, t in tensors.items():
        flat = t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(-1)
        pieces = [flat[i : i + rows] for i in range(0, flat.shape[0], rows)] or [flat]
        chunks.append([(name, p) for p in pieces])
    rng = random.Random(seed)
    w = ShardedWriter(out, _plan(tensors), max_shard_bytes, metadata)
    while chunks:
        queue = rng.choice(chunks)
        w.write(*queue.pop(0))
        if not queue:
            chunks.remove(queue)
    return w.close()


def _digest(files: list[Path]) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# ---------------------------------------------------------------------------------------------
# Writer


def test_round_trip_every_dtype_with_chunked_out_of_order_writes(tmp_path):
    tensors = _all_dtype_tensors()
    files = _write(tmp_path / "out", tensors, metadata={"quant": "nvfp4"}, rows=1)
    assert [f.name for f in files] == ["model.safetensors"]
    loaded = load_file(files[0])
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert _bytes(loaded[name]) == _bytes(t), name
    with safe_open(files[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt", "quant": "nvfp4"}
        assert _bytes(f.get_tensor("t.bf16")) == _bytes(tensors["t.bf16"])


def test_single_shard_bytes_equal_safetensors_save_file(tmp_path):
    # Only one metadata key: save_file orders several in Rust HashMap order, which varies per run.
    tensors = _all_dtype_tensors()
    files = _write(tmp_path / "out", tensors)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert files[0].read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_sharding_is_greedy_in_order_and_writes_an_index(tmp_path):
    sizes = {"w0": 10, "w1": 10, "w2": 10, "big": 40, "w3": 2}  # F32 elements: 40, 40, 40, 160, 8 B
    tensors = {
        n: torch.arange(k, dtype=torch.float32) + i for i, (n, k) in enumerate(sizes.items())
    }
    files = _write(tmp_path / "out", tensors, max_shard_bytes=100)
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [f.name for f in files] == [*names, INDEX_NAME]
    index_text = (tmp_path / "out" / INDEX_NAME).read_text()
    index = json.loads(index_text)
    assert index["metadata"] == {"total_size": 40 + 40 + 40 + 160 + 8}
    assert index["weight_map"] == {
        "w0": names[0],
        "w1": names[0],
        "w2": names[1],
        "big": names[2],
        "w3": names[3],
    }
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    seen = {}
    for name in names:
        with safe_open(tmp_path / "out" / name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            seen.update({k: f.get_tensor(k) for k in f.keys()})
    assert seen.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(seen[k], t), k


def test_output_is_byte_identical_across_runs_and_write_orders(tmp_path):
    tensors = _all_dtype_tensors()
    meta_a = {"z": "1", "a": "2", "m": "3"}
    meta_b = {"m": "3", "a": "2", "z": "1"}
    first = _write(tmp_path / "a", tensors, max_shard_bytes=256, metadata=meta_a, seed=1, rows=1)
    second = _write(tmp_path / "b", tensors, max_shard_bytes=256, metadata=meta_b, seed=2, rows=3)
    assert len(first) > 2
    assert _digest(first) == _digest(second)


def test_every_tensor_is_naturally_aligned(tmp_path):
    tensors = _all_dtype_tensors()
    tensors["odd.u8"] = _random(torch.uint8, (3, 5), seed=7)  # odd size, would misalign a successor
    files = _write(tmp_path / "out", tensors, max_shard_bytes=300)
    for file in files:
        if file.name == INDEX_NAME:
            continue
        (header_len,) = struct.unpack("<Q", file.read_bytes()[:8])
        assert (8 + header_len) % 8 == 0
        infos, _ = read_header(file)
        for info in infos.values():
            assert info.offset % DTYPES[info.dtype].itemsize == 0, (file.name, info.name)


def test_writer_rejects_wrong_dtype_overflow_and_foreign_rows(tmp_path):
    w = ShardedWriter(tmp_path, [OutputTensor("w", "BF16", (4, 8))], 1 << 20)
    with pytest.raises(ValueError, match="'w' is BF16"):
        w.write("w", torch.zeros(1, 8))
    with pytest.raises(ValueError, match="rows of 8"):
        w.write("w", torch.zeros(2, 4, dtype=torch.bfloat16))
    w.write("w", torch.zeros(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="holds 64 bytes"):
        w.write("w", torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(KeyError, match="'nope'"):
        w.write("nope", torch.zeros(1, 8, dtype=torch.bfloat16))
    w.abort()


def test_close_names_the_incomplete_tensor(tmp_path):
    plan = [OutputTensor("done", "F32", (2,)), OutputTensor("half", "U8", (4, 4))]
    w = ShardedWriter(tmp_path, plan, 1 << 20)
    w.write("done", torch.ones(2))
    w.write("half", torch.ones(2, 4, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="'half' got 8 of its 16 bytes"):
        w.close()
    with pytest.raises(RuntimeError, match="aborted"):
        w.close()


def test_writer_rejects_bad_plans(tmp_path):
    with pytest.raises(ValueError, match="'x' has dtype 'Q4'"):
        ShardedWriter(tmp_path, [OutputTensor("x", "Q4", (2,))], 100)
    with pytest.raises(ValueError, match="repeated"):
        ShardedWriter(tmp_path, [OutputTensor("x", "U8", (2,))] * 2, 100)
    with pytest.raises(ValueError, match="'format' must be 'pt'"):
        ShardedWriter(tmp_path, [], 100, {"format": "np"})


# ---------------------------------------------------------------------------------------------
# Reader


@pytest.fixture
def stored(tmp_path):
    tensors = {
        "mat": _random(torch.bfloat16, (6, 10), seed=1),
        "experts": _random(torch.float32, (3, 4, 5), seed=2),
        "vec": _random(torch.int32, (7,), seed=3),
        "scalar": _random(torch.float64, (), seed=4),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    infos, _ = read_header(path)
    return tensors, infos, path


def test_read_header_reports_shapes_offsets_and_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"b": torch.zeros(2, 3), "a": torch.zeros(4, dtype=torch.uint8)}, path, {"k": "v"})
    infos, meta = read_header(path)
    assert meta == {"k": "v"}
    assert list(infos) == ["b", "a"]  # header order, which is safetensors' layout order
    b = infos["b"]
    assert (b.dtype, b.shape, b.nbytes, b.numel, b.torch_dtype) == (
        "F32",
        (2, 3),
        24,
        6,
        torch.float32,
    )
    assert infos["a"].offset == b.offset + 24
    raw = path.read_bytes()
    assert raw[b.offset : b.offset + 24] == bytes(24)


def test_read_tensor_equals_the_stored_tensor(stored):
    tensors, infos, _ = stored
    for name, t in tensors.items():
        got = read_tensor(infos[name])
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert _bytes(got) == _bytes(t), name


@pytest.mark.parametrize("start,stop", [(0, 6), (1, 4), (5, 6), (3, 3)])
def test_read_rows_of_a_matrix_equals_slicing(stored, start, stop):
    tensors, infos, _ = stored
    got = read_rows(infos["mat"], start, stop)
    assert got.shape == (stop - start, 10)
    assert torch.equal(got.view(torch.int16), tensors["mat"][start:stop].view(torch.int16))


def test_read_rows_of_an_expert_stack_selects_experts(stored):
    tensors, infos, _ = stored
    experts = tensors["experts"]
    for e in range(3):
        got = read_rows(infos["experts"], e * 4, e * 4 + 4)
        assert _bytes(got) == _bytes(experts[e])
    assert _bytes(read_rows(infos["experts"], 3, 9)) == _bytes(experts.reshape(12, 5)[3:9])


def test_read_rows_of_vectors_counts_elements(stored):
    tensors, infos, _ = stored
    assert torch.equal(read_rows(infos["vec"], 2, 5), tensors["vec"][2:5])
    assert infos["scalar"].num_rows == 1
    assert _bytes(read_rows(infos["scalar"], 0, 1)) == _bytes(tensors["scalar"])
    with pytest.raises(ValueError, match="'vec', which has 7 rows"):
        read_rows(infos["vec"], 5, 8)


def test_reads_own_their_memory_and_never_map_the_file(stored):
    tensors, infos, path = stored
    got = read_tensor(infos["mat"])
    rows = read_rows(infos["experts"], 0, 4)
    if sys.platform == "linux":
        assert str(path) not in Path("/proc/self/maps").read_text()
    path.write_bytes(bytes(path.stat().st_size))  # overwrite in place, then delete
    path.unlink()
    assert _bytes(got) == _bytes(tensors["mat"])
    assert _bytes(rows) == _bytes(tensors["experts"][0])
    rows.view(torch.int32).add_(1)  # writable, and its own copy
    assert _bytes(rows) != _bytes(tensors["experts"][0])


def test_file_truncated_after_the_header_was_read(stored):
    _, infos, path = stored
    with open(path, "r+b") as f:
        f.truncate(infos["mat"].offset + 4)
    with pytest.raises(CheckpointError, match=r"ended while reading tensor '\w+'"):
        for info in infos.values():
            read_tensor(info)


# ---------------------------------------------------------------------------------------------
# Bad input: every failure names the file (and the tensor where there is one)


def _raw(path: Path, header, data: bytes, header_len: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(
        struct.pack("<Q", len(text) if header_len is None else header_len) + text + data
    )
    return path


def _entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


BAD = {
    "shorter_than_length_field": (
        lambda p: p.write_bytes(b"\x01\x02"),
        "not a safetensors file",
        None,
    ),
    "length_past_cap": (
        lambda p: _raw(p, b"{}", b"", header_len=1 << 40),
        "not a safetensors file",
        None,
    ),
    "length_past_end_of_file": (
        lambda p: _raw(p, b"{}", b"", header_len=4096),
        "is truncated",
        None,
    ),
    "garbage_header": (lambda p: _raw(p, b"\x00garbage", b""), "not valid JSON", None),
    "not_utf8": (lambda p: _raw(p, b"{\xff\xfe}", b""), "not UTF-8", None),
    "header_is_a_list": (lambda p: _raw(p, b"[1, 2]", b""), "not an object", None),
    "duplicate_name": (lambda p: _raw(p, b'{"a": {}, "a": {}}', b""), "names 'a' twice", None),
    "unknown_dtype": (
        lambda p: _raw(p, {"w": _entry(dtype="Q4")}, bytes(8)),
        "unknown dtype 'Q4'",
        "w",
    ),
    "unhashable_dtype": (
        lambda p: _raw(p, {"w": _entry(dtype=["F32"])}, bytes(8)),
        "unknown dtype ['F32']",
        "w",
    ),
    "bad_shape": (lambda p: _raw(p, {"w": _entry(shape=(-2,))}, bytes(8)), "non-negative", "w"),
    "bad_offsets": (
        lambda p: _raw(p, {"w": {"dtype": "U8", "shape": [0], "data_offsets": [3]}}, b""),
        "data_offsets [3]",
        "w",
    ),
    "shape_disagrees_with_offsets": (
        lambda p: _raw(p, {"w": _entry(shape=(3, 4), begin=0, end=8)}, bytes(8)),
        "claims 8 bytes",
        "w",
    ),
    "overlapping": (
        lambda p: _raw(p, {"a": _entry(begin=0, end=8), "b": _entry(begin=4, end=12)}, bytes(12)),
        "overlap",
        "b",
    ),
    "offsets_past_end": (
        lambda p: _raw(p, {"w": _entry(begin=8, end=16), "v": _entry()}, bytes(8)),
        "is truncated",
        "w",
    ),
    "gap_between_tensors": (
        lambda p: _raw(p, {"a": _entry(begin=0, end=8), "b": _entry(begin=12, end=20)}, bytes(20)),
        "belong to no tensor",
        "b",
    ),
    "trailing_bytes": (lambda p: _raw(p, {"w": _entry()}, bytes(12)), "last 4 bytes", None),
    "bad_metadata": (lambda p: _raw(p, {"__metadata__": {"k": 1}}, b""), "__metadata__", None),
    "metadata_not_an_object": (lambda p: _raw(p, {"__metadata__": []}, b""), "__metadata__", None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_header_gives_one_sentence_naming_file_and_tensor(tmp_path, case):
    build, fragment, tensor = BAD[case]
    path = tmp_path / "model.safetensors"
    build(path)
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    message = str(e.value)
    assert fragment in message
    assert str(path) in message
    if tensor is not None:
        assert f"'{tensor}'" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_truncated_real_file_reports_both_sizes(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1024, 1024, dtype=torch.bfloat16), "v": torch.zeros(4)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - (1 << 20)])
    with pytest.raises(
        CheckpointError,
        match=r"truncated: .*2097168 bytes \(2\.0 MiB\) of tensor data .*'w'.* 1048592 bytes \(1\.0 MiB\)",
    ):
        read_header(path)
