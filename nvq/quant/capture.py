"""Sequential activation capture: every calibration sequence runs the ordinary reference forward,
and each quantizable Linear is quantized after ALL sequences have fed it their inputs and before
ANY sequence uses it. Every Linear therefore sees inputs produced by the already-quantized Linears
before it (GPTQ's true-sequential order), with one forward per sequence and no per-layer entry
points in the model code.

How: each sequence runs in its own thread, but only one thread computes at a time (a baton passed
by the scheduler), so memory holds one sequence's transient tensors. The capture is the forward's
observer (`nvq.models.layers.Observer`, handed to it as `observer=`): it accumulates xᵀx for the
weight about to be used and parks the thread. When every thread is parked or finished, the scheduler hands the earliest
pending request to `solve` (which quantizes the weight in place) and wakes the threads waiting on
it. MoE experts are requested per expert with only the tokens routed to them; threads then park
at different experts, and experts are solved in ascending order, which is the order every thread
visits them in.

Linears that read the same input as the one before them (q/k/v, gate/up) share its Hessian, which
is complete once that one is solved: the first sequence to reach such a Linear solves it at once
and no sequence parks there, so a layer has one parking per distinct input (four in Llama).

Parked memory: a parked sequence holds its activations. The forwards release what they no longer
need (helpers' frames, `del`) and mark with `Ops.keep` (nvq.models.layers) what they hold across Linears
(the residual stream, donor K/V, PLE inputs), so at a parking the sequence's state is its live
kept tensors plus the Linear's input. `nvq.quant.offload.Offload` leaves the first `budget` bytes
of that state on the device and moves the rest to host memory, by storage, until the sequence
resumes: the same bytes come back, so offloading never changes a result. Anything a forward holds
without marking it simply stays on the device.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from nvq.models import layers as L
from nvq.quant.offload import Offload

_LAYER = re.compile(r"blk\.(\d+)\.")
# A per-expert Linear (Qwen3-MoE checkpoints): canonical `blk.N.ffn_gate_exps.weight[E]`.
_EXPERT_LINEAR = re.compile(r"\[(\d+)\]$")


def expert_of(weight: str) -> int | None:
    m = _EXPERT_LINEAR.search(weight)
    return None if m is None else int(m[1])


def stack_name(weight: str) -> str:
    """The expert stack a per-expert Linear belongs to (its MoE-input Hessian is kept there)."""
    return _EXPERT_LINEAR.sub("", weight)


@dataclass(frozen=True)
class Request:
    """One weight to quantize: a 2-D Linear, or expert `expert` of a fused expert stack."""

    weight: str  # canonical name of the tensor the forward reads
    expert: int | None = None

    @property
    def layer(self) -> int:
        m = _LAYER.match(self.weight)
        return int(m.group(1)) if m else -1


class Hessian:
    """Running Σ xᵀx over calibration rows; `value()` is GPTQ's H = 2/n·Σ xᵀx."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self.sum = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
        self.sum.addmm_(x2.t(), x2)
        self.rows += x2.shape[0]

    def value(self) -> torch.Tensor | None:
        return None if self.sum is None or self.rows == 0 else self.sum * (2.0 / self.rows)


class CaptureOrderError(RuntimeError):
    """A sequence reached a weight after it was quantized: the forward's order is not sequential."""


class _Aborted(BaseException):
    """Unwinds a parked sequence thread when the capture stops early."""


class _Finished(BaseException):
    """Stops a forward at the final norm: calibration needs no logits."""


class _StopAtHead:
    def wants(self, name: str) -> bool:
        return name == "result_norm"

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == "result_norm":
            raise _Finished
        return tensor


@dataclass(eq=False)
class _Worker:
    index: int
    go: threading.Event = field(default_factory=threading.Event)
    pending: Request | None = None
    done: bool = False
    error: BaseException | None = None
    last_x: weakref.ref | None = None  # not a reference: a parked thread must not pin its last input
    last_request: Request | None = None
    kept: list[weakref.ref] = field(default_factory=list)  # tensors the forward passed to Ops.keep


# forward(sequence index, taps, observer): the reference forward of that sequence
Forward = Callable[[int, object, L.Observer], None]
# solve(request, its Hessian or None, Hessian of every token entering that MoE block or None)
Solve = Callable[[Request, Hessian | None, Hessian | None], None]


class SequentialCapture:
    """Runs `forward(sequence, taps, observer)` for every sequence under the scheduler described
    above; it is itself the observer (`linear`, `keep`) the forward is to be given.

    name_of: the canonical name of a weight tensor the forward reads, or None (not quantized).
    wanted: the requests to solve when reached; others (routers, heads) pass through.
    offload: where parked activations go past its budget; None keeps them all on the device.
    """

    def __init__(self, name_of: Callable[[torch.Tensor], str | None], wanted: Iterable[Request], solve: Solve,
                 offload: Offload | None = None):
        self.name_of = name_of
        self.wanted = set(wanted)
        self.solve = solve
        self.offload = offload
        self.solved: set[Request] = set()
        self.hessians: dict[Request, Hessian] = {}
        self.moe_inputs: dict[str, Hessian] = {}
        self._first_seen: dict[Request, int] = {}
        self._local = threading.local()
        self._main = threading.Event()
        self._aborted = False

    # -- inside sequence threads ------------------------------------------------------------

    def linear(self, x: torch.Tensor, weight: torch.Tensor | L.ExpertModules, expert: int | None) -> None:
        worker: _Worker | None = getattr(self._local, "worker", None)
        name = weight.name if isinstance(weight, L.ExpertModules) else self.name_of(weight)
        if worker is None or name is None:
            return
        if expert == L.ALL_EXPERTS:
            self.moe_inputs.setdefault(name, Hessian()).add(x)
            return
        req = Request(name, expert)
        if req not in self.wanted:
            return
        complete = self._accumulate(worker, req, x)
        if complete:  # shares the Hessian of a solved Linear: solve now (first sequence) or pass
            if req not in self.solved:
                self._solve(req)
            return
        if req in self.solved:
            raise CaptureOrderError(f"sequence {worker.index} reached {req} after it was quantized")
        self._first_seen.setdefault(req, len(self._first_seen))
        worker.pending = req
        self._park(worker, x)
        worker.pending = None

    def _accumulate(self, worker: _Worker, req: Request, x: torch.Tensor) -> bool:
        """Adds x to req's Hessian; True when req shares the Hessian of an already solved request."""
        # q/k/v (and gate/up) read the same input tensor: they share one Hessian, summed once.
        acc = self.hessians.get(req)
        last = worker.last_x() if worker.last_x is not None else None
        shared = self.hessians.get(worker.last_request) if last is x else None
        if shared is not None:
            if acc is None:
                self.hessians[req] = shared
                acc = shared
            if acc is shared:
                complete = worker.last_request in self.solved
                worker.last_request = req
                return complete
        if acc is None:
            acc = self.hessians[req] = Hessian()
        acc.add(x)
        worker.last_x, worker.last_request = weakref.ref(x), req
        return False

    def keep(self, t: torch.Tensor) -> None:
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is not None and self.offload is not None:
            worker.kept.append(weakref.ref(t))

    def _live(self, worker: _Worker, x: torch.Tensor) -> list[torch.Tensor]:
        """The parking thread's state: its live kept tensors and the Linear's input."""
        worker.kept = [r for r in worker.kept if r() is not None]
        return [t for t in (r() for r in worker.kept) if t is not None] + [x]

    def _park(self, worker: _Worker, x: torch.Tensor) -> None:
        parked = self.offload.park(self._live(worker, x)) if self.offload is not None else None
        self._main.set()
        worker.go.wait()
        worker.go.clear()
        if self._aborted:
            raise _Aborted
        if parked is not None:
            self.offload.resume(parked)

    def _thread(self, worker: _Worker, forward: Forward) -> None:
        self._local.worker = worker
        worker.go.wait()
        worker.go.clear()
        try:
            if not self._aborted:
                forward(worker.index, _StopAtHead(), self)
        except (_Finished, _Aborted):
            pass
        except BaseException as e:  # handed to the scheduler, which re-raises it
            worker.error = e
        finally:
            worker.done = True
            worker.last_x = None
            worker.kept.clear()
            self._main.set()

    # -- scheduler ---------------------------------------------------------------------------

    def _resume(self, worker: _Worker) -> None:
        self._main.clear()
        worker.go.set()
        self._main.wait()
        if worker.error is not None:
            raise worker.error

    def _order(self, req: Request) -> tuple:
        expert = req.expert is not None
        part = 1 if "down" in req.weight else 0
        return (req.layer, 0 if expert else 1, req.expert or 0, part, self._first_seen[req])

    def _solve(self, req: Request) -> None:
        self._forget_before(req.layer)
        self.solve(req, self.hessians.get(req), self.moe_inputs.get(stack_name(req.weight)))
        self.solved.add(req)

    def _forget_before(self, layer: int) -> None:
        # Every sequence has left the layers before `layer`: their Hessians are no longer needed.
        for r in [r for r in self.hessians if r.layer < layer]:
            del self.hessians[r]
        for n in [n for n in self.moe_inputs if Request(n).layer < layer]:
            del self.moe_inputs[n]

    def run(self, n_sequences: int, forward: Forward) -> None:
        """forward(i, taps, observer) runs the reference forward of sequence i with those taps and
        that observer."""
        workers = [_Worker(i) for i in range(n_sequences)]
        threads = [threading.Thread(target=self._thread, args=(w, forward), daemon=True) for w in workers]
        try:
            for t in threads:
                t.start()
            runnable = list(workers)
            while True:
                for w in runnable:
                    self._resume(w)
                parked = [w for w in workers if not w.done]
                if not parked:
                    return
                req = min({w.pending for w in parked}, key=self._order)
                self._solve(req)
                runnable = [w for w in parked if w.pending == req]
        finally:
            self._aborted = True
            for w in workers:
                w.go.set()
            for t in threads:
                t.join()
