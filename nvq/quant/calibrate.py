"""GPTQ over a whole model: plan units ↔ the weights the reference forward reads, the sequential
capture, the solver, and what each solved weight becomes on disk.

Weights live on the compute device in fp32, loaded when the forward first reads them and dropped
once every calibration sequence has left their layer; each solved weight is replaced in place by
its dequantization (so later layers see the quantized model) and handed to `emit` at once.

MoE experts get Hessians from the tokens routed to them. Fallback for an expert that sees fewer
than `min_expert_tokens` tokens (or none): its gate/up projections use the Hessian of every token
entering the MoE block, its down projection is rounded to nearest (its inputs exist only for the
tokens routed to it). The summary lists these experts.

Calibration sequences park between Linears (nvq.quant.capture); on CUDA their activations past
`park_budget` bytes wait in pinned host memory (nvq.quant.offload), which bounds GPU memory by the
budget instead of by the number of sequences, with the same bytes out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nvq.formats import int4
from nvq.io.hf import Checkpoint
from nvq.models import Architecture
from nvq.models.base import EXPERT_ROLES
from nvq.models.load import canonical_names
from nvq.quant import gptq
from nvq.quant.capture import Hessian, Request, SequentialCapture, expert_of, stack_name
from nvq.quant.offload import DEFAULT_BUDGET, Offload
from nvq.quant.policy import Plan, Unit

DEFAULT_MIN_EXPERT_TOKENS = 32


@dataclass(frozen=True)
class GPTQOptions:
    group_size: int
    damp: float = gptq.DEFAULT_DAMP
    act_order: bool = True
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS
    # bytes of parked activations kept on the device; None: DEFAULT_BUDGET on CUDA, and no
    # offloading elsewhere (host to host would only copy)
    park_budget: int | None = None


def _offload(options: GPTQOptions, device: torch.device) -> Offload | None:
    if options.park_budget is not None:
        return Offload(options.park_budget)
    return Offload(DEFAULT_BUDGET) if device.type == "cuda" else None


@dataclass
class LayerStats:
    layer: int
    errors: list[float] = field(default_factory=list)  # relative output error per weight

    @property
    def mean(self) -> float:
        return sum(self.errors) / len(self.errors) if self.errors else 0.0


@dataclass
class GPTQReport:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    fallback_experts: list[str] = field(default_factory=list)  # "blk.3 expert 17 (5 tokens)"
    raised_damp: list[str] = field(default_factory=list)  # weights whose Hessian needed more dampening
    rtn_weights: list[str] = field(default_factory=list)  # quantizable weights no sequence reached

    @property
    def mean_error(self) -> float:
        errs = [e for s in self.layers.values() for e in s.errors]
        return sum(errs) / len(errs) if errs else 0.0

    @property
    def worst_layer(self) -> LayerStats | None:
        return max(self.layers.values(), key=lambda s: s.mean, default=None)


Emit = Callable[[Unit, int4.Int4Quantized], None]
LayerDone = Callable[[LayerStats, int], None]  # (stats of the finished layer, number of layers)


class DeviceWeights:
    """Canonical name → fp32 tensor on the device, read from the checkpoint on first use."""

    def __init__(self, ckpt: Checkpoint, sources: dict[str, str], device: torch.device):
        self.ckpt, self.sources, self.device = ckpt, sources, device
        self.cache: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.cache.get(name)
        if t is None:
            t = self.ckpt.read(self.sources[name]).to(self.device, torch.float32)
            self.cache[name] = t
            self._names[id(t)] = name
        return t

    def name_of(self, t: torch.Tensor) -> str | None:
        name = self._names.get(id(t))
        return name if name is not None and self.cache.get(name) is t else None

    def drop_layers_before(self, layer: int) -> None:
        # global tensors (embeddings, head, PLE projection) have layer −1 and stay
        for name in [n for n in self.cache if 0 <= Request(n).layer < layer]:
            del self._names[id(self.cache.pop(name))]


def linear_requests(plan: Plan, canonical_of: dict[str, str], ckpt: Checkpoint) -> dict[Request, list[Unit]]:
    """Which plan units each request quantizes (an expert's gate and up rows are two units)."""
    out: dict[Request, list[Unit]] = {}
    for u in plan.quantized:
        weight = canonical_of[u.source]
        expert = expert_of(weight)  # a per-expert Linear (Qwen3-MoE): `…_exps.weight[E]`
        if u.role in EXPERT_ROLES:
            rows_per_expert = ckpt.tensors[u.source].shape[1]
            expert = u.rows[0] // rows_per_expert
        out.setdefault(Request(weight, expert), []).append(u)
    return out


def _unit_view(weights: DeviceWeights, req: Request, u: Unit) -> torch.Tensor:
    t = weights[req.weight]
    if u.rows is None:
        return t
    return t.reshape(-1, t.shape[-1])[u.rows[0] : u.rows[1]]


def run_gptq(
    ckpt: Checkpoint,
    plan: Plan,
    sequences: list[torch.Tensor],
    options: GPTQOptions,
    device: torch.device,
    emit: Emit,
    layer_done: LayerDone | None = None,
) -> GPTQReport:
    """Quantize every planned weight with GPTQ on `sequences`, calling `emit` for each unit."""
    arch: Architecture = plan.arch
    names = canonical_names(ckpt, arch, ckpt.tensors)
    weights = DeviceWeights(ckpt, {c: s for s, c in names.items()}, device)
    requests = linear_requests(plan, names, ckpt)
    report = GPTQReport()
    n_layers = 1 + max((r.layer for r in requests), default=-1)
    state = {"layer": -1}

    def finish_layers_before(layer: int) -> None:
        for r in sorted((r for r in requests if r.layer < layer and r not in capture.solved),
                        key=lambda r: (r.layer, r.expert or 0, r.weight)):
            solve(r, None, capture.moe_inputs.get(stack_name(r.weight)))
            capture.solved.add(r)
        for i in range(max(state["layer"], 0), layer):
            if i in report.layers and layer_done:
                layer_done(report.layers[i], n_layers)
        weights.drop_layers_before(layer)
        state["layer"] = max(state["layer"], layer)

    def hessian_for(req: Request, h: Hessian | None, moe_all: Hessian | None) -> torch.Tensor | None:
        if req.expert is None:
            if h is None:
                report.rtn_weights.append(req.weight)
            return None if h is None else h.value()
        rows = h.rows if h is not None else 0
        if rows >= options.min_expert_tokens:
            return h.value()
        note = f"blk.{req.layer} expert {req.expert} ({rows} tokens)"
        if note not in report.fallback_experts:  # gate/up and down of one expert: one note
            report.fallback_experts.append(note)
        if "down" in req.weight or moe_all is None:
            return None
        return moe_all.value()

    def solve(req: Request, h: Hessian | None, moe_all: Hessian | None) -> None:
        if req.layer > state["layer"]:
            finish_layers_before(req.layer)
        hessian = hessian_for(req, h, moe_all)
        stats = report.layers.setdefault(req.layer, LayerStats(req.layer))
        for u in requests[req]:
            view = _unit_view(weights, req, u)
            sol = gptq.solve(view, hessian, options.group_size, options.damp, options.act_order)
            if sol.damp > options.damp:
                report.raised_damp.append(f"{u.out} (dampening {sol.damp:.2f})")
            view.copy_(int4.dequantize(sol.quantized, torch.float32))
            stats.errors.append(sol.error)
            emit(u, sol.quantized)

    capture = SequentialCapture(weights.name_of, requests, solve, _offload(options, device))

    def forward(i: int, taps, observer) -> None:
        with torch.no_grad():
            arch.module.forward(arch.config, weights, sequences[i], taps=taps, dtype=torch.float32,
                                device=device, observer=observer)

    with _tf32(device):
        capture.run(len(sequences), forward)
        finish_layers_before(n_layers + 1)
    return report


class _tf32:
    """TF32 matmuls on CUDA while calibrating: Hessians and activations need ~1e-3, not fp32 exactness."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.saved
