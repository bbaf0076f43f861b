"""The two ends of convert's pipeline, each on threads of its own so reading, quantizing and
writing overlap: `ChunkReader` reads planned row chunks ahead of the consumer, `AsyncWriter`
copies results back from the device and writes them behind it. Both bound what is in flight, so
memory stays a fixed number of chunks whatever the model's size.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from nvq.io.files import pread_into
from nvq.io.safetensors import DTYPES, ShardedWriter, TensorInfo

# Concurrent preads: one stream rarely fills an NVMe drive or a network mount. NVQ_READ_THREADS
# tunes it for unusual storage (bench/convert_speed.py --read-threads measures it).
READ_THREADS = int(os.environ.get("NVQ_READ_THREADS", "4"))
READ_AHEAD = 8  # chunks read but not yet taken (8 × 32 MiB of bf16 at the default chunk size)
WRITE_BEHIND = 8  # jobs handed to the writer but not yet written


@dataclass(frozen=True)
class Read:
    """Rows a..b of a tensor's 2-D view; `first` is False on a second pass over the same rows."""

    info: TensorInfo
    start: int
    stop: int
    first: bool = True
    check: Callable[[torch.Tensor, int], None] | None = None  # (chunk, start), on the reader thread


def read_chunk(info: TensorInfo, start: int, stop: int, pin: bool) -> torch.Tensor:
    """Rows start..stop of `info`'s 2-D view (elements for vectors) in a fresh buffer, page-locked
    when `pin` so a device copy from it runs asynchronously."""
    row_len = info.shape[-1] if len(info.shape) >= 2 else 1
    itemsize = DTYPES[info.dtype].itemsize
    raw = torch.empty((stop - start) * row_len * itemsize, dtype=torch.uint8, pin_memory=pin)
    if raw.numel():
        pread_into(info.path, info.offset + start * row_len * itemsize, raw.numpy(), f"tensor '{info.name}'")
    data = raw.view(info.torch_dtype)
    return data.reshape(stop - start, row_len) if len(info.shape) >= 2 else data


class ChunkReader:
    """Iterates `reads` in order, each as (read, chunk), with up to READ_AHEAD chunks being read
    ahead on READ_THREADS threads. An error of a read (or of its check) is raised when its chunk is
    taken, so it surfaces in order, as if read on the caller's thread."""

    def __init__(self, reads: Iterable[Read], pin: bool = False, threads: int = READ_THREADS,
                 ahead: int = READ_AHEAD):
        self._reads = iter(reads)
        self._pin = pin
        self._ahead = max(1, ahead)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="nvq-read")
        self._pending: deque[tuple[Read, Future]] = deque()

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            r = next(self._reads, None)
            if r is None:
                return
            self._pending.append((r, self._pool.submit(self._load, r)))

    def _load(self, r: Read) -> torch.Tensor:
        chunk = read_chunk(r.info, r.start, r.stop, self._pin)
        if r.check is not None:
            r.check(chunk, r.start)
        return chunk

    def __iter__(self) -> Iterator[tuple[Read, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[Read, torch.Tensor]:
        self._fill()
        if not self._pending:
            raise StopIteration
        r, fut = self._pending.popleft()
        chunk = fut.result()
        self._fill()
        return r, chunk

    def close(self) -> None:
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Job:
    writes: list[tuple[str, torch.Tensor]]
    ready: torch.cuda.Event | None  # the device→host copies of `writes` are done once it fires
    finite: torch.Tensor | None  # 0-d bool on the host: False means the input held NaN/Inf
    on_nonfinite: Callable[[], None] | None  # raises the error that names where


class AsyncWriter:
    """Writes results into a ShardedWriter on a thread of its own. Device tensors are copied to
    page-locked host buffers asynchronously; the thread waits for each copy before writing it.
    At most WRITE_BEHIND jobs wait, so a slow disk holds the pipeline back instead of memory
    growing. A failure on the thread is raised by the next `submit` or by `close`."""

    def __init__(self, writer: ShardedWriter, behind: int = WRITE_BEHIND):
        self._writer = writer
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max(1, behind))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nvq-write", daemon=True)
        self._thread.start()

    def submit(self, writes: list[tuple[str, torch.Tensor]], finite: torch.Tensor | None = None,
               on_nonfinite: Callable[[], None] | None = None) -> None:
        """Queue `writes` (name, tensor); `finite` (a 0-d bool, any device) gates them: when it
        turns out False, `on_nonfinite` is called on the writer thread to raise the error."""
        self._raise_pending()
        on_device = [t for _, t in writes if t.device.type == "cuda"]
        if finite is not None and finite.device.type == "cuda":
            on_device.append(finite)
        ready = None
        if on_device:
            writes = [(name, _to_pinned_host(t)) for name, t in writes]
            finite = _to_pinned_host(finite) if finite is not None else None
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(on_device[0].device))
        self._put(_Job(writes, ready, finite, on_nonfinite))

    def _put(self, job: _Job | None) -> None:
        while True:
            try:
                self._jobs.put(job, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_pending()
                    raise RuntimeError("internal error: the writer thread stopped") from None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is not None:
                continue  # drain: the error is reported once, by the producer
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                if job.finite is not None and not bool(job.finite):
                    job.on_nonfinite()
                for name, t in job.writes:
                    self._writer.write(name, t)
            except BaseException as e:  # noqa: BLE001 - handed to the producer's thread
                self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for every queued write; raise the first failure."""
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()
        self._raise_pending()

    def abandon(self) -> None:
        """Stop without raising (the caller is already failing)."""
        if self._error is None:
            self._error = RuntimeError("abandoned")
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _to_pinned_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
