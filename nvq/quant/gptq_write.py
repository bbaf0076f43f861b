"""The gptq scheme of `nvq convert`: settings, round-to-nearest or calibrated GPTQ over the plan's
quantized units, their GPTQ v1 tensors, and the quantization_config (formats.md §4)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvq.errors import ConfigError
from nvq.formats import int4
from nvq.io.hf import Checkpoint
from nvq.io.safetensors import ShardedWriter
from nvq.layouts import gptq as layout
from nvq.models.base import Role
from nvq.quant import calib, calibrate
from nvq.quant.calibrate import GPTQReport, LayerDone
from nvq.quant.policy import Plan, Unit

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class GPTQSettings:
    method: str = "gptq"
    group_size: int | None = None  # None: 128, or the largest that aligns with --tp
    damp: float = calibrate.gptq.DEFAULT_DAMP
    act_order: bool = True
    calib_file: str | Path | None = None
    samples: int = calib.DEFAULT_SAMPLES
    seq_len: int = calib.DEFAULT_SEQ_LEN
    min_expert_tokens: int = calibrate.DEFAULT_MIN_EXPERT_TOKENS


@dataclass
class GPTQSummary:
    method: str
    group_size: int
    calibration: str | None = None  # "128 × 2048 tokens from embedded corpus"
    report: GPTQReport = field(default_factory=GPTQReport)
    seconds: float = 0.0


def check_settings(s: GPTQSettings) -> None:
    if s.method not in METHODS:
        raise ConfigError(f"--method {s.method!r} is not one of {', '.join(METHODS)}.")
    if not 0 < s.damp < 1:
        raise ConfigError(f"--damp {s.damp}: the dampening fraction lies in (0, 1).")


def _emitter(writer: ShardedWriter) -> calibrate.Emit:
    def emit(u: Unit, q: int4.Int4Quantized) -> None:
        for suffix, t in layout.pack(q).items():
            writer.write(f"{u.out}.{suffix}", t.cpu())
    return emit


def _vocab(plan: Plan, ckpt: Checkpoint) -> int:
    emb = next(u for u in plan.units if u.canonical == "token_embd.weight")
    return ckpt.tensors[emb.source].shape[0]


def quantize_all(ckpt: Checkpoint, plan: Plan, s: GPTQSettings, writer: ShardedWriter, device: torch.device,
                 tick, layer_done: LayerDone | None) -> GPTQSummary:
    started = time.perf_counter()
    summary = GPTQSummary(s.method, plan.group_size)
    emit = _emitter(writer)
    if s.method == "rtn":
        for u in plan.quantized:
            w = ckpt.read_rows(u.source, *u.rows) if u.rows else ckpt.read(u.source)
            tick(w.numel() * w.element_size(), u.source)
            emit(u, int4.quantize(w.reshape(u.shape).to(device), plan.group_size))
    else:
        data = calib.calibration_set(ckpt.path, _vocab(plan, ckpt), s.samples, s.seq_len, s.calib_file)
        overlap = " (windows overlap: the corpus is shorter)" if data.overlap else ""
        summary.calibration = f"{s.samples} × {s.seq_len} tokens from {data.source}{overlap}"
        options = calibrate.GPTQOptions(plan.group_size, s.damp, s.act_order, s.min_expert_tokens)

        def counted(u: Unit, q: int4.Int4Quantized) -> None:
            emit(u, q)
            tick(u.numel * ckpt.tensors[u.source].nbytes // max(ckpt.tensors[u.source].numel, 1), u.source)

        summary.report = calibrate.run_gptq(ckpt, plan, data.sequences, options, device, counted, layer_done)
    summary.seconds = time.perf_counter() - started
    return summary


def _skip_patterns(plan: Plan) -> dict[str, dict]:
    """GPTQModel `dynamic` entries ("-:regex", matched against module names) for Linear modules
    kept dense, so engines do not expect qweight there: routers, recipe-kept layers, and the
    architecture's towers (its compressed-tensors `re:` ignore patterns)."""
    dense = sorted({u.out.rsplit(".", 1)[0] for u in plan.kept if u.role in (Role.LINEAR, Role.ROUTER)})
    skips = {f"-:^{re.escape(m)}$": {} for m in dense}
    skips.update({"-:" + p.removeprefix("re:"): {} for p in plan.arch.ignore_patterns if p.startswith("re:")})
    return skips


def quantization_config(plan: Plan, s: GPTQSettings) -> dict:
    qc = layout.quantization_config(plan.group_size, s.damp, s.act_order, s.method)
    skips = _skip_patterns(plan)
    if skips:
        qc["dynamic"] = skips
    return qc
