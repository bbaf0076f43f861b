"""Distances between a tensor and its reference, in float64, a block of elements at a time: the
float64 copies of a whole MoE expert stack (half a billion weights) would take 12 GB of a GPU."""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_ELEMENTS = 1 << 24  # float64 temporaries of 128 MiB each


def _blocks(t: torch.Tensor, k: int) -> Iterator[torch.Tensor]:
    rows = t.reshape(-1, k)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for a in range(0, rows.shape[0], step):
        yield rows[a : a + step].double()


def _sum_rows(parts: Iterator[torch.Tensor], device: torch.device) -> torch.Tensor:
    out = [p.pow(2).sum(-1) for p in parts]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=device)


def row_sq_error(x: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """Σ (x − ref)² over each row of the [-1, k] view, float64."""
    return _sum_rows((a - b for a, b in zip(_blocks(x, k), _blocks(ref, k), strict=True)), ref.device)


def row_sq_norm(ref: torch.Tensor, k: int) -> torch.Tensor:
    """Σ ref² over each row of the [-1, k] view, float64."""
    return _sum_rows(_blocks(ref, k), ref.device)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ (‖x − ref‖ when ref is 0)."""
    xf, rf = x.reshape(-1), ref.reshape(-1)
    d2 = torch.zeros((), dtype=torch.float64, device=ref.device)
    n2 = torch.zeros((), dtype=torch.float64, device=ref.device)
    for a in range(0, rf.numel(), CHUNK_ELEMENTS):
        xa, ra = xf[a : a + CHUNK_ELEMENTS].double(), rf[a : a + CHUNK_ELEMENTS].double()
        d2 += (xa - ra).pow(2).sum()
        n2 += ra.pow(2).sum()
    d, n = float(d2.sqrt()), float(n2.sqrt())
    return d / n if n > 0 else d


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().flatten(), ref.double().flatten()
    nx, nr = x.norm().item(), ref.norm().item()
    if nx == 0 or nr == 0:
        return 1.0 if nx == nr else 0.0
    return max(-1.0, min(1.0, (x @ ref).item() / (nx * nr)))


def max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0
