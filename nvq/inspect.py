"""`nvq inspect`: what a checkpoint or GGUF holds: architecture, tensors, formats, sizes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nvq.io.hf import Checkpoint


@dataclass
class Inspection:
    path: str
    kind: str  # "hf" or "gguf"
    architecture: str
    quantization: str  # e.g. "none", "compressed-tensors nvfp4-pack-quantized", "gguf"
    tensor_count: int
    total_bytes: int
    dtypes: dict[str, int]  # dtype → tensor count
    tensors: list[dict] = field(default_factory=list)  # name, dtype, shape, bytes


def inspect(path: str | Path) -> Inspection:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return _inspect_gguf(p)
    ckpt = Checkpoint.open(path)
    qc = ckpt.config.raw.get("quantization_config") or {}
    quant = " ".join(str(x) for x in (qc.get("quant_method"), qc.get("format")) if x) or "none"
    infos = sorted(ckpt.tensors.values(), key=lambda t: t.name)
    return Inspection(
        path=str(ckpt.path),
        kind="hf",
        architecture=f"{ckpt.config.model_type} ({', '.join(ckpt.config.architectures or [])})",
        quantization=quant,
        tensor_count=len(infos),
        total_bytes=sum(t.nbytes for t in infos),
        dtypes=dict(sorted(Counter(t.dtype for t in infos).items())),
        tensors=[{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes} for t in infos],
    )


def _inspect_gguf(path: Path) -> Inspection:
    from nvq.io.gguf import GGUFFile

    gf = GGUFFile.open(path)
    tensors = [
        {"name": t.name, "dtype": t.type_name, "shape": list(t.shape), "bytes": t.nbytes}  # numpy order
        for t in gf.tensors.values()
    ]
    return Inspection(
        path=str(path),
        kind="gguf",
        architecture=str(gf.metadata.get("general.architecture", "unknown")),
        quantization="gguf",
        tensor_count=len(tensors),
        total_bytes=sum(t["bytes"] for t in tensors),
        dtypes=dict(sorted(Counter(t["dtype"] for t in tensors).items())),
        tensors=tensors,
    )
