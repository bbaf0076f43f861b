"""The gptq scheme of `nvq convert`: settings, round-to-nearest or calibrated GPTQ over the plan's
quantized units, their GPTQ v1 tensors, and the quantization_config (formats.md §4)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvq import limits
from nvq.errors import ConfigError
from nvq.formats import int4
from nvq.io.hf import Checkpoint
from nvq.io.safetensors import ShardedWriter
from nvq.layouts import gptq as layout
from nvq.layouts import vllm_names
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

    def __post_init__(self) -> None:
        limits.check_group_size(self.group_size)
        for flag, value in (("--calib-samples", self.samples), ("--calib-seq-len", self.seq_len), ("--damp", self.damp)):
            limits.check_option(flag, value)

    def check(self) -> None:
        check_settings(self)


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
    """GPTQModel `dynamic` entries ("-:regex", matched from the start of module names) for what is
    kept dense, so engines build no GPTQ layer there: routers, recipe-kept Linears and expert
    stacks, and the architecture's towers. vLLM matches them against its runtime names, so each
    pattern also takes those (`nvq.layouts.vllm_names`)."""
    skips = {f"-:{vllm_names.runtime_regex(m)}": {} for m in plan.dense_modules()}
    skips.update({f"-:{vllm_names.expert_stack_regex(m)}": {} for m in plan.dense_expert_stacks()})
    skips.update({"-:" + p.removeprefix("re:"): {} for p in plan.arch.ignore_patterns if p.startswith("re:")})
    return skips


LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _quantized_modules(plan: Plan) -> list[list[str]]:
    """`modules_in_block_to_quantize`: the quantized Linear modules by full HF name, one list per
    decoder layer, with the shards vLLM fuses them with that the checkpoint lacks (v_proj on a
    k_eq_v layer). Without it vLLM infers the list from the weights' dtypes and refuses a fused
    layer whose shards are not all present (vLLM issue 53992). Per-expert slices of a fused stack
    are left out: vLLM's MoE layer never consults the list, and they are no HF modules."""
    quantized = sorted({u.out for u in plan.quantized if u.rows is None and u.role is Role.LINEAR})
    named = sorted(set(quantized) | set(vllm_names.absent_siblings(quantized, plan.linear_modules())))
    by_layer: dict[int, list[str]] = {}
    for m in named:
        hit = LAYER_INDEX.search(m + ".")
        by_layer.setdefault(int(hit[1]) if hit else -1, []).append(m)
    return [by_layer[k] for k in sorted(by_layer)]


def quantization_config(plan: Plan, s: GPTQSettings) -> dict:
    qc = layout.quantization_config(plan.group_size, s.damp, s.act_order, s.method)
    skips = _skip_patterns(plan)
    if skips:
        qc["dynamic"] = skips
    modules = _quantized_modules(plan)
    if modules:  # an empty list would mean "infer it" to vLLM
        qc["modules_in_block_to_quantize"] = modules
    return qc
