"""Running the reference forward for the verifier: every tap recorded, sequences concatenated,
and optionally teacher-forced.

Teacher forcing needs no per-layer entry point in the model modules: every forward passes its
residual stream through a tap (`embd` / `inp_scaled` at the input, `l_out-N` after each layer) and
continues with what the tap returns. `ForcingTaps` records the forward's own value there and hands
back the oracle's instead, so layer N of the candidate runs on the oracle's input of layer N and
its taps measure that layer's own error, not the error accumulated before it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nvq.models import Architecture
from nvq.models.layers import Taps

# Taps whose returned value the forwards carry on with: the residual stream.
STREAM_TAPS = re.compile(r"embd|inp_scaled|l_out-\d+")
_LAYER = re.compile(r".*-(?P<layer>\d+)")


def tap_layer(name: str) -> int | None:
    m = _LAYER.fullmatch(name)
    return int(m["layer"]) if m else None


class ForcingTaps(Taps):
    """Records every tap; at the residual-stream taps named in `force`, returns the given tensor
    (the oracle's) so the forward continues from it."""

    def __init__(self, force: Mapping[str, torch.Tensor], device: str | torch.device | None = "cpu"):
        super().__init__(device=device)
        self._force = force

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        super().__call__(name, tensor)
        forced = self._force.get(name)
        if forced is None:
            return tensor
        return forced.to(device=tensor.device, dtype=tensor.dtype)


@dataclass
class ForwardRun:
    logits: torch.Tensor  # [T_total, V] float32 on CPU, sequences concatenated
    taps: dict[str, torch.Tensor]  # name → [T_total, features], in graph order
    bounds: list[tuple[int, int]]  # row range of each sequence


def run_forward(
    arch: Architecture,
    tensors: Mapping[str, torch.Tensor],
    sequences: list[torch.Tensor],
    device: str | torch.device = "cpu",
    force: ForwardRun | None = None,
    dtype: torch.dtype = torch.float32,
) -> ForwardRun:
    """The reference forward (fp32, or `dtype`; exact embedding scale) over each sequence; taps of all
    sequences concatenated along tokens. With `force`, teacher-forced on that run's stream."""
    per_seq: list[dict[str, torch.Tensor]] = []
    logits, bounds, start = [], [], 0
    for s, ids in enumerate(sequences):
        if force is None:
            taps = Taps(device="cpu")
        else:
            a, b = force.bounds[s]
            taps = ForcingTaps({n: t[a:b] for n, t in force.taps.items() if STREAM_TAPS.fullmatch(n)})
        with torch.no_grad():
            out = arch.module.forward(arch.config, tensors, ids, taps=taps, dtype=dtype, device=device)
        logits.append(out.float().cpu())
        per_seq.append(dict(taps.items()))
        bounds.append((start, start + ids.numel()))
        start += ids.numel()
    names = list(per_seq[0])
    taps_cat = {n: torch.cat([_rows(p[n]) for p in per_seq]) for n in names if all(n in p for p in per_seq)}
    return ForwardRun(torch.cat(logits), taps_cat, bounds)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
