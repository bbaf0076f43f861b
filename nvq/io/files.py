"""Positional reads into fresh buffers: never mapped from the file, so memory stays bounded by
what is read, and a file truncated after its header was parsed gives one clear sentence."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nvq.errors import CheckpointError


def pread_exact(path: Path, offset: int, nbytes: int, what: str) -> np.ndarray:
    """`nbytes` bytes of `path` from `offset` into a new uint8 array; `what` names the tensor."""
    out = np.empty(nbytes, dtype=np.uint8)
    if nbytes:
        pread_into(path, offset, out, what)
    return out


def pread_into(path: Path, offset: int, out: np.ndarray, what: str) -> None:
    """Fill the uint8 array `out` with the bytes of `path` from `offset`; `what` names the tensor."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be opened: {e.strerror or e}.") from e
    try:
        buf, done, nbytes = memoryview(out).cast("B"), 0, out.nbytes
        while done < nbytes:
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{path} ended while reading {what} (at byte {offset + done}); "
                    "the file was truncated after its header was read."
                )
            done += n
    finally:
        os.close(fd)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be opened: {e.strerror or e}.") from e
    try:
        buf, done = memoryview(out), 0
        while done < nbytes:
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{path} ended while reading {what} (at byte {offset + done}); "
                    "the file was truncated after its header was read."
                )
            done += n
    finally:
        os.close(fd)
    return out
