"""nvq.io.gguf: the header parser agrees with gguf-py's GGUFReader on metadata and tensor infos,
reads tensors bit for bit like GGUFReader + gguf.quants.dequantize, and refuses broken files
with a one-sentence CheckpointError that names the file (and the tensor, where one is to blame)."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.quants import dequantize, quantize
from typer.testing import CliRunner

from nvq.cli import app
from nvq.errors import CheckpointError
from nvq.io.gguf import GGUFFile, dequantizable_types


def assert_matches_reader(path) -> GGUFFile:
    ours = GGUFFile.open(path)
    r = gguf.GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, f in fields.items():
        assert ours.metadata[key] == f.contents(), key
        types = [int(t) for t in ours.value_types[key]]
        # GGUFReader drops the element type of an empty array; we keep it.
        assert types[: len(f.types)] == [int(t) for t in f.types], key
    assert ours.version == r.get_field("GGUF.version").contents()
    assert (ours.alignment, ours.data_offset) == (r.alignment, r.data_offset)
    assert list(ours.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == int(t.tensor_type) and info.type_name == t.tensor_type.name
        assert info.ne == tuple(int(d) for d in t.shape)
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes)
        assert ours.raw(t.name) == t.data.tobytes()
        if t.tensor_type in (T.I8, T.I16, T.I32, T.I64, T.F64):  # not in gguf.quants: plain casts
            want = np.asarray(t.data, dtype=np.float32)
        else:
            want = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        got = ours.read(t.name)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape == info.shape
        assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32)), t.name
    return ours


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    "fixture,outtype",
    [("tiny_llama", "f32"), ("tiny_llama", "q8_0"), ("tiny_gemma4_moe", "f32"), ("tiny_gemma4_ple", "f32")],
)
def test_header_and_tensors_match_gguf_reader_on_converter_output(request, tiny_gguf, fixture, outtype):
    path = tiny_gguf(request.getfixturevalue(fixture), outtype)
    ours = assert_matches_reader(path)
    assert ours.architecture == ("llama" if fixture == "tiny_llama" else "gemma4")
    if outtype == "q8_0":
        assert "Q8_0" in {t.type_name for t in ours}


# ---------------------------------------------------------------------------------------------
# Files written with gguf-py's GGUFWriter: every value type, quantized tensors, custom alignment

SCALARS = [
    ("t.u8", 200, V.UINT8), ("t.i8", -5, V.INT8), ("t.u16", 60000, V.UINT16), ("t.i16", -300, V.INT16),
    ("t.u32", 4_000_000_000, V.UINT32), ("t.i32", -70000, V.INT32), ("t.f32", 0.1, V.FLOAT32),
    ("t.bool", True, V.BOOL), ("t.str", "héllo ▁ 你", V.STRING), ("t.u64", 2**63 + 5, V.UINT64),
    ("t.i64", -(2**40), V.INT64), ("t.f64", 1e-300, V.FLOAT64),
]  # fmt: skip
ARRAYS = [
    ("a.u8", [0, 255], V.UINT8), ("a.i8", [-128, 127], V.INT8), ("a.u16", [1, 65535], V.UINT16),
    ("a.i16", [-2, 2], V.INT16), ("a.u32", [7, 2**32 - 1], V.UINT32), ("a.i32", [-1, 1, 3], V.INT32),
    ("a.f32", [0.5, -1e30], V.FLOAT32), ("a.bool", [True, False, True], V.BOOL),
    ("a.str", ["", "a b", "<0x0A>", "Ġthe"], V.STRING), ("a.u64", [2**64 - 1], V.UINT64),
    ("a.i64", [-(2**63)], V.INT64), ("a.f64", [2.5, -0.0], V.FLOAT64),
]  # fmt: skip


def write_gguf(path, tensors, alignment=None, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    for key, value, vtype in SCALARS:
        w.add_key_value(key, value, vtype)
    for key, value, vtype in ARRAYS:
        w.add_key_value(key, value, V.ARRAY, sub_type=vtype)
    for name, arr, qtype in tensors:
        if qtype in (None, T.F32):
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_tensors():
    g = np.random.default_rng(0)
    x = (g.standard_normal((6, 64)) * 0.1).astype(np.float32)
    return [
        ("w.f32", x, T.F32),
        ("w.f16", x, T.F16),
        ("w.bf16", x, T.BF16),
        ("w.q4_0", x, T.Q4_0),
        ("w.q5_1", x, T.Q5_1),
        ("w.q8_0", x, T.Q8_0),
        ("w.mxfp4", x, T.MXFP4),
        ("experts.q8_0", (g.standard_normal((3, 4, 64)) * 0.1).astype(np.float32), T.Q8_0),
        ("vec.f32", g.standard_normal(5).astype(np.float32), T.F32),
        ("ids.i32", np.arange(-3, 5, dtype=np.int32), None),
    ]


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_type_written_by_gguf_py(tmp_path, alignment):
    path = write_gguf(tmp_path / "all.gguf", random_tensors(), alignment)
    ours = assert_matches_reader(path)
    assert ours.alignment == (alignment or 32)
    assert all((t.offset - ours.data_offset) % ours.alignment == 0 for t in ours)
    for key, value, vtype in SCALARS + ARRAYS:
        want = value
        if vtype == V.FLOAT32:
            want = [float(np.float32(v)) for v in value] if isinstance(value, list) else float(np.float32(value))
        assert ours.metadata[key] == want, key
    assert ours.read("ids.i32").tolist() == list(range(-3, 5))
    # read_rows: any row range decodes on its own and equals the slice of the whole tensor
    whole = ours.read("experts.q8_0").reshape(-1, 64)
    assert torch.equal(ours.read_rows("experts.q8_0", 5, 11), whole[5:11])
    with pytest.raises(ValueError, match="outside tensor"):
        ours.read_rows("experts.q8_0", 0, 13)


def test_long_string_arrays_parse_exactly(tmp_path):
    # A 256k-token vocabulary (gemma-3 size): what GGUFReader needs seconds for (oracle.md §1).
    tokens = [f"t{i}" + "é▁你"[i % 3] * (i % 5) for i in range(1 << 18)]
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "gemma3")
    w.add_token_list(tokens)
    w.add_token_types([1 + i % 6 for i in range(1 << 18)])
    w.add_token_scores([float(-i) for i in range(1 << 18)])
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = GGUFFile.open(tmp_path / "vocab.gguf")
    assert ours.metadata["tokenizer.ggml.tokens"] == tokens
    assert ours.metadata["tokenizer.ggml.token_type"][:7] == [1, 2, 3, 4, 5, 6, 1]
    assert ours.metadata["tokenizer.ggml.scores"][-1] == -(2.0**18 - 1)
    assert ours.read("token_embd.weight").shape == (4, 32)


# ---------------------------------------------------------------------------------------------
# Hand-built files, so headers can lie


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def build(kv=None, tensors=None, data=None, version=3, magic=b"GGUF", alignment=32, counts=None):
    kv = [("general.architecture", V.STRING, _s("llama"))] if kv is None else kv
    tensors = [("a", (8, 2), 0, 0)] if tensors is None else tensors
    data = np.arange(16, dtype=np.float32).tobytes() if data is None else data
    n_t, n_kv = counts or (len(tensors), len(kv))
    out = magic + struct.pack("<I", version) + struct.pack("<QQ", n_t, n_kv)
    for key, vtype, payload in kv:
        out += _s(key) + struct.pack("<I", vtype) + payload
    for name, ne, ggml_type, offset in tensors:
        out += _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def test_hand_built_file_is_valid(tmp_path):
    kv = [
        ("general.architecture", V.STRING, _s("llama")),
        ("empty", V.ARRAY, struct.pack("<IQ", V.INT32, 0)),  # gguf-py's writer refuses these
        ("empty.str", V.ARRAY, struct.pack("<IQ", V.STRING, 0)),
    ]
    (tmp_path / "ok.gguf").write_bytes(build(kv=kv))
    ours = assert_matches_reader(tmp_path / "ok.gguf")
    assert ours.metadata["empty"] == [] == ours.metadata["empty.str"]
    assert ours.read("a").tolist() == np.arange(16, dtype=np.float32).reshape(2, 8).tolist()


def _u32(v):
    return struct.pack("<I", v)


BAD = {
    "wrong magic": (dict(magic=b"GGML"), "is not a GGUF file: it starts with b'GGML'"),
    "version 1": (dict(version=1), "GGUF version 1; nvq reads versions 2, 3"),
    "big-endian": (dict(version=0x03000000), "big-endian"),
    "lying counts": (dict(counts=(1, 2**40)), "more than a"),
    "data cut short": (dict(data=b"\0" * 40), "is truncated: tensor 'a' (F32 [8, 2]) needs bytes"),
    "offset past the end": (dict(tensors=[("a", (8, 2), 0, 4096)]), "is truncated: tensor 'a'"),
    "misaligned offset": (
        dict(tensors=[("a", (8, 1), 0, 0), ("b", (8, 1), 0, 36)], data=b"\0" * 128),
        "tensor 'b' starts at data offset 36, not a multiple of the file's alignment 32",
    ),
    "overlapping tensors": (
        dict(tensors=[("a", (8, 2), 0, 0), ("b", (8, 1), 0, 32)]),
        "tensors 'a' and 'b' overlap",
    ),
    "duplicate tensor": (dict(tensors=[("a", (8, 1), 0, 0), ("a", (8, 1), 0, 32)]), "'a' is listed twice"),
    "partial block": (dict(tensors=[("q", (16, 1), 8, 0)]), "tensor 'q' has ne[0] = 16, not a multiple of Q8_0's block of 32"),
    "unknown ggml type": (dict(tensors=[("a", (8, 2), 42, 0)]), "tensor 'a' has ggml type 42"),
    "five dims": (dict(tensors=[("a", (2, 2, 2, 2, 1), 0, 0)]), "tensor 'a' has 5 dimensions"),
    "bad alignment": (
        dict(kv=[("general.alignment", V.UINT32, _u32(48))]),
        "general.alignment is 48; it must be a power-of-two u32",
    ),
    "duplicate key": (
        dict(kv=[("k", V.UINT32, _u32(1)), ("k", V.UINT32, _u32(2))]),
        "metadata key 'k' appears twice",
    ),
    "bad value type": (dict(kv=[("k", 13, b"")]), "metadata key 'k' has value type 13"),
    "string longer than the file": (
        dict(kv=[("k", V.STRING, struct.pack("<Q", 2**50))]),
        "header runs past the end",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_broken_files_are_refused_in_one_sentence(tmp_path, case):
    kwargs, message = BAD[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(build(**kwargs))
    with pytest.raises(CheckpointError) as e:
        GGUFFile.open(path)
    text = str(e.value)
    assert str(path) in text and message in text, text
    assert "\n" not in text and text.endswith(".")
    if case == "unknown ggml type":
        assert "Q4_K" in text and "MXFP4" in text and "NVFP4" in text


def test_header_cut_short_and_tiny_file(tmp_path):
    whole = build()
    for n in (10, 40, len(whole) - 70):
        (tmp_path / "cut.gguf").write_bytes(whole[:n])
        with pytest.raises(CheckpointError, match="truncated|fewer than the 24-byte header"):
            GGUFFile.open(tmp_path / "cut.gguf")


def test_file_truncated_after_open_is_reported_on_read(tmp_path):
    path = tmp_path / "shrinks.gguf"
    path.write_bytes(build())
    ours = GGUFFile.open(path)
    path.write_bytes(build()[:-16])
    with pytest.raises(CheckpointError, match=r"ended while reading tensor 'a'"):
        ours.read("a")


def test_type_gguf_py_cannot_dequantize_names_the_readable_types(tmp_path):
    path = tmp_path / "q8_1.gguf"  # Q8_1: an activation-only type (36 bytes per 32 elements)
    path.write_bytes(build(tensors=[("act", (32, 1), 9, 0)], data=b"\0" * 64))
    ours = GGUFFile.open(path)
    assert ours.tensors["act"].type_name == "Q8_1"
    with pytest.raises(CheckpointError) as e:
        ours.read("act")
    assert "tensor 'act' has ggml type Q8_1, which gguf-py cannot dequantize" in str(e.value)
    assert "readable types: F32, F16, Q4_0" in str(e.value)
    assert "Q8_1" not in dequantizable_types() and {"BF16", "MXFP4", "NVFP4", "I32"} <= set(dequantizable_types())


def test_inspect_uses_the_fast_parser(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "x.gguf", random_tensors())

    def no_reader(*a, **k):
        raise AssertionError("nvq inspect must not build a GGUFReader")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "gguf" and info["architecture"] == "llama"
    shapes = {t["name"]: (t["dtype"], t["shape"]) for t in info["tensors"]}
    assert shapes["experts.q8_0"] == ("Q8_0", [3, 4, 64]) and shapes["w.mxfp4"] == ("MXFP4", [6, 64])

    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 30)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "bad.gguf")])
    assert result.exit_code == 2 and "Traceback" not in result.output
