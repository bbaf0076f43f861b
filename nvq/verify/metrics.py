"""Distances between a tensor and its reference, in float64."""

from __future__ import annotations

import torch


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    d, n = (x - ref).norm().item(), ref.norm().item()
    return d / n if n > 0 else d


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().flatten(), ref.double().flatten()
    nx, nr = x.norm().item(), ref.norm().item()
    if nx == 0 or nr == 0:
        return 1.0 if nx == nr else 0.0
    return max(-1.0, min(1.0, (x @ ref).item() / (nx * nr)))


def max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0
