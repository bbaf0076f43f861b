"""Streaming convert: read → quantize → pack → write, one fusion group at a time.

Reader threads run ahead, the device quantizes, a writer thread writes behind (nvq.quant.stream);
memory stays bounded by one fusion group (or, for large tensors, one row chunk) plus the chunks
in flight, never a whole-model load. Under torchrun each rank converts its share of the groups
into the same output files (nvq.dist); the bytes equal a single-process run's.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from nvq import dist, ops, ops_cpu, schemes
from nvq.errors import ConfigError, NvqError, TensorError
from nvq.io.atomic import atomic_output_dir
from nvq.io.gguf import is_gguf
from nvq.io.hf import Checkpoint
from nvq.io.safetensors import OutputTensor, ShardedWriter
from nvq.models.base import Role
from nvq.quant import act_scales, gptq_write, tp
from nvq.quant.policy import Plan, Unit, build_plan
from nvq.quant.recipe import load_recipe
from nvq.quant.stream import AsyncWriter, ChunkReader, Read

CHUNK_ELEMENTS = 1 << 24  # elements per read: 32 MiB of bf16, a 64 MiB fp32 working copy
GROUP_CACHE_BYTES = 512 << 20  # groups up to this size are read once, larger ones twice (amax, codes)
DEFAULT_SHARD_BYTES = 5 * 10**9
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
    activations: act_scales.ActivationReport | None = None  # W4A4 input-scale calibration (--activations)

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


def plan_convert(src: str | Path, scheme: str, recipe: str | Path | None = None,
                 group_size: int | None = None, tp_size: int | None = None) -> Plan:
    if is_gguf(src):
        raise ConfigError(
            f"{src} is a GGUF file; nvq plan describes quantizing a Hugging Face checkpoint, so "
            f"convert the GGUF first (nvq convert {src} OUT --scheme {schemes.dense().name})."
        )
    spec = schemes.get(scheme)
    if spec.dense:
        raise ConfigError(
            f"nvq plan describes quantization; --scheme {scheme} quantizes nothing (it converts "
            f"a GGUF file to a dense checkpoint), so there is no plan to show."
        )
    return _plan(Checkpoint.open(src), spec, recipe, group_size, tp_size)


def _plan(ckpt: Checkpoint, spec: schemes.SchemeSpec, recipe, group_size: int | None, tp_size: int | None) -> Plan:
    """The plan, checked for `tp_size` ranks. A scheme that may pick its group size (GPTQ) takes,
    without an explicit one, the largest that aligns, and the plan's warnings name the weights
    its first choice would have broken."""
    plan = _default_plan(ckpt, spec, recipe) if group_size is None else \
        build_plan(ckpt, spec.name, load_recipe(recipe), group_size)
    if not tp_size:
        return plan
    broken = tp.misalignments(plan, tp_size)
    if broken and len(spec.group_sizes) > 1 and group_size is None:
        picked = tp.aligned_group_size(plan, tp_size)
        if picked is not None:
            aligned = build_plan(ckpt, spec.name, load_recipe(recipe), picked)
            names = ", ".join(m.weight for m in broken[:4]) + (f" and {len(broken) - 4} more" if len(broken) > 4 else "")
            aligned.warnings.append(
                f"--tp {tp_size}: group size {picked} instead of {plan.group_size}, which would have split "
                f"groups across ranks in {len(broken)} weight(s): {names}."
            )
            plan = aligned
    tp.check(plan, tp_size)
    return plan


def _default_plan(ckpt: Checkpoint, spec: schemes.SchemeSpec, recipe) -> Plan:
    """The plan at the scheme's first group size, or the largest later one that tiles every weight
    (with a warning): GPTQ tries 128, 64, 32."""
    first_error = None
    for g in spec.group_sizes:
        try:
            plan = build_plan(ckpt, spec.name, load_recipe(recipe), g)
        except TensorError as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            why = str(first_error).split(";")[0]
            plan.warnings.append(f"{spec.name.upper()} group size {g}, the largest that tiles every weight ({why}).")
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
    activations: act_scales.ActivationSettings | None = None,
) -> ConvertSummary:
    """SRC (HF directory, or GGUF file for the dense scheme bf16) → OUT. `dtype` ("bfloat16",
    "float32") is the weight dtype of the dense output; it does not apply to quantized schemes.
    `gptq` holds the settings of a calibrated scheme (GPTQ's method and calibration); `tp_size` checks
    tensor-parallel alignment (any scheme); `activations` calibrates NVFP4 input scales (W4A4).
    `force` replaces an earlier nvq output at OUT; `replace_any` (with
    `force`) replaces whatever directory is there. OUT may never be, hold, or sit inside SRC."""
    started = time.perf_counter()
    spec, dense = schemes.get(scheme), schemes.dense().name
    if is_gguf(src):
        if not spec.dense:
            raise ConfigError(
                f"{src} is a GGUF file, which nvq converts to a dense checkpoint only "
                f"(--scheme {dense}); convert it to {dense} first, then quantize "
                f"that directory with --scheme {scheme}."
            )
        return _convert_gguf(src, out, dtype or "bfloat16", force, replace_any, max_shard_bytes, progress,
                             started)
    if spec.dense:
        raise ConfigError(
            f"--scheme {scheme} converts a GGUF file to a dense checkpoint; {src} is not a "
            f"GGUF file (a Hugging Face directory is quantized with {' or '.join(schemes.quantized_names())})."
        )
    if dtype is not None:
        raise ConfigError(f"--dtype applies to --scheme {dense} only, not to {scheme}.")
    if gptq is not None and spec.settings is None:
        takes = [s.name for s in schemes.all_schemes() if s.settings is not None]
        raise ConfigError(f"GPTQ settings (--method, --group-size, --calib-*) apply to --scheme {' or '.join(takes)} only.")
    settings = (gptq or spec.settings()) if spec.settings else None
    act_scales.check(scheme, activations)
    world = dist.join()
    dev = world.device(resolve_device(device).type)
    _warm_up(dev)
    ckpt = Checkpoint.open(src)
    plan = _plan(ckpt, spec, recipe, settings.group_size if settings else None, tp_size)
    if settings is not None:
        settings.check()
    out = Path(out)
    summary = ConvertSummary(
        out=out, scheme=scheme, quantized=len(plan.quantized), kept=len(plan.kept), dropped=len(plan.dropped),
        params=sum(u.numel for u in plan.units), params_quantized=sum(u.numel for u in plan.quantized),
        bytes_written=0, bytes_quantized=0, seconds=0.0, device=str(dev), warnings=list(plan.warnings),
        serving_notes=spec.serving_notes(ckpt.config.get("torch_dtype") or ckpt.config.get("dtype")),
    )
    tick = progress or (lambda n, name: None)
    # Ranks split whole runs (a group, or an MoE stack's consecutive experts) so batches stay whole.
    # a whole-model scheme (GPTQ calibrates in one forward) leaves only the dense tensors to stream
    runs = _expert_runs(ckpt, [g for g in plan.groups() if spec.stream is not None or g[0].scheme is None])
    owners = dist.split_by_size([sum(_group_bytes(ckpt, g) for g in run) for run in runs], world.size)
    mine = [run for run, r in zip(runs, owners, strict=True) if r == world.rank]
    with _shared_output_dir(world, out, force, replace_any, ckpt.input_paths()) as tmp:
        outputs = plan.output_tensors()
        owned = {t.name for run in mine for g in run for u in g for t in _unit_outputs(plan, u)}
        if activations is not None:  # W4A4: input scales, calibrated on rank 0 (one forward)
            outputs += act_scales.output_tensors(plan)
            owned |= {t.name for t in act_scales.output_tensors(plan)} if world.is_main else set()
        if spec.whole_model is not None and world.is_main:  # rank 0 calibrates (one forward, in order)
            owned |= {t.name for u in plan.quantized for t in _unit_outputs(plan, u)}
        if world.is_main:
            writer = ShardedWriter(tmp, outputs, max_shard_bytes, owned=owned)
            world.barrier()
        else:
            world.barrier()
            writer = ShardedWriter(tmp, outputs, max_shard_bytes, create=False, owned=owned)
        try:
            _stream_groups(ckpt, mine, writer, dev, tick, summary)
            if spec.whole_model is not None and world.is_main:
                summary.gptq = spec.whole_model(ckpt, plan, settings, writer, dev, tick, layer_progress)
                summary.backends.append("reference")
            if activations is not None and world.is_main:
                summary.activations = act_scales.write_all(ckpt, plan, activations, writer, dev)
                summary.serving_notes.append(act_scales.SERVING_NOTE)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _merge_rank_summaries(world, summary)
        if world.is_main:
            _write_config(ckpt, plan, spec, settings, tmp, activations is not None)
            ckpt.copy_side_files(tmp)
        summary.bytes_written = sum(t.nbytes for t in outputs)
        summary.bytes_quantized = sum(t.nbytes for u in plan.quantized for t in plan.layout.output_tensors(u.out, u.shape))
    summary.seconds = time.perf_counter() - started
    return summary


def _warm_up(dev: torch.device) -> None:
    """Start the CUDA context and load the kernels while headers are parsed and the plan is built:
    both take a second or more, and the first page-locked read buffer waits for the context."""
    if dev.type == "cuda":
        threading.Thread(target=lambda: (torch.zeros(1, device=dev), ops.kernels_available()),
                         name="nvq-cuda-init", daemon=True).start()


def _unit_outputs(plan: Plan, u: Unit) -> list[OutputTensor]:
    return plan.layout.output_tensors(u.out, u.shape) if u.scheme else [OutputTensor(u.out, u.dtype, u.shape)]


def _group_bytes(ckpt: Checkpoint, group: list[Unit]) -> int:
    return sum(ckpt.tensors[u.source].nbytes * u.numel // max(ckpt.tensors[u.source].numel, 1) for u in group)


@contextmanager
def _shared_output_dir(world: dist.World, out: Path, force: bool, replace_any: bool,
                       inputs: list[Path]) -> Iterator[Path]:
    """Rank 0's atomic temporary output directory, on every rank. Rank 0 swaps it in only after
    every rank has written its share; a refusal on rank 0 (OUT exists, say) is raised on all."""
    if not world.distributed:
        with atomic_output_dir(out, force, replace_any=replace_any, inputs=inputs) as tmp:
            yield tmp
        return
    if not world.is_main:
        status, value = world.broadcast(None)
        if status == "error":
            raise ConfigError(value)
        yield Path(value)
        world.barrier()  # rank 0 finishes the directory after this
        return
    try:
        ctx = atomic_output_dir(out, force, replace_any=replace_any, inputs=inputs)
        tmp = ctx.__enter__()
    except NvqError as e:
        world.broadcast(("error", str(e)))
        raise
    world.broadcast(("ok", str(tmp)))
    try:
        yield tmp
        world.barrier()
    except BaseException:
        if not ctx.__exit__(*sys.exc_info()):
            raise
    else:
        ctx.__exit__(None, None, None)


def _merge_rank_summaries(world: dist.World, summary: ConvertSummary) -> None:
    """What each rank noted (backends, fp32 groups) into every rank's summary, in rank order."""
    if not world.distributed:
        return
    parts = world.gather((summary.backends, summary.fp32_groups))
    summary.backends = list(dict.fromkeys(b for backends, _ in parts for b in backends))
    summary.fp32_groups = [g for _, groups in parts for g in groups]


def _convert_gguf(src, out, dtype: str, force: bool, replace_any: bool, max_shard_bytes: int,
                  progress: Progress | None, started: float) -> ConvertSummary:
    from nvq.io.gguf_to_hf import convert_gguf_to_hf

    export = convert_gguf_to_hf(src, out, dtype=dtype, force=force, replace_any=replace_any,
                                max_shard_bytes=max_shard_bytes,
                                progress=progress)
    return ConvertSummary(
        out=export.out, scheme=schemes.dense().name if dtype == "bfloat16" else "f32",
        quantized=0, kept=export.tensors, dropped=len(export.consumed) + len(export.dropped),
        params=export.params, params_quantized=0, bytes_written=export.bytes_written, bytes_quantized=0,
        seconds=time.perf_counter() - started, device="cpu", warnings=export.warnings,
    )


def _stream_groups(ckpt: Checkpoint, runs: list[list[list[Unit]]], writer: ShardedWriter, dev: torch.device,
                   tick: Progress, summary: ConvertSummary) -> None:
    """Every run of groups through the pipeline: reads run ahead on reader threads (into
    page-locked buffers when quantizing on a GPU), the device quantizes, the writer thread
    writes behind."""
    on_gpu = dev.type == "cuda"
    work = [_ExpertRunWork(ckpt, run, on_gpu) if len(run) > 1 else _GroupWork(ckpt, run[0], on_gpu)
            for run in runs]
    reads = (r for w in work for r in w.reads())
    with ChunkReader(reads, pin=on_gpu) as reader, AsyncWriter(writer) as sink:
        for w in work:
            w.run(reader, sink, dev, tick, summary)


def _row_ranges(info, u: Unit) -> Iterator[tuple[int, int]]:
    """Row chunks of a unit's 2-D view (elements for vectors), CHUNK_ELEMENTS at a time."""
    first, last = u.rows if u.rows else (0, info.num_rows)
    row_len = info.shape[-1] if len(info.shape) >= 2 else 1
    step = max(1, CHUNK_ELEMENTS // row_len)
    for a in range(first, last, step):
        yield a, min(a + step, last)


class _GroupWork:
    """One fusion group's reads, planned up front so the reader can run ahead across groups, and
    its processing. A group that shares a global scale (NVFP4) needs its amax before any code: a group up to
    GROUP_CACHE_BYTES is read once and kept (on the device when there is one); a larger one is
    streamed twice."""

    def __init__(self, ckpt: Checkpoint, group: list[Unit], on_gpu: bool):
        self.ckpt, self.group = ckpt, group
        self.scheme = group[0].scheme
        self.stream = schemes.get(self.scheme).stream if self.scheme else None
        shared = self.stream is not None and self.stream.global_scale is not None
        self.two_pass = shared and _group_bytes(ckpt, group) > GROUP_CACHE_BYTES
        # The device checks what it quantizes; the reader threads check the rest on the host.
        self.host_checks = not (on_gpu and self.scheme)

    def reads(self) -> Iterator[Read]:
        for first in (True, False) if self.two_pass else (True,):
            for u in self.group:
                info = self.ckpt.tensors[u.source]
                # towers pass through untouched: transformers writes ±inf clip bounds there
                check = None
                if first and self.host_checks and u.role is not Role.TOWER:
                    check = partial(_check_finite_rows, info, u)
                for a, b in _row_ranges(info, u):
                    yield Read(info, a, b, first, check)

    def _take(self, reader: ChunkReader, u: Unit, tick: Progress) -> Iterator[tuple[int, torch.Tensor]]:
        info = self.ckpt.tensors[u.source]
        for a, b in _row_ranges(info, u):
            r, chunk = next(reader)
            assert r.info is info and (r.start, r.stop) == (a, b), "reader out of step with its plan"
            if r.first:
                tick(chunk.numel() * chunk.element_size(), u.source)
            yield a, chunk

    def run(self, reader: ChunkReader, sink: AsyncWriter, dev: torch.device, tick: Progress,
            summary: ConvertSummary) -> None:
        if self.scheme is None:
            for u in self.group:
                for _, chunk in self._take(reader, u, tick):
                    sink.submit([(u.out, chunk)])
            return
        stream = self.stream
        if stream.global_scale is not None:
            if self.two_pass:
                amax = None
                for u in self.group:
                    for a, chunk in self._take(reader, u, tick):
                        x = self._on_device(chunk, dev, u, a, sink)
                        amax = _max(amax, ops.tensor_amax(x))
                cached = None
            else:
                cached = [(u, a, self._on_device(chunk, dev, u, a, sink))
                          for u in self.group for a, chunk in self._take(reader, u, tick)]
                amax = None
                for _, _, x in cached:
                    amax = _max(amax, ops.tensor_amax(x))
            global_scale, compute_dtype = _group_global_scale(self.group, amax, stream.global_scale, summary)
            chunks = cached if cached is not None else (
                (u, a, chunk.to(dev, non_blocking=True)) for u in self.group for a, chunk in self._take(reader, u, tick))
            for u, _, x in chunks:
                self._submit_packed(sink, u, stream.quantize(x.to(compute_dtype), global_scale))
            for u in self.group:
                sink.submit([(f"{u.out}.{stream.global_scale.suffix}", global_scale)])
        else:
            for u in self.group:
                for a, chunk in self._take(reader, u, tick):
                    x = self._on_device(chunk, dev, u, a, sink)
                    self._submit_packed(sink, u, stream.quantize(x, None))
        _note_backend(summary, stream.op)

    def _on_device(self, chunk: torch.Tensor, dev: torch.device, u: Unit, row: int, sink: AsyncWriter) -> torch.Tensor:
        """The chunk on `dev`; on a GPU its finite check is queued with the writes (no sync here)."""
        x = chunk.to(dev, non_blocking=True)
        if not self.host_checks and x.is_floating_point():
            info = self.ckpt.tensors[u.source]
            sink.submit([], finite=torch.isfinite(x).all(),
                        on_nonfinite=partial(_locate_nonfinite, self.ckpt, info, u, row, x.shape[0]))
        return x

    def _submit_packed(self, sink: AsyncWriter, u: Unit, packed_and_scale: tuple[torch.Tensor, torch.Tensor]) -> None:
        sink.submit([(f"{u.out}.{suffix}", t) for suffix, t in self.stream.pack(*packed_and_scale).items()])


def _expert_slice(ckpt: Checkpoint, group: list[Unit]) -> tuple[str, int, int] | None:
    """(source, expert index, rows per expert) when the group is exactly one expert of a 3-D stack
    in bf16/fp32 (fp16 groups keep the per-group path and its fp32 fallback), its units in row
    order; else None."""
    u0 = group[0]
    info = ckpt.tensors[u0.source]
    if (u0.scheme is None or len(info.shape) != 3 or u0.dtype == "F16" or u0.rows is None
            or any(u.source != u0.source or u.rows is None for u in group)):
        return None
    per_expert = info.shape[1]
    first, last = u0.rows[0], group[-1].rows[1]
    contiguous = all(a.rows[1] == b.rows[0] for a, b in zip(group, group[1:], strict=False))
    if not contiguous or first % per_expert or last - first != per_expert:
        return None
    return u0.source, first // per_expert, per_expert


def _expert_runs(ckpt: Checkpoint, groups: list[list[Unit]]) -> list[list[list[Unit]]]:
    """Groups in order, with consecutive whole-expert groups of one stack (an MoE layer's
    per-expert gate/up or down) collected into runs that are quantized in batched launches."""
    runs: list[list[list[Unit]]] = []
    last = None
    for g in groups:
        here = _expert_slice(ckpt, g)
        if here is not None and last is not None and runs and \
                (here[0], here[1] - 1, here[2]) == last and g[0].scheme == runs[-1][0][0].scheme:
            runs[-1].append(g)
        else:
            runs.append([g])
        last = here
    return runs


class _ExpertRunWork:
    """Consecutive experts of one stack, read a few experts at a time and quantized per batch:
    one amax and one quantize launch for all of them instead of several per expert. Each expert
    still gets its own global scale where the scheme has one (NVFP4: shared by its gate and up),
    as a per-group run gives."""

    def __init__(self, ckpt: Checkpoint, groups: list[list[Unit]], on_gpu: bool):
        self.ckpt, self.groups = ckpt, groups
        self.info = ckpt.tensors[groups[0][0].source]
        self.stream = schemes.get(groups[0][0].scheme).stream
        self.rows_per_expert = self.info.shape[1]
        self.first_row = groups[0][0].rows[0]
        self.host_checks = not on_gpu
        row_len = self.info.shape[-1]
        self.batch = max(1, CHUNK_ELEMENTS // (self.rows_per_expert * row_len))

    def _batches(self) -> Iterator[list[list[Unit]]]:
        for i in range(0, len(self.groups), self.batch):
            yield self.groups[i:i + self.batch]

    def _rows(self, batch: list[list[Unit]]) -> tuple[int, int]:
        return batch[0][0].rows[0], batch[-1][-1].rows[1]

    def reads(self) -> Iterator[Read]:
        u = self.groups[0][0]
        check = partial(_check_finite_rows, self.info, u) if self.host_checks else None
        for batch in self._batches():
            a, b = self._rows(batch)
            yield Read(self.info, a, b, True, check)

    def run(self, reader: ChunkReader, sink: AsyncWriter, dev: torch.device, tick: Progress,
            summary: ConvertSummary) -> None:
        for batch in self._batches():
            a, b = self._rows(batch)
            r, chunk = next(reader)
            assert r.info is self.info and (r.start, r.stop) == (a, b), "reader out of step with its plan"
            tick(chunk.numel() * chunk.element_size(), self.info.name)
            x = chunk.to(dev, non_blocking=True)
            if not self.host_checks:
                sink.submit([], finite=torch.isfinite(x).all(),
                            on_nonfinite=partial(_locate_nonfinite, self.ckpt, self.info, batch[0][0], a, b - a))
            stack = x.reshape(len(batch), self.rows_per_expert, x.shape[-1])
            packed, scale, global_scale = self.stream.quantize_experts(stack)
            for e, group in enumerate(batch):
                base = group[0].rows[0]
                for u in group:
                    lo, hi = u.rows[0] - base, u.rows[1] - base
                    writes = [(f"{u.out}.{suffix}", t[e, lo:hi])
                              for suffix, t in self.stream.pack(packed, scale).items()]
                    if global_scale is not None:
                        writes.append((f"{u.out}.{self.stream.global_scale.suffix}", global_scale[e:e + 1]))
                    sink.submit(writes)
        _note_backend(summary, self.stream.experts_op)


def _max(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.maximum(a, b)


def _note_backend(summary: ConvertSummary, op: str) -> None:
    used = BACKEND_NAMES[ops.backend(op)]
    if used not in summary.backends:
        summary.backends.append(used)


def _group_global_scale(group: list[Unit], amax: torch.Tensor, shared: schemes.GlobalScale,
                        summary: ConvertSummary) -> tuple[torch.Tensor, torch.dtype]:
    dtypes = {u.dtype for u in group}
    if len(dtypes) > 1:
        names = ", ".join(u.source for u in group)
        raise TensorError(f"fusion group {names} mixes dtypes {sorted(dtypes)}; its members must share one dtype.")
    global_scale, dtype = shared.compute(amax)
    if dtype != amax.dtype:  # the scheme computes this group in another precision; the summary says so
        summary.fp32_groups.append(group[0].out)
    return global_scale, dtype


def _check_finite_rows(info, u: Unit, chunk: torch.Tensor, row: int) -> None:
    """Reader-thread check of the rows from `row` read from `info` for unit `u`: one native pass
    on CPU (torch's isfinite runs at a fraction of the codec's speed); torch then names where."""
    if chunk.is_floating_point() and not ops_cpu.all_finite(chunk):
        _raise_nonfinite(info, u, chunk, row)


def _locate_nonfinite(ckpt: Checkpoint, info, u: Unit, row: int, rows: int) -> None:
    """Re-read rows the device found non-finite and raise the error naming the first one."""
    chunk = ckpt.read_rows(u.source, row, row + rows)
    _raise_nonfinite(info, u, chunk, row)
    raise TensorError(f"{info.path.name}: tensor {u.source} read back finite after the device saw NaN/Inf "
                      f"in rows {row}..{row + rows}; the file changed while it was converted.")


def _raise_nonfinite(info, u: Unit, chunk: torch.Tensor, row: int) -> None:
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


def _write_config(ckpt: Checkpoint, plan: Plan, spec: schemes.SchemeSpec, settings, out_dir: Path,
                  w4a4: bool = False) -> None:
    # Original keys are written back verbatim (both Gemma-4 dialects survive); only the
    # quantization_config is added.
    config = dict(ckpt.config.raw)
    qc = spec.quantization_config(plan, settings)
    if w4a4:
        act_scales.add_to_config(qc)
    config["quantization_config"] = qc
    for name in spec.config_copies:
        (out_dir / name).write_text(json.dumps(qc, indent=2) + "\n", encoding="utf-8")
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "config.json").write_text(text, encoding="utf-8")
