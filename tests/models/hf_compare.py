"""Run transformers on a tiny checkpoint and capture what the reference forward taps.

`run_hf` returns the logits, `output_hidden_states` and, through forward hooks, module inputs or
outputs under the reference's tap names, all as `[T, features]` fp32 tensors (batch of one).
Errors are reported as max|ours − HF| / max|HF| over the whole tensor ("max rel error").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

# A hook: tap name -> (module path relative to the decoder, "in" or "out", layout of the tensor).
# Layouts: "bt" = [1, T, F...] (features flattened), "bhtd" = [1, H, T, D], "t" = [T, F].
HookSpec = dict[str, tuple[str, str, str]]


@dataclass
class HFRun:
    logits: torch.Tensor
    hidden_states: list[torch.Tensor]
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    model: torch.nn.Module | None = None


def _flatten(x: torch.Tensor, layout: str) -> torch.Tensor:
    x = x.detach().float()
    if layout == "t":
        return x.reshape(x.shape[0], -1)
    if layout == "bhtd":
        return x[0].transpose(0, 1).reshape(x.shape[2], -1)
    if layout == "bt":
        return x[0].reshape(x.shape[1], -1)
    raise ValueError(layout)


def decoder_prefix(model: torch.nn.Module) -> str:
    """Dotted path of the text decoder (the module owning `layers` and `embed_tokens`)."""
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "layers", None), torch.nn.ModuleList) and hasattr(
            mod, "embed_tokens"
        ):
            return name
    raise AssertionError("no decoder module found")


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    cls = getattr(transformers, arch)
    return cls.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()


def run_hf(path: Path, ids: torch.Tensor, hooks: HookSpec | None = None) -> HFRun:
    model = load_hf_model(path)
    prefix = decoder_prefix(model)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for tap, (rel, where, layout) in (hooks or {}).items():
        mod = modules[f"{prefix}.{rel}"]

        def hook(_m, args, out, tap=tap, where=where, layout=layout):
            captured[tap] = _flatten(args[0] if where == "in" else out, layout)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(ids[None], output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hidden = [h[0].float() for h in out.hidden_states]
    return HFRun(out.logits[0].float(), hidden, captured, model)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    ref64 = ref.double()
    return ((ours.double() - ref64).abs().max() / ref64.abs().max()).item()


def hidden_state_errors(taps, run: HFRun, num_layers: int) -> dict[str, float]:
    """Per hidden state (gemma4.md §2.7): [0] embedding, [i+1] l_out-i (i < L−1), [L] result_norm."""
    errs = {}
    first = "inp_scaled" if "inp_scaled" in taps else "embd"
    errs[first] = rel_err(taps[first], run.hidden_states[0])
    for i in range(num_layers - 1):
        errs[f"l_out-{i}"] = rel_err(taps[f"l_out-{i}"], run.hidden_states[i + 1])
    errs["result_norm"] = rel_err(taps["result_norm"], run.hidden_states[num_layers])
    errs["result_output"] = rel_err(taps["result_output"], run.logits)
    assert len(run.hidden_states) == num_layers + 1
    return errs


def captured_errors(taps, run: HFRun) -> dict[str, float]:
    missing = sorted(set(run.captured) - set(taps.names()))
    assert not missing, f"taps not recorded by the reference: {missing}"
    return {name: rel_err(taps[name], ref) for name, ref in run.captured.items()}


def by_family(errs: dict[str, float]) -> dict[str, float]:
    """Max error per tap family (`Qcur-3` → `Qcur`)."""
    out: dict[str, float] = {}
    for name, e in errs.items():
        fam = name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name
        out[fam] = max(out.get(fam, 0.0), e)
    return out
