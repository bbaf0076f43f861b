"""Moves a parked calibration sequence's activations off the device and back, bit for bit.

A parked sequence (nvq.quant.capture) holds tensors it will read again when it resumes. `Offload`
keeps the first `budget` bytes of parked activations on the device and, past that, copies each
storage of a parking sequence to host memory (pinned on CUDA) and shrinks the device storage to
zero bytes; on resume the storage is reallocated and copied back. Shrinking the *storage* rather
than replacing tensors means every view of it (q.view(...), a slice) sees the restored bytes and
nothing in the forward's frames has to be rebound.

Both copies are queued on the current stream without waiting: the device→host copy runs after the
kernels that produced the data, the host→device copy before the kernels that read it, and the
caching allocator only reuses a freed block after the work already queued on that stream. So
the only cost is the copies themselves, and a budget that holds most sequences makes them rare.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

DEFAULT_BUDGET = 8 * 2**30  # parked activations kept on a CUDA device before offloading begins


@dataclass
class Parked:
    """What one parking did: bytes left on the device, or the storages moved to the host."""

    resident: int = 0
    moved: list[tuple[torch.UntypedStorage, torch.Tensor]] = field(default_factory=list)


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class Offload:
    """budget: bytes of parked activations that may stay on the device (0: offload every parking)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.resident = 0  # bytes of parked activations on the device now
        self.moved_bytes = 0  # total copied to the host, for reports and tests

    @staticmethod
    def _storages(tensors: Iterable[torch.Tensor]) -> list[torch.UntypedStorage]:
        seen, out = set(), []
        for t in tensors:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if s.nbytes() == 0 or ptr in seen:  # already offloaded (a second view of it), or empty
                continue
            seen.add(ptr)
            out.append(s)
        return out

    def park(self, tensors: Iterable[torch.Tensor]) -> Parked:
        storages = self._storages(tensors)
        size = sum(s.nbytes() for s in storages)
        if self.resident + size <= self.budget:
            self.resident += size
            return Parked(resident=size)
        parked = Parked()
        for s in storages:
            pin = s.device.type == "cuda"
            host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin)
            host.copy_(_bytes_view(s), non_blocking=pin)
            s.resize_(0)  # frees the device block; queued work on this stream still reads it first
            parked.moved.append((s, host))
            self.moved_bytes += host.numel()
        return parked

    def resume(self, parked: Parked) -> None:
        self.resident -= parked.resident
        for s, host in parked.moved:
            s.resize_(host.numel())
            _bytes_view(s).copy_(host, non_blocking=s.device.type == "cuda")
        parked.moved.clear()
