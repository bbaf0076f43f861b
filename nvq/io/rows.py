"""Reading a set of rows of a tensor on disk: the embedding lookup of a lazy source."""

from __future__ import annotations

from collections.abc import Callable

import torch


def read_row_set(read_rows: Callable[[int, int], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (1-D, any order, repeats allowed) through `read_rows(start, stop)`, which reads
    rows [start, stop). Each run of consecutive distinct ids is one read, so only the rows asked
    for leave the disk."""
    wanted, where = torch.unique(ids.long().cpu(), sorted=True, return_inverse=True)
    if wanted.numel() == 0:
        return read_rows(0, 0)[where]
    ends = torch.nonzero(wanted[1:] - wanted[:-1] != 1).flatten().tolist()
    starts = [0, *(e + 1 for e in ends)]
    stops = [*(e + 1 for e in ends), wanted.numel()]
    blocks = [read_rows(int(wanted[a]), int(wanted[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]
    block = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return block[where]
