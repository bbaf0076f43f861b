"""Streaming convert: read → quantize → pack → write, one fusion group at a time.

Memory stays bounded by one fusion group (or, for large tensors, one row chunk) plus the writer's
chunk: reads go through `read_rows`, never through a whole-model load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvq import ops, ops_cpu
from nvq.errors import ConfigError, TensorError
from nvq.formats.constants import NVFP4_GLOBAL_NUMERATOR
from nvq.io.atomic import atomic_output_dir
from nvq.io.gguf import is_gguf
from nvq.io.hf import Checkpoint
from nvq.io.safetensors import ShardedWriter
from nvq.layouts import compressed_tensors as ct
from nvq.models.base import Role
from nvq.quant import gptq_write, tp
from nvq.quant.policy import GPTQ, GPTQ_GROUP_SIZES, Plan, Unit, build_plan
from nvq.quant.recipe import load_recipe
from nvq.verify.serving import serving_notes

CHUNK_ELEMENTS = 1 << 24  # elements per read: 32 MiB of bf16, a 64 MiB fp32 working copy
GROUP_CACHE_BYTES = 512 << 20  # groups up to this size are read once, larger ones twice (amax, codes)
DEFAULT_SHARD_BYTES = 5 * 10**9
FP16_MAX = 65504.0
# ops.backend() names -> how the summary names them.
BACKEND_NAMES = {"cuda": "kernels", "cpu": "native", "reference": "reference"}

Progress = Callable[[int, str], None]  # (bytes of source read, current tensor)


@dataclass
class ConvertSummary:
    out: Path
    scheme: str
    quantized: int  # output modules quantized
    kept: int  # tensors copied dense
    dropped: int  # tensors dropped on purpose
    params: int
    params_quantized: int
    bytes_written: int
    bytes_quantized: int  # output bytes of the quantized weights (codes, scales, global scales)
    seconds: float
    device: str
    fp32_groups: list[str] = field(default_factory=list)  # fp16 groups quantized in fp32 (see below)
    warnings: list[str] = field(default_factory=list)
    serving_notes: list[str] = field(default_factory=list)  # where engines serve it differently
    backends: list[str] = field(default_factory=list)  # what quantized: "kernels", "native" and/or "reference"
    gptq: gptq_write.GPTQSummary | None = None  # method, calibration and per-layer errors (gptq only)

    @property
    def engine(self) -> str:
        """Device plus backend, e.g. 'cuda (kernels)', 'cpu (native)' or 'cpu (reference)'."""
        return f"{self.device} ({'+'.join(self.backends) or 'nothing quantized'})"

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_written / max(self.params, 1)

    @property
    def bits_per_quantized_weight(self) -> float:
        return 8 * self.bytes_quantized / max(self.params_quantized, 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TensorError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto.")
    return torch.device(device)


DENSE_SCHEME = "bf16"  # GGUF → dense HF checkpoint (no quantization)


def plan_convert(src: str | Path, scheme: str, recipe: str | Path | None = None,
                 group_size: int | None = None, tp_size: int | None = None) -> Plan:
    if is_gguf(src):
        raise ConfigError(
            f"{src} is a GGUF file; nvq plan describes quantizing a Hugging Face checkpoint, so "
            f"convert the GGUF first (nvq convert {src} OUT --scheme bf16)."
        )
    if scheme == DENSE_SCHEME:
        raise ConfigError(
            f"nvq plan describes quantization; --scheme {DENSE_SCHEME} quantizes nothing (it converts "
            f"a GGUF file to a dense checkpoint), so there is no plan to show."
        )
    return _plan(Checkpoint.open(src), scheme, recipe, group_size, tp_size)


def _plan(ckpt: Checkpoint, scheme: str, recipe, group_size: int | None, tp_size: int | None) -> Plan:
    """The plan, checked for `tp_size` ranks. GPTQ without an explicit group size takes the
    largest one that aligns, and the plan's warnings name the weights 128 would have broken."""
    plan = _gptq_default_plan(ckpt, recipe) if scheme == GPTQ and group_size is None else \
        build_plan(ckpt, scheme, load_recipe(recipe), group_size)
    if not tp_size:
        return plan
    broken = tp.misalignments(plan, tp_size)
    if broken and scheme == GPTQ and group_size is None:
        picked = tp.aligned_group_size(plan, tp_size)
        if picked is not None:
            aligned = build_plan(ckpt, scheme, load_recipe(recipe), picked)
            names = ", ".join(m.weight for m in broken[:4]) + (f" and {len(broken) - 4} more" if len(broken) > 4 else "")
            aligned.warnings.append(
                f"--tp {tp_size}: group size {picked} instead of {plan.group_size}, which would have split "
                f"groups across ranks in {len(broken)} weight(s): {names}."
            )
            plan = aligned
    tp.check(plan, tp_size)
    return plan


def _gptq_default_plan(ckpt: Checkpoint, recipe) -> Plan:
    """GPTQ at group size 128, or the largest of 64 / 32 that tiles every weight (with a warning)."""
    first_error = None
    for g in GPTQ_GROUP_SIZES:
        try:
            plan = build_plan(ckpt, GPTQ, load_recipe(recipe), g)
        except TensorError as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            why = str(first_error).split(";")[0]
            plan.warnings.append(f"GPTQ group size {g}, the largest that tiles every weight ({why}).")
        return plan
    raise first_error


def source_bytes(src: str | Path) -> int:
    """Bytes of tensor data convert will read from SRC (for progress bars)."""
    if is_gguf(src):
        from nvq.io.gguf import GGUFFile

        return sum(t.nbytes for t in GGUFFile.open(src).tensors.values())
    return sum(t.nbytes for t in Checkpoint.open(src).tensors.values())


def convert(
    src: str | Path,
    out: str | Path,
    scheme: str,
    recipe: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    dtype: str | None = None,
    gptq: gptq_write.GPTQSettings | None = None,
    tp_size: int | None = None,
    layer_progress: gptq_write.LayerDone | None = None,
    replace_any: bool = False,
) -> ConvertSummary:
    """SRC (HF directory, or GGUF file for scheme bf16) → OUT. `dtype` ("bfloat16", "float32")
    is the weight dtype of the dense bf16-scheme output; it does not apply to quantized schemes.
    `gptq` holds the GPTQ method and calibration settings; `tp_size` checks tensor-parallel
    alignment (any scheme). `force` replaces an earlier nvq output at OUT; `replace_any` (with
    `force`) replaces whatever directory is there. OUT may never be, hold, or sit inside SRC."""
    started = time.perf_counter()
    if is_gguf(src):
        if scheme != DENSE_SCHEME:
            raise ConfigError(
                f"{src} is a GGUF file, which nvq converts to a dense checkpoint only "
                f"(--scheme {DENSE_SCHEME}); convert it to {DENSE_SCHEME} first, then quantize "
                f"that directory with --scheme {scheme}."
            )
        return _convert_gguf(src, out, dtype or "bfloat16", force, replace_any, max_shard_bytes, progress,
                             started)
    if scheme == DENSE_SCHEME:
        raise ConfigError(
            f"--scheme {DENSE_SCHEME} converts a GGUF file to a dense checkpoint; {src} is not a "
            f"GGUF file (a Hugging Face directory is quantized with nvfp4 or mxfp4)."
        )
    if dtype is not None:
        raise ConfigError(f"--dtype applies to --scheme {DENSE_SCHEME} only, not to {scheme}.")
    if gptq is not None and scheme != GPTQ:
        raise ConfigError(f"GPTQ settings (--method, --group-size, --calib-*) apply to --scheme {GPTQ} only.")
    gptq = (gptq or gptq_write.GPTQSettings()) if scheme == GPTQ else None
    ckpt = Checkpoint.open(src)
    plan = _plan(ckpt, scheme, recipe, gptq.group_size if gptq else None, tp_size)
    if gptq is not None:
        gptq_write.check_settings(gptq)
    dev = resolve_device(device)
    out = Path(out)
    summary = ConvertSummary(
        out=out, scheme=scheme, quantized=len(plan.quantized), kept=len(plan.kept), dropped=len(plan.dropped),
        params=sum(u.numel for u in plan.units), params_quantized=sum(u.numel for u in plan.quantized),
        bytes_written=0, bytes_quantized=0, seconds=0.0, device=str(dev), warnings=list(plan.warnings),
        serving_notes=serving_notes(scheme, ckpt.config.get("torch_dtype") or ckpt.config.get("dtype")),
    )
    tick = progress or (lambda n, name: None)
    with atomic_output_dir(out, force, replace_any=replace_any, inputs=ckpt.input_paths()) as tmp:
        outputs = plan.output_tensors()
        writer = ShardedWriter(tmp, outputs, max_shard_bytes)
        for group in plan.groups():
            if gptq is None or group[0].scheme is None:
                _write_group(ckpt, group, writer, dev, tick, summary)
        if gptq is not None:
            summary.gptq = gptq_write.quantize_all(ckpt, plan, gptq, writer, dev, tick, layer_progress)
            summary.backends.append("reference")
        writer.close()
        _write_config(ckpt, plan, tmp, gptq)
        ckpt.copy_side_files(tmp)
        summary.bytes_written = sum(t.nbytes for t in outputs)
        summary.bytes_quantized = sum(t.nbytes for u in plan.quantized for t in plan.layout.output_tensors(u.out, u.shape))
    summary.seconds = time.perf_counter() - started
    return summary


def _convert_gguf(src, out, dtype: str, force: bool, replace_any: bool, max_shard_bytes: int,
                  progress: Progress | None, started: float) -> ConvertSummary:
    from nvq.io.gguf_to_hf import convert_gguf_to_hf

    export = convert_gguf_to_hf(src, out, dtype=dtype, force=force, replace_any=replace_any,
                                max_shard_bytes=max_shard_bytes,
                                progress=progress)
    return ConvertSummary(
        out=export.out, scheme=DENSE_SCHEME if dtype == "bfloat16" else "f32",
        quantized=0, kept=export.tensors, dropped=len(export.consumed) + len(export.dropped),
        params=export.params, params_quantized=0, bytes_written=export.bytes_written, bytes_quantized=0,
        seconds=time.perf_counter() - started, device="cpu", warnings=export.warnings,
    )


def _write_group(ckpt: Checkpoint, group: list[Unit], writer: ShardedWriter, dev: torch.device,
                 tick: Progress, summary: ConvertSummary) -> None:
    scheme = group[0].scheme
    if scheme is None:
        for u in group:
            # towers pass through untouched: transformers writes ±inf clip bounds there (no clipping)
            for _, chunk in _read_chunks(ckpt, u, tick, check_finite=u.role is not Role.TOWER):
                writer.write(u.out, chunk)
        return
    cache = _GroupCache(ckpt, group, tick)
    if scheme == "nvfp4":
        global_scale, compute_dtype = _group_global_scale(cache, group, dev, summary)
        for u in group:
            for chunk in cache.chunks(u):
                x = chunk.to(dev, compute_dtype)
                _write_packed(writer, u, ops.nvfp4_quantize_packed(x, global_scale))
            writer.write(f"{u.out}.weight_global_scale", global_scale.cpu())
        _note_backend(summary, "nvfp4_quantize_packed")
    else:
        for u in group:
            for chunk in cache.chunks(u):
                _write_packed(writer, u, ops.mxfp4_quantize_packed(chunk.to(dev)))
        _note_backend(summary, "mxfp4_quantize_packed")


def _note_backend(summary: ConvertSummary, op: str) -> None:
    used = BACKEND_NAMES[ops.backend(op)]
    if used not in summary.backends:
        summary.backends.append(used)


def _group_global_scale(cache: _GroupCache, group: list[Unit], dev: torch.device,
                        summary: ConvertSummary) -> tuple[torch.Tensor, torch.dtype]:
    dtypes = {u.dtype for u in group}
    if len(dtypes) > 1:
        names = ", ".join(u.source for u in group)
        raise TensorError(f"fusion group {names} mixes dtypes {sorted(dtypes)}; its members must share one dtype.")
    amax = None
    for u in group:
        for chunk in cache.chunks(u):
            a = ops.tensor_amax(chunk.to(dev))
            amax = a if amax is None else torch.maximum(amax, a)
    dtype = amax.dtype
    # compressed-tensors computes 1/amax·2688 in fp16 for fp16 weights; below amax ≈ 0.041 that
    # overflows, g falls back to 1 and every block flushes to zero (formats.md §1.5). nvq computes
    # such groups in fp32 instead of writing an all-zero weight, and says so in the summary.
    if dtype == torch.float16 and float(amax) < NVFP4_GLOBAL_NUMERATOR / FP16_MAX:
        summary.fp32_groups.append(group[0].out)
        dtype = torch.float32
    return ops.nvfp4_global_scale(amax.to(dtype), dtype), dtype


def _write_packed(writer: ShardedWriter, u: Unit, packed_and_scale: tuple[torch.Tensor, torch.Tensor]) -> None:
    for suffix, tensor in ct.packed_tensors(*packed_and_scale).items():
        writer.write(f"{u.out}.{suffix}", tensor.cpu())


class _GroupCache:
    """Reads a fusion group once when it is small; streams it twice (amax pass, codes pass) when not."""

    def __init__(self, ckpt: Checkpoint, group: list[Unit], tick: Progress):
        self.ckpt, self.tick = ckpt, tick
        nbytes = sum(ckpt.tensors[u.source].nbytes * u.numel // ckpt.tensors[u.source].numel for u in group)
        self.cached: dict[int, list[torch.Tensor]] | None = {} if nbytes <= GROUP_CACHE_BYTES else None
        self.reads: dict[int, int] = {}

    def chunks(self, u: Unit) -> Iterator[torch.Tensor]:
        key = id(u)
        if self.cached is not None and key in self.cached:
            yield from self.cached[key]
            return
        first_read = key not in self.reads
        self.reads[key] = self.reads.get(key, 0) + 1
        kept = []
        for _, chunk in _read_chunks(self.ckpt, u, self.tick if first_read else None):
            if self.cached is not None:
                kept.append(chunk)
            yield chunk
        if self.cached is not None:
            self.cached[key] = kept


def _read_chunks(ckpt: Checkpoint, u: Unit, tick: Progress | None,
                 check_finite: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """Row chunks of a unit's 2-D view (elements for vectors), each checked for NaN/Inf."""
    info = ckpt.tensors[u.source]
    first, last = u.rows if u.rows else (0, info.num_rows)
    row_len = info.shape[-1] if len(info.shape) >= 2 else 1
    step = max(1, CHUNK_ELEMENTS // row_len)
    for a in range(first, last, step):
        b = min(a + step, last)
        chunk = ckpt.read_rows(u.source, a, b)
        if check_finite and chunk.is_floating_point():
            _check_finite(info, u, chunk, a)
        if tick:
            tick(chunk.numel() * chunk.element_size(), u.source)
        yield a, chunk


def _check_finite(info, u: Unit, chunk: torch.Tensor, row: int) -> None:
    if ops_cpu.all_finite(chunk):  # one native pass on CPU; torch below finds where, or decides
        return
    bad = ~torch.isfinite(chunk)
    if not bad.any():
        return
    idx = bad.nonzero()[0].tolist()
    what = "NaN" if torch.isnan(chunk[tuple(idx)]) else "Inf"
    row_len = info.shape[-1] if len(info.shape) >= 2 else 1
    flat = (row + idx[0]) * row_len + (idx[1] if len(idx) > 1 else 0)
    pos = [int(i) for i in torch.unravel_index(torch.tensor(flat), info.shape)] if info.shape else []
    if len(pos) == 2:
        where = f"row {pos[0]}, column {pos[1]}"
    else:
        where = f"element {pos[0]}" if len(pos) == 1 else f"index {pos}"
    raise TensorError(f"{info.path.name}: tensor {u.source} holds {what} at {where}; nvq only converts finite weights.")


def _write_config(ckpt: Checkpoint, plan: Plan, out_dir: Path, gptq: gptq_write.GPTQSettings | None) -> None:
    # Original keys are written back verbatim (both Gemma-4 dialects survive); only the
    # quantization_config is added.
    config = dict(ckpt.config.raw)
    if gptq is None:
        config["quantization_config"] = ct.quantization_config(plan.scheme, plan.ignore_list())
    else:
        qc = gptq_write.quantization_config(plan, gptq)
        config["quantization_config"] = qc
        # AutoGPTQ-era loaders read quantize_config.json; vLLM prefers config.json (formats.md §4.2)
        (out_dir / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n", encoding="utf-8")
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "config.json").write_text(text, encoding="utf-8")
