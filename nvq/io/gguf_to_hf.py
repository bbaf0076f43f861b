"""GGUF → dense Hugging Face checkpoint (`nvq convert X.gguf OUT --scheme bf16`).

Streams one canonical tensor (or a few row blocks of it) at a time from `GGUFModel`, maps each
canonical name back to its HF name through the architecture module's name table (the causal-LM
spelling, decoder under "model."), and writes safetensors shards, config.json,
generation_config.json and tokenizer files rebuilt from the GGUF metadata, all atomically.
Expert stacks stay fused 3-D where the HF model stores them so (Gemma-4); where it stores one
Linear per expert (Qwen3-MoE), each expert is written as its own tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nvq.errors import ConfigError, TensorError, UnmappedTensorError
from nvq.io.atomic import atomic_output_dir
from nvq.io.gguf_model import GGUFModel, Unit
from nvq.io.gguf_tokenizer import write_tokenizer_files
from nvq.io.hf import HFConfig
from nvq.io.safetensors import OutputTensor, ShardedWriter, dtype_code
from nvq.models import ARCHITECTURES, config_rules, parse_checked
from nvq.models.base import NameTable

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
Progress = Callable[[int, str], None]  # (source bytes read, tensor name)


@dataclass
class DenseExport:
    out: Path
    architecture: str  # HF class written
    tensors: int  # tensors written
    consumed: dict[str, str]  # GGUF tensors not written, and why
    dropped: dict[str, str]  # canonical tensors the HF model has no place for, and why
    params: int
    bytes_written: int
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Target:
    unit: Unit
    hf: str


def hf_name_map(model: GGUFModel) -> tuple[list[_Target], dict[str, str]]:
    """HF name of every canonical unit; units the HF model does not have are returned as drops
    (name → reason). A canonical name no table row knows is an UnmappedTensorError."""
    module = ARCHITECTURES[model.arch_name]
    table, prefix = module.TABLE, model.spec.hf_prefix
    if prefix not in table.text_prefixes:
        raise ConfigError(f"internal: {prefix!r} is not a text prefix of nvq.models.{model.arch_name}.")
    arch_config = parse_checked(module, HFConfig(model.path, model.config))
    targets, dropped, unmapped = [], {}, []
    for unit in (u for whole in model.units for u in _per_expert(whole, table, prefix)):
        m = table.to_hf(unit.canonical, prefix, arch_config)
        if m is None:
            unmapped.append(unit.canonical)
        elif m.dropped:
            dropped[unit.canonical] = m.dropped
        else:
            targets.append(_Target(unit, m.source))
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        raise UnmappedTensorError(
            f"{model.path}: {len(unmapped)} GGUF tensor(s) have no row in nvq's "
            f"{model.arch_name} name table: {shown}."
        )
    config_rules.check_tensors(model.path, arch_config, {u.canonical: u.shape for u in model.units})
    return targets, dropped


def _per_expert(unit: Unit, table: NameTable, prefix: str) -> list[Unit]:
    """A GGUF expert stack whose experts the name table names one Linear each (Qwen3-MoE, as
    transformers writes them) becomes one unit per expert: rows e·n..(e+1)·n of its 2-D view."""
    if len(unit.shape) != 3 or table.to_hf(unit.canonical + "[0]", prefix) is None:
        return [unit]
    n, first = unit.shape[1], unit.rows[0]
    return [replace(unit, canonical=f"{unit.canonical}[{e}]", rows=(first + e * n, first + (e + 1) * n),
                    shape=tuple(unit.shape[1:])) for e in range(unit.shape[0])]


def convert_gguf_to_hf(
    src: str | Path,
    out: str | Path,
    dtype: str = "bfloat16",
    force: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: Progress | None = None,
    replace_any: bool = False,
) -> DenseExport:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported for dense output; allowed: {', '.join(DTYPES)}.")
    torch_dtype = DTYPES[dtype]
    model = GGUFModel.open(src)
    targets, dropped = hf_name_map(model)
    tick = progress or (lambda n, name: None)
    out = Path(out)
    code = dtype_code(torch_dtype)
    outputs = [OutputTensor(t.hf, code, t.unit.shape) for t in targets]
    export = DenseExport(
        out=out, architecture=model.spec.architecture, tensors=len(targets),
        consumed=dict(model.consumed), dropped=dropped,
        params=sum(t.unit.numel for t in targets), bytes_written=sum(o.nbytes for o in outputs),
    )  # fmt: skip
    with atomic_output_dir(out, force, replace_any=replace_any, inputs=[Path(src)]) as tmp:
        for name in model.consumed:  # read into the config; counted so progress reaches the total
            tick(model.gguf.info(name).nbytes, name)
        with ShardedWriter(tmp, outputs, max_shard_bytes) as writer:
            for t in targets:
                for rows, chunk in model.chunks(t.unit):
                    _check_finite(model.path, t.unit.canonical, chunk)
                    writer.write(t.hf, chunk.to(torch_dtype))
                    tick(model.source_bytes(t.unit, rows), t.unit.canonical)
            writer.close()
        config = dict(model.config)
        config["dtype"] = dtype
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(model))
        export.warnings += write_tokenizer_files(
            model.gguf, tmp, model.config.get("max_position_embeddings")
        )
        export.files = sorted(p.name for p in tmp.iterdir())
    return export


def _check_finite(path: Path, name: str, chunk: torch.Tensor) -> None:
    # A NaN or Inf weight makes every logit downstream NaN; refuse it rather than copy it.
    if not torch.isfinite(chunk).all():
        raise TensorError(f"{path}: tensor '{name}' holds NaN or Inf values; "
                          "a dense checkpoint is written only from finite weights.")


def _generation_config(model: GGUFModel) -> dict:
    meta = model.gguf.metadata
    gen: dict = {}
    for key, what in (("bos_token_id", "bos"), ("pad_token_id", "padding")):
        if isinstance(meta.get(f"tokenizer.ggml.{what}_token_id"), int):
            gen[key] = meta[f"tokenizer.ggml.{what}_token_id"]
    # llama.cpp stops on EOS and on EOT (end of turn) when the file names one.
    stops = [meta.get(f"tokenizer.ggml.{w}_token_id") for w in ("eos", "eot")]
    stops = list(dict.fromkeys(s for s in stops if isinstance(s, int)))
    if stops:
        gen["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return gen


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
