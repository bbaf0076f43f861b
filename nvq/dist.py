"""The process group a run belongs to: one process alone, or one rank of a torchrun launch.

torchrun (or any launcher) sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; nvq
then joins the group over gloo, which carries the few small objects ranks exchange (the output
directory, summaries, barriers) on CPU and GPU machines alike. Bulk data never crosses ranks:
each rank reads its share of the checkpoint and writes it into the shared output files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from nvq.errors import ConfigError

_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def device(self, kind: str) -> torch.device:
        """This rank's device of `kind` ("cuda" takes the GPU numbered LOCAL_RANK)."""
        if kind == "cuda" and self.distributed:
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"rank {self.rank} has LOCAL_RANK {self.local_rank} but this host has "
                    f"{torch.cuda.device_count()} GPU(s); start at most one process per GPU."
                )
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(kind)


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer; it is set by torchrun.") from None
    if value < 0:
        raise ConfigError(f"{name}={value} is negative; it is set by torchrun.")
    return value


_joined: World | None = None


def join() -> World:
    """This process's World: a single process unless WORLD_SIZE > 1, in which case the gloo group
    is joined once (later calls return the same World)."""
    global _joined
    if _joined is not None:
        return _joined
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        _joined = World()
        return _joined
    missing = [n for n in (*_ENV, "MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch nvq with torchrun.")
    world = World(rank=_env_int("RANK"), size=_env_int("WORLD_SIZE"), local_rank=_env_int("LOCAL_RANK"))
    if world.rank >= world.size:
        raise ConfigError(f"RANK {world.rank} is not below WORLD_SIZE {world.size}.")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=world.rank, world_size=world.size)
    _joined = world
    return world


def split_by_size(sizes: list[int], ranks: int) -> list[int]:
    """The rank each item goes to: largest first onto the least loaded rank, ties to the lower
    rank, so every rank computes the same assignment without exchanging it."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner
