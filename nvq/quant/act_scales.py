"""NVFP4 activation scales (W4A4, `nvq convert --scheme nvfp4 --activations nvfp4`): each quantized
Linear's `input_global_scale` g_x = 2688 / A_x, with A_x the absmax of its input over the
calibration tokens, computed as llm-compressor's `NVFP4` preset does (`static_minmax` observer,
`generate_gparam`; docs/llmcompressor-input-global-scale.md):

* activations come from the dense model (llm-compressor disables quantization while it
  calibrates), run through nvq's fp32 reference forward one layer at a time for all sequences;
* A_x is rounded to the model dtype, then g_x = rnd_dt(rnd_dt(1/A_x)·2688) (formats.md §1.2);
* members of a fusion group (q/k/v, gate/up, an expert's gate/up) share the largest A_x: they
  read the same input, and vLLM requires one input scale per fused layer;
* MoE experts are calibrated on the tokens routed to them. An expert with fewer than
  `min_expert_tokens` tokens takes, for gate/up, the absmax of every token entering its MoE block
  (what llm-compressor's default `moe_calibrate_all_experts` gives every expert), and for down the
  largest down-input absmax among its layer's calibrated experts (among all its layer's experts
  that saw a token when none is calibrated). The summary lists them. A module no token reached
  gets g_x = 1, llm-compressor's fallback for uncalibrated experts.
* `headroom` multiplies every A_x (> 1 leaves room above the calibrated range, < 1 clips).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvq.errors import ConfigError
from nvq.formats import nvfp4
from nvq.io.hf import Checkpoint
from nvq.io.safetensors import OutputTensor, ShardedWriter
from nvq.models import layers as L
from nvq.models.load import canonical_names
from nvq.quant import calib
from nvq.quant.calibrate import DEFAULT_MIN_EXPERT_TOKENS, DeviceWeights, linear_requests
from nvq.quant.capture import Request, stack_name
from nvq.quant.policy import Plan, Unit

ACTIVATION_KINDS = ("nvfp4",)
# schemes whose checkpoints can carry NVFP4 input scales (compressed-tensors `NVFP4` preset)
SCHEMES_WITH_ACTIVATIONS = {"nvfp4": "nvfp4"}
INPUT_SCALE = "input_global_scale"
SERVING_NOTE = (
    "vLLM serves W4A4 NVFP4 with FP4 activations on Blackwell (SM100+) and the weights only (Marlin) "
    "before it; `nvq verify` certifies the W4A4 arithmetic, `--serve-as vllm` the weight-only one."
)

# compressed-tensors `NVFP4` preset's input_activations as CT 0.20 serializes them (formats.md §1.4;
# llm-compressor 0.14 with CT 0.19 also writes the keys that are null, which CT 0.20 reads alike)
INPUT_ACTIVATIONS_ARGS = {
    "num_bits": 4,
    "type": "float",
    "symmetric": True,
    "group_size": 16,
    "strategy": "tensor_group",
    "dynamic": "local",
    "scale_dtype": "torch.float8_e4m3fn",
    "observer": "static_minmax",
}


@dataclass(frozen=True)
class ActivationSettings:
    kind: str = "nvfp4"
    calib_file: str | Path | None = None
    samples: int = calib.DEFAULT_SAMPLES
    seq_len: int = calib.DEFAULT_SEQ_LEN
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS
    headroom: float = 1.0


@dataclass
class ActivationReport:
    calibration: str = ""  # "32 × 512 tokens from embedded corpus"
    fallback_experts: list[str] = field(default_factory=list)  # "blk.3 expert 17 (5 tokens)"
    unreached: list[str] = field(default_factory=list)  # modules no token reached: g_x = 1
    seconds: float = 0.0


def check(scheme: str, settings: ActivationSettings | None) -> None:
    """Exit-2 errors for an activation request the scheme cannot carry."""
    if settings is None:
        return
    if settings.kind not in ACTIVATION_KINDS:
        raise ConfigError(
            f"--activations {settings.kind} is not known; choose one of {', '.join(ACTIVATION_KINDS)}."
        )
    if SCHEMES_WITH_ACTIVATIONS.get(scheme) != settings.kind:
        raise ConfigError(
            f"--activations {settings.kind} applies to --scheme nvfp4 only, not to {scheme}."
        )
    if not settings.headroom > 0:
        raise ConfigError(f"--act-headroom must be a positive number, not {settings.headroom}.")


def output_tensors(plan: Plan) -> list[OutputTensor]:
    """One F32 [1] input_global_scale per quantized module (formats.md §1.1)."""
    return [OutputTensor(f"{u.out}.{INPUT_SCALE}", "F32", (1,)) for u in plan.quantized]


def add_to_config(quantization_config: dict) -> dict:
    """The weight-only config made W4A4: `input_activations` in every config group."""
    for group in quantization_config["config_groups"].values():
        group["input_activations"] = dict(INPUT_ACTIVATIONS_ARGS)
    return quantization_config


# -- calibration -----------------------------------------------------------------------------


class _AbsMax:
    """Linear observer: running input absmax and token count per (weight, expert)."""

    def __init__(self, weights: DeviceWeights):
        self.weights = weights
        self.amax: dict[Request, torch.Tensor] = {}
        self.tokens: dict[Request, int] = {}
        self.moe_inputs: dict[
            str, torch.Tensor
        ] = {}  # stack -> absmax of every token entering its block

    def keep(self, t: torch.Tensor) -> None:
        pass  # nothing is parked: every sequence advances one layer in step

    def linear(self, x: torch.Tensor, weight, expert: int | None) -> None:
        name = weight.name if isinstance(weight, L.ExpertModules) else self.weights.name_of(weight)
        if name is None or x.numel() == 0:
            return
        a = x.detach().abs().amax().float()
        if expert == L.ALL_EXPERTS:
            self.moe_inputs[name] = _max(self.moe_inputs.get(name), a)
            return
        req = Request(name, expert)
        self.amax[req] = _max(self.amax.get(req), a)
        self.tokens[req] = self.tokens.get(req, 0) + x.reshape(-1, x.shape[-1]).shape[0]


def _max(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.maximum(a, b)


def observe_inputs(
    ckpt: Checkpoint, plan: Plan, sequences: list[torch.Tensor], device: torch.device
) -> _AbsMax:
    """Runs every sequence through the dense reference forward, all in step one layer at a time
    (so one layer's weights are in memory), recording each Linear's input absmax."""
    arch = plan.arch
    names = canonical_names(ckpt, arch, ckpt.tensors)
    weights = DeviceWeights(ckpt, {c: s for s, c in names.items()}, device)
    observer = _AbsMax(weights)
    with torch.no_grad():
        steps = [
            arch.module.forward_layers(
                arch.config, weights, s, dtype=torch.float32, device=device, observer=observer
            )
            for s in sequences
        ]
        while steps:
            layer = None
            for s in list(steps):
                try:
                    layer = next(s)
                except StopIteration:
                    steps.remove(s)
            if layer is not None and layer >= 0:
                weights.drop_layers_before(layer + 1)
    return observer


def _unit_amax(
    observed: _AbsMax,
    requests: dict[Request, list[Unit]],
    settings: ActivationSettings,
    report: ActivationReport,
) -> dict[str, torch.Tensor]:
    """Module name -> the calibrated A_x, with the expert fallback of the module docstring."""
    # down stack -> largest down-input absmax among calibrated experts (else among all reached)
    down_max: dict[str, torch.Tensor] = {}
    down_any: dict[str, torch.Tensor] = {}
    for req, a in observed.amax.items():
        if req.expert is not None and "down" in req.weight:
            stack = stack_name(req.weight)
            down_any[stack] = _max(down_any.get(stack), a)
            if observed.tokens[req] >= settings.min_expert_tokens:
                down_max[stack] = _max(down_max.get(stack), a)
    out: dict[str, torch.Tensor] = {}
    for req, units in requests.items():
        a = observed.amax.get(req)
        tokens = observed.tokens.get(req, 0)
        if req.expert is not None and tokens < settings.min_expert_tokens:
            note = f"blk.{req.layer} expert {req.expert} ({tokens} tokens)"
            if note not in report.fallback_experts:
                report.fallback_experts.append(note)
            stack = stack_name(req.weight)
            fallback = (
                down_max.get(stack, down_any.get(stack))
                if "down" in req.weight
                else _moe_input(observed, stack, req)
            )
            a = fallback if fallback is not None else a
        for u in units:
            if a is None:
                report.unreached.append(u.out)
            else:
                out[u.out] = a
    return out


def _moe_input(observed: _AbsMax, stack: str, req: Request) -> torch.Tensor | None:
    # fused gate_up stacks and separate gate / up stacks are both announced under their own name
    return observed.moe_inputs.get(stack, observed.moe_inputs.get(req.weight))


def input_global_scales(
    amax: dict[str, torch.Tensor], plan: Plan, ckpt: Checkpoint, headroom: float = 1.0
) -> dict[str, torch.Tensor]:
    """Module name -> g_x (float32 [1]): fusion groups share their largest A_x, rounded to the
    model dtype; a module without A_x gets llm-compressor's fallback 1.0."""
    by_group: dict[str, torch.Tensor] = {}
    for u in plan.quantized:
        if u.out in amax:
            key = u.group or u.out
            by_group[key] = _max(by_group.get(key), amax[u.out])
    scales = {}
    for u in plan.quantized:
        a = by_group.get(u.group or u.out)
        if a is None:
            scales[u.out] = torch.ones(1, dtype=torch.float32)
            continue
        dtype = ckpt.tensors[u.source].torch_dtype
        scales[u.out] = nvfp4.global_scale((a * headroom).to(dtype), dtype).cpu()
    return scales


def calibrate(
    ckpt: Checkpoint,
    plan: Plan,
    settings: ActivationSettings,
    sequences: list[torch.Tensor],
    device: torch.device,
    report: ActivationReport,
) -> dict[str, torch.Tensor]:
    """Module name -> input_global_scale for every quantized module of the plan."""
    observed = observe_inputs(ckpt, plan, sequences, device)
    names = canonical_names(ckpt, plan.arch, ckpt.tensors)
    amax = _unit_amax(observed, linear_requests(plan, names, ckpt), settings, report)
    return input_global_scales(amax, plan, ckpt, settings.headroom)


def write_all(
    ckpt: Checkpoint,
    plan: Plan,
    settings: ActivationSettings,
    writer: ShardedWriter,
    device: torch.device,
) -> ActivationReport:
    """Calibrates on the settings' corpus and writes every module's input_global_scale."""
    started = time.perf_counter()
    report = ActivationReport()
    emb = next(u for u in plan.units if u.canonical == "token_embd.weight")
    data = calib.calibration_set(
        ckpt.path,
        ckpt.tensors[emb.source].shape[0],
        settings.samples,
        settings.seq_len,
        settings.calib_file,
    )
    overlap = " (windows overlap: the corpus is shorter)" if data.overlap else ""
    report.calibration = (
        f"{settings.samples} × {settings.seq_len} tokens from {data.source}{overlap}"
    )
    for name, g in calibrate(ckpt, plan, settings, data.sequences, device, report).items():
        writer.write(f"{name}.{INPUT_SCALE}", g)
    report.seconds = time.perf_counter() - started
    return report


CALIBRATION_OPTIONS = ("calib_file", "samples", "seq_len")  # shared with GPTQ's --calib-* flags


def settings_from_options(
    kind: str | None, headroom: float | None, given: dict
) -> tuple[ActivationSettings | None, dict]:
    """The CLI's --activations / --act-headroom plus the --calib-* options they take from the GPTQ
    settings: (activation settings or None, the options left for GPTQ)."""
    if kind is None:
        if headroom is not None:
            raise ConfigError("--act-headroom applies with --activations nvfp4 only.")
        return None, given
    ours = {k: v for k, v in given.items() if k in CALIBRATION_OPTIONS}
    rest = {k: v for k, v in given.items() if k not in CALIBRATION_OPTIONS}
    return ActivationSettings(kind, headroom=1.0 if headroom is None else headroom, **ours), rest
