"""The streamed verifier: every forward advances one layer at a time, together, so memory holds
one layer's weights per forward plus the residual streams, whatever the depth or vocabulary.

Lanes: the oracle (GGUF weights), the candidate, and one per expected-noise draw
(`nvq.verify.noise`); with teacher forcing, a forced copy of the candidate and of each draw too.
Each lane runs the model's stepwise forward (`forward_layers`) over every sequence. At each stage
(the embedding, layer 0, 1, …) the oracle goes first and records that stage's taps; the other lanes
follow and reduce their taps against the oracle's to sums as they are produced (`TapSums`); then
the stage's weights are diffed (`nvq.verify.diff.diff_weight`) and everything the stage read is
dropped. Weights are read once per stage (`StageCache`) from lazy sources (positional reads);
embedding rows only for the tokens used; the LM head and the vocabulary-sized tensors in row blocks
(`VOCAB_CHUNK_ELEMENTS`), with llama-perplexity's statistics in two passes over the vocabulary
(log-sum-exp first, then KL divergence with the −16 cut-off). Figures equal those of the whole-model
computation (`nvq.verify.diff`) up to float64 summation order.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from nvq.errors import CheckpointError
from nvq.io.gguf_cells import Cells
from nvq.io.gguf_model import GGUFSource
from nvq.models import Architecture
from nvq.models.layers import EMBEDDED, Taps
from nvq.verify.candidate import Scheme
from nvq.verify.damage import LocalDamage, local_damage_from_sums
from nvq.verify.diff import (
    KLD_LOG_P_MIN,
    TapDiff,
    Thresholds,
    WeightDiff,
    WeightNoise,
    diff_weight,
    logit_summary,
    scale_block,
    weight_layer,
    weight_order,
    weight_slack,
)
from nvq.verify.hints import Evidence, weight_hint
from nvq.verify.noise import apply_scheme, fusion_scales, original_draw
from nvq.verify.serving import DEFAULT_SERVING, SERVINGS, ServedView, Serving
from nvq.verify.taps import STREAM_TAPS

VOCAB_CHUNK_ELEMENTS = 1 << 24  # float64 logits per lane in one LM-head block (128 MiB)
# oracle float type -> source dtypes whose values it stores exactly, with cells under their half ulp
ROUNDS_BACK = {"F16": (torch.bfloat16,), "BF16": (torch.bfloat16,)}
# threads reading the next stage (positional reads and host-to-device copies run without the GIL)
PREFETCH_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
ROW_BLOCK_ELEMENTS = 1 << 22  # weight elements per row block of a vocabulary-sized tensor (16 MiB fp32)
# tensors indexed by token id: read in row blocks, never whole
VOCAB_TENSORS = re.compile(r"token_embd\.weight|output\.weight|per_layer_token_embd\.weight")


# ---------------------------------------------------------------------------------------------
# Weights of the current stage
# ---------------------------------------------------------------------------------------------


class StageCache(Mapping[str, torch.Tensor]):
    """A lazy source seen through the current stage: each tensor (and expert) is read once, on the
    device, and kept until `clear()`. Partial reads of vocabulary-sized tensors pass through."""

    def __init__(self, source: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.source = source
        self.device = device
        self._next: dict[str, Future] = {}  # the next stage's tensors, being read in the background
        self._full: dict[str, torch.Tensor] = {}
        self._experts: dict[tuple[str, int], torch.Tensor] = {}
        self._block: tuple[tuple[str, int, int], torch.Tensor] | None = None  # the last row block read

    def clear(self) -> None:
        self._full.clear()
        self._experts.clear()
        self._block = None

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._full.get(name)
        if t is None:
            pending = self._next.pop(name, None)
            t = pending.result() if pending is not None else self.source[name].to(self.device)
            self._full[name] = t
        return t

    def prefetch(self, names: list[str], pool: ThreadPoolExecutor) -> None:
        """Start reading these tensors (the next stage's) while the current stage computes."""
        for n in names:
            if n in self.source and n not in self._next:
                self._next[n] = pool.submit(lambda n=n: self.source[n].to(self.device))

    def __contains__(self, name: object) -> bool:
        return name in self.source

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        if name in self._full:
            return self._full[name][ids.to(self.device)]
        return self.source.rows(name, ids).to(self.device)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self._full:
            return self._full[name].reshape(-1, self._full[name].shape[-1])[start:stop]
        key = (name, start, stop)
        if self._block is None or self._block[0] != key:  # every lane reads the same block in turn
            self._block = (key, self.source.row_block(name, start, stop).to(self.device))
        return self._block[1]

    def expert(self, name: str, e: int) -> torch.Tensor:
        if name in self._full:
            return self._full[name][e]
        key = (name, e)
        t = self._experts.get(key)
        if t is None:
            t = self._experts[key] = self.source.expert(name, e).to(self.device)
        return t


@dataclass
class NoiseModel:
    """What the expected candidates are made of (nvq.verify.noise.expected_draw, per tensor)."""

    oracle: StageCache  # over a GGUFSource
    schemes: Mapping[str, Scheme]
    fusion: Mapping[str, str]  # canonical name -> fusion group key
    groups: Mapping[str, torch.Tensor]  # act-order g_idx by canonical name
    dtype: torch.dtype  # the candidate's source dtype
    lossy: bool  # the oracle stores some tensor lossily: dithered draws differ from the nominal one
    _stored: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    _experts: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self._stored.clear()
        self._experts.clear()

    @property
    def gguf(self) -> GGUFSource:
        return self.oracle.source

    def cells(self, name: str) -> Cells | None:
        return self.gguf.cells(name) if self.lossy else None

    def members(self, name: str) -> list[str]:
        key = self.fusion.get(name)
        if key is None:
            return [name]
        return [n for n, k in self.fusion.items() if k == key and n in self.oracle]

    def stored(self, name: str, draw: int) -> torch.Tensor:
        """Draw `draw` of the expected candidate's `name` (0: nominal), with its fusion group."""
        got = self._stored.get((name, draw))
        if got is not None:
            return got
        members = self.members(name)
        if draw > 0 and all(self._rounds_back(n) for n in members):
            for n in members:
                self._stored[(n, draw)] = self.stored(n, 0)
            return self._stored[(name, draw)]
        originals = {}
        for n in members:
            cells = self.cells(n) if draw > 0 else None
            if cells is not None:
                cells = Cells(cells.lower.to(self.oracle.device), cells.upper.to(self.oracle.device))
            originals[n] = original_draw(n, self.oracle[n], cells, draw, self.dtype)
        if draw > 0:  # a draw that rounds back to the oracle's values stores like the nominal one
            same = [n for n in members if torch.equal(originals[n], original_draw(n, self.oracle[n], None, 0, self.dtype))]
            if len(same) == len(members):
                for n in members:
                    self._stored[(n, draw)] = self.stored(n, 0)
                return self._stored[(name, draw)]
        shared = fusion_scales(originals, self.schemes, {n: "group" for n in originals}, self.dtype).get("group")
        for n, w in originals.items():
            s = self.schemes.get(n)
            self._stored[(n, draw)] = apply_scheme(w, s, self.groups.get(n), shared) if s is not None else w.float()
        return self._stored[(name, draw)]

    def _rounds_back(self, name: str, values: torch.Tensor | None = None) -> bool:
        """Whether draws of `name` cast back to the oracle's own values: a float oracle type whose
        values the (coarser) source dtype holds exactly, an F16 or BF16 GGUF of a bf16 release.
        Its cells are within half a source ulp, except F16's below 2^-14 (≤ 3e-8 absolute, under
        every scheme's resolution), so draws are the nominal one. Saves reading the cells."""
        kind = self.gguf.storage(name)
        if kind not in ROUNDS_BACK or self.dtype not in ROUNDS_BACK[kind]:
            return False
        w = self.oracle[name] if values is None else values
        return bool(torch.equal(w.to(self.dtype).float(), w))

    def stored_expert(self, name: str, draw: int, e: int) -> torch.Tensor:
        """Expert e of draw `draw` of an expert stack (its own scales; no fusion across experts)."""
        if (name, draw) in self._stored:
            return self._stored[(name, draw)][e]
        key = (name, draw, e)
        got = self._experts.get(key)
        if got is None:
            rows = self.oracle.expert(name, e)
            cells = self._cell_rows(name, e * rows.shape[0], (e + 1) * rows.shape[0]) if draw > 0 else None
            w = original_draw(name, rows, cells, draw, self.dtype, e * rows.shape[0])
            s = self.schemes.get(name)
            g = self.groups.get(name)
            g = g[e] if g is not None else None
            got = apply_scheme(w[None], s, g[None] if g is not None else None)[0] if s is not None else w.float()
            self._experts[key] = got
        return got

    def stored_rows(self, name: str, draw: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a vocabulary-sized tensor's draw (dense schemes store per row)."""
        s = self.schemes.get(name)
        if s is not None and s.quantized:  # a quantized head: its scales span the tensor
            return self.stored(name, draw).reshape(-1, self.gguf.shape(name)[-1])[start:stop]
        rows = self.oracle.row_block(name, start, stop)
        if draw > 0 and self._rounds_back(name, rows):
            draw = 0
        cells = self._cell_rows(name, start, stop) if draw > 0 else None
        w = original_draw(name, rows, cells, draw, self.dtype, start)
        return apply_scheme(w, s) if s is not None else w.float()

    def _cell_rows(self, name: str, start: int, stop: int) -> Cells | None:
        if not self.lossy:
            return None
        cells = self.gguf.cell_rows(name, start, stop)
        if cells is None:
            return None
        dev = self.oracle.device
        return Cells(cells.lower.to(dev), cells.upper.to(dev), cells.approximate)


class ExpectedLane(Mapping[str, torch.Tensor]):
    """One draw of the expected candidate as a weight source for the forward."""

    def __init__(self, noise: NoiseModel, draw: int) -> None:
        self.noise = noise
        self.draw = draw

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.noise.stored(name, self.draw)

    def __contains__(self, name: object) -> bool:
        return name in self.noise.oracle

    def __iter__(self) -> Iterator[str]:
        return iter(self.noise.oracle)

    def __len__(self) -> int:
        return len(self.noise.oracle)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long().cpu()
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.cat([self.noise.stored_rows(name, self.draw, int(i), int(i) + 1) for i in uniq.tolist()])
        return rows[inverse.to(rows.device)]

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.noise.stored_rows(name, self.draw, start, stop)

    def expert(self, name: str, e: int) -> torch.Tensor:
        return self.noise.stored_expert(name, self.draw, e)


# ---------------------------------------------------------------------------------------------
# Taps reduced as they are produced
# ---------------------------------------------------------------------------------------------


@dataclass
class TapSums:
    d2: float = 0.0  # Σ (x − r)²
    r2: float = 0.0  # Σ r²
    x2: float = 0.0
    xr: float = 0.0
    max_abs: float = 0.0
    shape_ok: bool = True

    def add(self, x: torch.Tensor, r: torch.Tensor) -> None:
        if x.shape != r.shape:
            self.shape_ok = False
            return
        x, r = x.double(), r.double()
        d = x - r
        self.d2 += float((d * d).sum())
        self.r2 += float((r * r).sum())
        self.x2 += float((x * x).sum())
        self.xr += float((x * r).sum())
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.abs().max()))

    @property
    def rel_l2(self) -> float:
        if not self.shape_ok:
            return math.inf
        d, n = math.sqrt(self.d2), math.sqrt(self.r2)
        return d / n if n > 0 else d

    @property
    def cosine(self) -> float:
        if not self.shape_ok:
            return 0.0
        nx, nr = math.sqrt(self.x2), math.sqrt(self.r2)
        if nx == 0 or nr == 0:
            return 1.0 if nx == nr else 0.0
        return max(-1.0, min(1.0, self.xr / (nx * nr)))


class RecordingTaps(Taps):
    """The oracle's taps of the current stage of one sequence, kept until every lane has run it."""

    def __init__(self, order: dict[str, None]) -> None:
        super().__init__()
        self.order = order

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            self.order.setdefault(name, None)
        self.tensors[name] = tensor.detach()
        return tensor


class ReducingTaps(Taps):
    """A lane's taps, reduced against the oracle's as they come (`sums[name]`); with `force`, the
    residual stream continues from the oracle's."""

    def __init__(self, oracle: RecordingTaps, sums: dict[str, TapSums] | None, force: bool) -> None:
        super().__init__()
        self.oracle = oracle
        self.sums = sums
        self.force = force

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        ref = self.oracle.tensors.get(name)
        if ref is None:
            return tensor
        if self.sums is not None and ref.is_floating_point():
            self.sums.setdefault(name, TapSums()).add(_rows(tensor), _rows(ref))
        if self.force and STREAM_TAPS.fullmatch(name):
            return ref.to(device=tensor.device, dtype=tensor.dtype)
        return tensor


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


# ---------------------------------------------------------------------------------------------
# Lanes and the lockstep driver
# ---------------------------------------------------------------------------------------------


@dataclass
class Lane:
    name: str  # "oracle", "candidate", "expected-1", "candidate-forced", ...
    arch: Architecture
    weights: Mapping[str, torch.Tensor]
    draw: int | None = None  # expected-noise draw, None for oracle and candidate
    forced: bool = False
    taps_kept: bool = False  # its taps are the ones reported (forced lanes when teacher-forced)
    logits_kept: bool = False  # its logits are the ones scored (free-running lanes)
    sums: dict[str, TapSums] = field(default_factory=dict)
    finals: list[torch.Tensor] = field(default_factory=list)  # result_norm per sequence
    error: str | None = None


@dataclass
class StreamResult:
    taps: list[TapDiff]
    weights: list[WeightDiff]
    logits: dict
    order: list[str]
    candidate_error: str | None
    peak_gpu_bytes: int = 0


def stream_verify(
    oracle_arch: Architecture,
    candidate_arch: Architecture,
    oracle: GGUFSource,
    candidate: Mapping[str, torch.Tensor],
    schemes: Mapping[str, Scheme],
    noise_fusion: Mapping[str, str],
    groups: Mapping[str, torch.Tensor],
    source_dtype: torch.dtype,
    draws: int,
    sequences: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    th: Thresholds,
    teacher_forced: bool = False,
    on_stage: Callable[[int, int], None] | None = None,
    serving: Serving = SERVINGS[DEFAULT_SERVING],
) -> StreamResult:
    """Run every lane over `sequences` layer by layer and return tap, weight and logit figures."""
    if device.type != "cpu":
        oracle.decode_on(device)
    o_cache, c_cache = StageCache(oracle, device), StageCache(candidate, device)
    lossy = draws > 0
    noise = NoiseModel(o_cache, schemes, noise_fusion, groups, source_dtype, lossy)
    draw_ids = list(range(1, draws + 1)) or [0]

    def served(weights):  # the candidate and its expected draws run as the engine serves them
        return ServedView(weights, schemes, serving) if serving.needs_view(schemes) else weights

    lanes = [Lane("oracle", oracle_arch, o_cache)]
    lanes.append(Lane("candidate", candidate_arch, served(c_cache), taps_kept=not teacher_forced, logits_kept=True))
    lanes += [Lane(f"expected-{k}", oracle_arch, served(ExpectedLane(noise, k)), draw=k,
                   taps_kept=not teacher_forced, logits_kept=True) for k in draw_ids]
    if teacher_forced:
        lanes.append(Lane("candidate-forced", candidate_arch, served(c_cache), forced=True, taps_kept=True))
        lanes += [Lane(f"expected-{k}-forced", oracle_arch, served(ExpectedLane(noise, k)), draw=k, forced=True,
                       taps_kept=True) for k in draw_ids]
    order: dict[str, None] = {}
    recorders = [RecordingTaps(order) for _ in sequences]
    gens = {(lane.name, s): _start(lane, ids, recorders[s], device, dtype) for lane in lanes for s, ids in enumerate(sequences)}
    n_layers = candidate_arch.config.num_layers
    weights: dict[str, WeightDiff] = {}
    oracle_names = [n for n in weight_order(oracle) if not VOCAB_TENSORS.fullmatch(n)]
    by_layer: dict[int | None, list[str]] = {}
    for n in oracle_names:
        by_layer.setdefault(weight_layer(n), []).append(n)
    pool = ThreadPoolExecutor(max_workers=PREFETCH_THREADS, thread_name_prefix="nvq-prefetch")
    for stage in [EMBEDDED, *range(n_layers)]:
        upcoming = by_layer.get(stage + 1, [])  # read layer stage+1 while this stage computes
        o_cache.prefetch(upcoming, pool)
        c_cache.prefetch(upcoming, pool)
        for rec in recorders:
            rec.tensors.clear()
        for lane in lanes:
            for s in range(len(sequences)):
                _advance(lane, gens, s, stage)
        names = by_layer.get(None, []) if stage == EMBEDDED else by_layer.get(stage, [])
        for n in names:
            weights[n] = _diff_whole(n, c_cache, o_cache, noise, schemes, th, draws)
        for cache in (o_cache, c_cache, noise):
            cache.clear()
        if on_stage:
            on_stage(stage + 1, n_layers + 1)
    pool.shutdown(wait=True)
    for rec in recorders:
        rec.tensors.clear()
    for lane in lanes:  # the final norm: the generators return it
        for s in range(len(sequences)):
            _finish(lane, gens, s, recorders[s])
    logits = _head(lanes, candidate_arch, oracle_arch, sequences, th, order)
    for n in (n for n in weight_order(oracle) if VOCAB_TENSORS.fullmatch(n)):
        weights[n] = _diff_chunked(n, c_cache, o_cache, noise, schemes, th, draws)
    for n in oracle_names:  # tensors the forward never read (e.g. a layer absent from the stages)
        if n not in weights:
            weights[n] = _diff_whole(n, c_cache, o_cache, noise, schemes, th, draws)
            for cache in (o_cache, c_cache, noise):
                cache.clear()
    taps = _tap_diffs(lanes, list(order), th)
    cand_error = next((lane.error for lane in lanes if lane.error and lane.name.startswith("candidate")), None)
    if cand_error:
        taps = []
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return StreamResult(taps, [weights[n] for n in weight_order(weights)], logits, list(order), cand_error, peak)


def _start(lane: Lane, ids: torch.Tensor, recorder: RecordingTaps, device, dtype):
    taps = recorder if lane.name == "oracle" else ReducingTaps(recorder, lane.sums if lane.taps_kept else None, lane.forced)
    return lane.arch.module.forward_layers(lane.arch.config, lane.weights, ids, taps=taps, dtype=dtype,
                                           device=device)


def _advance(lane: Lane, gens, s: int, stage: int) -> None:
    if lane.error:
        return
    try:
        got = next(gens[(lane.name, s)])
    except StopIteration:
        lane.error = f"the forward ended before stage {stage}"
        return
    except (KeyError, RuntimeError, ValueError) as e:
        if lane.name == "oracle" or lane.draw is not None:
            raise
        lane.error = " ".join(str(e).split()).strip("'\"") or type(e).__name__
        return
    if got != stage:
        lane.error = f"the forward reached stage {got} where {stage} was expected"


def _finish(lane: Lane, gens, s: int, recorder: RecordingTaps) -> None:
    if lane.error:
        return
    try:
        next(gens[(lane.name, s)])
        lane.error = "the forward did not end after its last layer"
    except StopIteration as done:
        lane.finals.append(done.value)
    except (KeyError, RuntimeError, ValueError) as e:
        if lane.name == "oracle" or lane.draw is not None:
            raise
        lane.error = " ".join(str(e).split()).strip("'\"") or type(e).__name__


def _tap_diffs(lanes: list[Lane], order: list[str], th: Thresholds) -> list[TapDiff]:
    from nvq.verify.taps import tap_layer

    cand = next(lane for lane in lanes if lane.taps_kept and lane.draw is None)
    draws = [lane for lane in lanes if lane.taps_kept and lane.draw is not None]
    out = []
    for name in order:
        got = cand.sums.get(name)
        if got is None:
            continue
        exp = [d.sums[name].rel_l2 for d in draws if name in d.sums] or [0.0]
        limit = th.tap_limit(exp)
        sd = statistics.stdev(exp) if len(exp) > 1 else 0.0
        err = got.rel_l2
        out.append(TapDiff(name, tap_layer(name), err, got.cosine, got.max_abs if got.shape_ok else math.inf,
                           statistics.fmean(exp), limit, err <= limit, sd))
    return out


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _require_finite(o_cache: StageCache, name: str, values: torch.Tensor) -> None:
    """A NaN or infinite oracle weight certifies nothing (NaN logits would compare as equal)."""
    if not bool(torch.isfinite(values).all()):
        raise CheckpointError(f"{o_cache.source.model.path}: the oracle's tensor '{name}' holds NaN or infinite "
                              "values; an oracle must be finite.")


def _diff_whole(name, c_cache, o_cache, noise: NoiseModel, schemes, th, draws: int) -> WeightDiff:
    ref = o_cache[name]
    _require_finite(o_cache, name, ref)
    got = c_cache[name] if name in c_cache else None
    nominal = noise.stored(name, 0)
    dithered = [noise.stored(name, k) for k in range(1, draws + 1)]
    layer = weight_layer(name)
    same_layer = {n: o_cache[n] for n in list(o_cache._full) if weight_layer(n) == layer}
    storage = o_cache.source.storage(name)
    return diff_weight(name, got, ref, WeightNoise(nominal, dithered), schemes.get(name), th, same_layer, storage)


def _diff_chunked(name, c_cache, o_cache, noise: NoiseModel, schemes, th, draws: int) -> WeightDiff:
    """A vocabulary-sized tensor in row blocks: the same figures as `diff_weight`, never whole."""
    shape = o_cache.source.shape(name)
    k = shape[-1]
    n_rows = math.prod(shape[:-1])
    scheme = schemes.get(name)
    label, layer = (str(scheme) if scheme else None), weight_layer(name)
    storage = o_cache.source.storage(name)
    if name not in c_cache:
        return WeightDiff(name, layer, label, None, 0.0, 0.0, False, "missing from the candidate", storage)
    c_shape = _shape(c_cache.source, name)
    if c_shape != tuple(shape):
        hint = f"shape {list(c_shape)} where the oracle has {list(shape)}"
        return WeightDiff(name, layer, label, None, 0.0, 0.0, False, hint, storage)
    step = max(1, ROW_BLOCK_ELEMENTS // max(k, 1))
    d_rows, r_rows, e_rows = [], [], []
    e2 = [0.0] * max(draws, 1)
    exact = True
    for a in range(0, n_rows, step):
        b = min(a + step, n_rows)
        ref = o_cache.row_block(name, a, b).double()
        _require_finite(o_cache, name, ref)
        got = c_cache.row_block(name, a, b).double()
        nominal = noise.stored_rows(name, 0, a, b).double()
        exact = exact and torch.equal(got, nominal)
        ds = [noise.stored_rows(name, j, a, b).double() for j in range(1, draws + 1)] or [nominal]
        d_rows.append((got - ref).pow(2).sum(-1).cpu())
        r_rows.append(ref.pow(2).sum(-1).cpu())
        sq = [(x - ref).pow(2).sum(-1) for x in ds]
        for j, q in enumerate(sq):
            e2[j] += float(q.sum())
        e_rows.append(torch.stack(sq).mean(0).cpu())
    d, r, e = torch.cat(d_rows), torch.cat(r_rows), torch.cat(e_rows)
    norm = math.sqrt(float(r.sum()))
    err = math.sqrt(float(d.sum())) / norm if norm > 0 else math.sqrt(float(d.sum()))
    exp = [math.sqrt(x) / norm if norm > 0 else math.sqrt(x) for x in e2]
    slack = weight_slack(scheme)
    limit = th.weight_limit(exp, slack)
    damage = LocalDamage() if exact else local_damage_from_sums(
        d, e, r, None, th.weight_factor * slack, th.weight_floor, max(k // scale_block(scheme, k), 1))
    ok = exact or (err <= limit and not damage.found)
    hint = where = None
    if not ok:
        where = damage.describe() or None
        if n_rows * k <= ROW_BLOCK_ELEMENTS * 4:  # small enough to look at whole
            full_ref, full_got = o_cache.source[name].float(), c_cache.source[name].float()
            hint = weight_hint(Evidence(name, full_got, full_ref, limit, {name: full_ref}, damage))
        else:
            hint = f"differs from the oracle by {err / max(limit, 1e-30):.3g}× its band (rel-L2 {err:.3g})"
    return WeightDiff(name, layer, label, err, statistics.fmean(exp), limit, ok, hint, storage, exact, where)


# ---------------------------------------------------------------------------------------------
# The LM head over vocabulary blocks
# ---------------------------------------------------------------------------------------------


def _shape(source, name: str) -> tuple[int, ...]:
    shape = getattr(source, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(source[name].shape)


def _head(lanes: list[Lane], c_arch, o_arch, sequences, th: Thresholds, order: dict[str, None]) -> dict:
    oracle = lanes[0]
    hidden = {lane.name: torch.cat(lane.finals) for lane in lanes if not lane.error}
    if "oracle" not in hidden:
        raise RuntimeError("the oracle's forward did not finish")
    vocab = _head_rows(oracle)
    t_total, width = hidden["oracle"].shape
    step = max(1, min(VOCAB_CHUNK_ELEMENTS // max(t_total, 1), ROW_BLOCK_ELEMENTS // max(width, 1)))
    nxt, has_next = _next_tokens(sequences)
    scored = [lane for lane in lanes if lane.logits_kept and lane.name in hidden]
    tapped = [lane for lane in lanes if lane.taps_kept and lane.name in hidden]
    order.setdefault("result_output", None)
    # pass 1: log-sum-exp, argmax and the next token's logit of every lane; the result_output tap
    runs = {lane.name: _Softmax(t_total, hidden["oracle"].device) for lane in [oracle, *scored]}
    for a in range(0, vocab, step):
        b = min(a + step, vocab)
        z_o = _logits(oracle, o_arch, hidden["oracle"], a, b)
        runs["oracle"].add(z_o, a, nxt)
        for lane in {id(x): x for x in scored + tapped}.values():
            z = _logits(lane, c_arch if lane.draw is None else o_arch, hidden[lane.name], a, b)
            if lane in scored:
                runs[lane.name].add(z, a, nxt)
            if lane in tapped:
                lane.sums.setdefault("result_output", TapSums()).add(z, z_o)
    # pass 2: KL(oracle ‖ lane) with llama-perplexity's cut-off at log p_oracle ≤ −16
    kld = {lane.name: torch.zeros(t_total, dtype=torch.float64, device=hidden["oracle"].device) for lane in scored}
    lse_o = runs["oracle"].lse
    for a in range(0, vocab, step):
        b = min(a + step, vocab)
        lo = _logits(oracle, o_arch, hidden["oracle"], a, b) - lse_o[:, None]
        po, keep = lo.exp(), lo > KLD_LOG_P_MIN
        for lane in scored:
            lc = _logits(lane, c_arch if lane.draw is None else o_arch, hidden[lane.name], a, b) - runs[lane.name].lse[:, None]
            kld[lane.name] += torch.where(keep, po * (lo - lc), torch.zeros_like(po)).sum(-1)
    for lane in scored:  # a NaN logit makes `keep` false and its KLD term 0; report NaN, never 0
        finite = torch.isfinite(lse_o) & torch.isfinite(runs[lane.name].lse)
        kld[lane.name] = torch.where(finite, kld[lane.name], torch.full_like(kld[lane.name], math.nan))
    stats = {lane.name: _stats(runs["oracle"], runs[lane.name], kld[lane.name], has_next) for lane in scored}
    draws = [stats[lane.name] for lane in scored if lane.draw is not None]
    expected = {k: statistics.fmean(d[k] for d in draws) if isinstance(draws[0][k], float) else draws[0][k]
                for k in draws[0]}
    expected["mean_kld_draws"] = [d["mean_kld"] for d in draws]
    if "candidate" not in stats:
        return {"ok": False, "expected": expected}
    limit = th.kld_limit(expected["mean_kld_draws"])
    cand = stats["candidate"]
    ok = math.isfinite(cand["mean_kld"]) and math.isfinite(limit) and cand["mean_kld"] <= limit
    return {**cand, "expected": expected, "limit_mean_kld": limit, "ok": ok}


def _head_rows(lane: Lane) -> int:
    w = lane.weights
    name = "output.weight" if "output.weight" in w else "token_embd.weight"
    return int(w.source.shape(name)[0])


def _logits(lane: Lane, arch, hidden: torch.Tensor, a: int, b: int) -> torch.Tensor:
    w = lane.weights
    name = "output.weight" if "output.weight" in w else "token_embd.weight"
    rows = w.row_block(name, a, b).to(device=hidden.device, dtype=hidden.dtype)
    return arch.module.head(arch.config, hidden, rows).double()


def _next_tokens(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    nxt, has = [], []
    for ids in sequences:
        ids = ids.long()
        nxt.append(torch.cat([ids[1:], ids.new_zeros(1)]))
        has.append(torch.cat([torch.ones(ids.numel() - 1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)]))
    return torch.cat(nxt), torch.cat(has)


class _Softmax:
    """Online log-sum-exp, argmax and the next token's logit, over vocabulary blocks."""

    def __init__(self, t: int, device) -> None:
        self.m = torch.full((t,), -math.inf, dtype=torch.float64, device=device)
        self.s = torch.zeros(t, dtype=torch.float64, device=device)
        self.best = torch.full((t,), -math.inf, dtype=torch.float64, device=device)
        self.arg = torch.zeros(t, dtype=torch.long, device=device)
        self.pick = torch.zeros(t, dtype=torch.float64, device=device)

    def add(self, z: torch.Tensor, start: int, nxt: torch.Tensor) -> None:
        m = torch.maximum(self.m, z.amax(-1))
        self.s = self.s * (self.m - m).exp() + (z - m[:, None]).exp().sum(-1)
        self.m = m
        value, index = z.max(-1)
        better = value > self.best
        self.best = torch.where(better, value, self.best)
        self.arg = torch.where(better, index + start, self.arg)
        nxt = nxt.to(z.device)
        inside = (nxt >= start) & (nxt < start + z.shape[1])
        local = (nxt - start).clamp(0, z.shape[1] - 1)
        self.pick = torch.where(inside, z.gather(1, local[:, None])[:, 0], self.pick)

    @property
    def lse(self) -> torch.Tensor:
        return self.m + self.s.log()


def _stats(o: _Softmax, c: _Softmax, kld: torch.Tensor, has_next: torch.Tensor) -> dict:
    keep = has_next.to(kld.device)
    k = kld[keep].cpu()
    pick_o, pick_c = (o.pick - o.lse)[keep].cpu(), (c.pick - c.lse)[keep].cpu()
    dp = pick_c.exp() - pick_o.exp()
    top1 = (o.arg == c.arg)[keep].double().cpu()
    return logit_summary(k, top1, dp, pick_o - pick_c)
