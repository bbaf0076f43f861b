"""The whole-model verification the streamed engine replaces, kept as its reference: every tensor
loaded at once, every forward run to the end with all taps kept, statistics over whole tensors.
`nvq.verify.engine` must give the same figures (tests/verify/test_engine.py)."""

from __future__ import annotations

import statistics

from nvq.io.gguf_cells import Cells
from nvq.io.gguf_model import load_canonical_with_cells
from nvq.verify.candidate import load_candidate
from nvq.verify.diff import Thresholds, diff_taps, diff_weights, logit_stats
from nvq.verify.noise import expected_draw, fusion_groups
from nvq.verify.run import _source_dtype
from nvq.verify.taps import run_forward


def in_memory_figures(candidate, oracle, sequences, draws: int = 2, teacher_forced: bool = False,
                      th: Thresholds | None = None, device: str = "cpu") -> dict:
    th = th or Thresholds()
    cand = load_candidate(candidate)
    orc = load_canonical_with_cells(oracle)
    arch = cand.arch
    # draws on the run's device, as the engine makes them (fp32 dither arithmetic differs by device)
    tensors = {n: t.to(device) for n, t in orc.tensors.items() if not arch.table.drop_reason(n, arch.config)}
    cells = {n: Cells(c.lower.to(device), c.upper.to(device), c.approximate) for n, c in orc.cells.items() if n in tensors}
    n_draws = draws if cells else 0
    fusion = fusion_groups(arch.table, tensors)
    dtype = _source_dtype(cand)
    nominal = expected_draw(tensors, cand.schemes, cells, 0, dtype, fusion, cand.group_index)
    dithered = [expected_draw(tensors, cand.schemes, cells, k, dtype, fusion, cand.group_index)
                for k in range(1, n_draws + 1)]
    expected = dithered or [nominal]
    o_run = run_forward(arch, tensors, sequences, device)
    force = o_run if teacher_forced else None
    e_runs = [run_forward(arch, e, sequences, device, force=force) for e in expected]
    c_run = run_forward(arch, cand.tensors, sequences, device, force=force)
    e_free = [run_forward(arch, e, sequences, device) for e in expected] if teacher_forced else e_runs
    c_free = run_forward(arch, cand.tensors, sequences, device) if teacher_forced else c_run
    draws_stats = [logit_stats(o_run.logits, e.logits, sequences) for e in e_free]
    expected_stats = {k: statistics.fmean(d[k] for d in draws_stats) if isinstance(draws_stats[0][k], float)
                      else draws_stats[0][k] for k in draws_stats[0]}
    stats = logit_stats(o_run.logits, c_free.logits, sequences)
    return {
        "taps": diff_taps(o_run, c_run, e_runs, th),
        "weights": diff_weights(cand.tensors, _host(tensors), cand.schemes, th, _host(nominal),
                                [_host(d) for d in dithered], orc.storage),
        "logits": stats,
        "expected_logits": expected_stats,
    }


def _host(tensors: dict) -> dict:
    return {n: t.cpu() for n, t in tensors.items()}
