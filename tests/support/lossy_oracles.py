"""GGUF oracles of one Hugging Face checkpoint at every storage precision a user may verify against.

Two producers:

* llama.cpp's own converter (`tests.support.llamacpp`) for the types it writes: ``f32``, ``f16``,
  ``bf16`` and ``q8_0``.
* A re-quantization of the converter's F32 GGUF with PyPI gguf's ``gguf.quants.quantize`` for the
  4- and 5-bit types llama-quantize would make: ``q4_0``, ``q4_1``, ``q5_0`` and ``mxfp4``. Every
  metadata key (tokenizer arrays included) is copied with its value type; only
  ``general.file_type`` is set to the new type.

Tensor-type policy of the re-quantized files, after llama-quantize's ``llama_tensor_get_type``:

* tensors of fewer than 2 dimensions (norms, scales, rope_freqs, layer scalars) stay F32;
* MoE routers (``ffn_gate_inp.weight``) stay F32, as llama-quantize never quantizes them;
* ``token_embd.weight`` / ``output.weight`` become Q8_0: llama-quantize picks Q6_K there and falls
  back to Q8_0 when the row length is not a multiple of 256 (every tiny model), and gguf-py has no
  Q6_K quantizer;
* every other weight of 2 or more dimensions takes the target type;
* a tensor whose row length is not a multiple of the chosen type's block size stays F32.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from tests.support.llamacpp import convert_many_to_gguf

__all__ = [
    "CONVERTER_TYPES",
    "ORACLE_TYPES",
    "REQUANTIZED_TYPES",
    "OracleCache",
    "lossy_oracles",
    "requantize_gguf",
    "tensor_type",
]

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # convert_hf_to_gguf.py --outtype values
REQUANTIZED_TYPES = ("q4_0", "q4_1", "q5_0", "mxfp4")
ORACLE_TYPES = CONVERTER_TYPES + REQUANTIZED_TYPES

# Quantized tensors llama-quantize keeps in high precision, and those it gives an 8-bit type.
_KEEP_F32 = ("ffn_gate_inp.weight",)
_EMBEDDINGS = ("token_embd.weight", "output.weight")


def _ggml_types() -> dict[str, tuple]:
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    return {
        "q4_0": (T.Q4_0, F.MOSTLY_Q4_0),
        "q4_1": (T.Q4_1, F.MOSTLY_Q4_1),
        "q5_0": (T.Q5_0, F.MOSTLY_Q5_0),
        "mxfp4": (T.MXFP4, F.MOSTLY_MXFP4_MOE),
    }


def tensor_type(name: str, shape: tuple[int, ...], target):
    """The GGML type `name` (numpy `shape`) gets in a GGUF of type `target` (module docstring)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or name.endswith(_KEEP_F32):
        return T.F32
    chosen = T.Q8_0 if name in _EMBEDDINGS else target
    block, _ = GGML_QUANT_SIZES[chosen]
    return chosen if shape[-1] % block == 0 else T.F32


def requantize_gguf(f32_gguf: str | Path, out: str | Path, outtype: str) -> Path:
    """A copy of an all-F32 GGUF with its weights re-quantized to `outtype` (one of
    REQUANTIZED_TYPES) under the module's tensor-type policy; metadata copied key by key."""
    import gguf
    from gguf.quants import quantize

    if outtype not in REQUANTIZED_TYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {REQUANTIZED_TYPES}")
    target, file_type = _ggml_types()[outtype]
    reader = gguf.GGUFReader(str(f32_gguf))
    arch = reader.fields["general.architecture"].contents()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        # GGUF.* are header pseudo-keys; the writer adds general.architecture itself
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_key_value(key, int(file_type), gguf.GGUFValueType.UINT32)
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{f32_gguf}: tensor {t.name} is {t.tensor_type.name}; re-quantize an F32 GGUF")
        data = np.ascontiguousarray(t.data, dtype=np.float32)
        kind = tensor_type(t.name, data.shape, target)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(t.name, data)
        else:
            writer.add_tensor(t.name, quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


class OracleCache:
    """GGUF oracles under `root`, made once each. `prepare` batches the converter runs (its imports
    cost more than converting a tiny model); `get` makes whatever is still missing."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.made: dict[tuple[str, str], Path] = {}
        self.names: dict[str, str] = {}

    def _path(self, hf_dir: Path, outtype: str) -> Path:
        stem = self.names.setdefault(str(hf_dir), f"{len(self.names)}-{Path(hf_dir).name}")
        return self.root / f"{stem}-{outtype}.gguf"

    def prepare(self, hf_dirs: Iterable[str | Path], outtypes: Iterable[str]) -> None:
        dirs, types = [Path(d) for d in hf_dirs], list(outtypes)
        unknown = set(types) - set(ORACLE_TYPES)
        if unknown:
            raise ValueError(f"unknown oracle type(s) {sorted(unknown)}; expected {ORACLE_TYPES}")
        converter = {t for t in types if t in CONVERTER_TYPES}
        if any(t in REQUANTIZED_TYPES for t in types):
            converter.add("f32")  # the re-quantized types start from the F32 GGUF
        for outtype in sorted(converter):
            jobs = [(d, self._path(d, outtype)) for d in dirs if (str(d), outtype) not in self.made]
            for (d, _), result in zip(jobs, convert_many_to_gguf(jobs, outtype), strict=True):
                if isinstance(result, Exception):
                    raise result
                self.made[(str(d), outtype)] = result
        for outtype in (t for t in types if t in REQUANTIZED_TYPES):
            for d in dirs:
                if (str(d), outtype) not in self.made:
                    f32 = self.made[(str(d), "f32")]
                    self.made[(str(d), outtype)] = requantize_gguf(f32, self._path(d, outtype), outtype)

    def get(self, hf_dir: str | Path, outtype: str) -> Path:
        if (str(hf_dir), outtype) not in self.made:
            self.prepare([hf_dir], [outtype])
        return self.made[(str(hf_dir), outtype)]


@pytest.fixture(scope="session")
def lossy_oracles(tmp_path_factory) -> OracleCache:
    """Session-wide OracleCache: `lossy_oracles.get(hf_dir, "q4_0")` -> GGUF path."""
    return OracleCache(tmp_path_factory.mktemp("lossy-oracles"))
