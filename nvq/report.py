"""Rendering for the CLI: progress bars, plan tables, summaries. The only module (with cli.py)
that imports rich; the library reports through plain callbacks and dataclasses."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from nvq.quant.pipeline import ConvertSummary
from nvq.quant.policy import Plan

err = Console(stderr=True)
out = Console()


@contextlib.contextmanager
def byte_progress(total_bytes: int, label: str, enabled: bool = True) -> Iterator:
    """A progress bar over source bytes read; yields the callback the pipeline calls."""
    if not enabled:
        yield lambda n, name: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total_bytes, tensor="")
        yield lambda n, name: bar.update(task, advance=n, tensor=name)


@contextlib.contextmanager
def layer_progress(enabled: bool = True) -> Iterator:
    """A progress bar over decoder layers showing each finished layer's GPTQ error; yields the
    callback the GPTQ driver calls with (LayerStats, number of layers)."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("[bold]GPTQ layers"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeRemainingColumn(), TextColumn("{task.fields[error]}", style="dim"))
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("gptq", total=None, error="")

        def done(stats, n_layers: int) -> None:
            bar.update(task, total=n_layers, completed=stats.layer + 1,
                       error=f"layer {stats.layer}: error {stats.mean:.2e}")
        yield done


@contextlib.contextmanager
def stage_progress(enabled: bool = True) -> Iterator:
    """A progress bar over the verifier's stages (the embedding, then each layer); yields the
    callback the engine calls with (stages done, stages in all)."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("[bold]verify layers"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("verify", total=None)
        yield lambda done, total: bar.update(task, total=total, completed=done)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def convert_summary_line(s: ConvertSummary) -> str:
    if not s.quantized and not s.params_quantized:  # dense output (GGUF -> HF)
        return (
            f"{s.scheme}: {s.kept} tensors written dense, {s.dropped} dropped on purpose · "
            f"{s.params:,} parameters · {human_bytes(s.bytes_written)} · {s.seconds:.1f} s → {s.out}"
        )
    return (
        f"{s.scheme}: {s.quantized} weights quantized, {s.kept} tensors kept dense, {s.dropped} dropped on purpose · "
        f"{s.bits_per_quantized_weight:.2f} bits/weight quantized, {s.bits_per_weight:.2f} overall · {human_bytes(s.bytes_written)} · {s.seconds:.1f} s on {s.engine} → {s.out}"
    )


def convert_summary_dict(s: ConvertSummary) -> dict:
    return {
        "out": str(s.out),
        "scheme": s.scheme,
        "quantized": s.quantized,
        "kept": s.kept,
        "dropped": s.dropped,
        "params": s.params,
        "params_quantized": s.params_quantized,
        "bytes_written": s.bytes_written,
        "bits_per_weight": round(s.bits_per_weight, 4),
        "bits_per_quantized_weight": round(s.bits_per_quantized_weight, 4),
        "seconds": round(s.seconds, 3),
        "device": s.device,
        "backend": "+".join(s.backends),
        "fp32_groups": s.fp32_groups,
        "warnings": s.warnings,
        "serving_notes": s.serving_notes,
        **({"gptq": gptq_summary_dict(s.gptq)} if s.gptq else {}),
        **({"activations": activations_summary_dict(s.activations)} if s.activations else {}),
    }


def activations_summary_dict(a) -> dict:
    return {"calibration": a.calibration, "seconds": round(a.seconds, 3),
            "fallback_experts": a.fallback_experts, "uncalibrated_modules": a.unreached}


def gptq_summary_dict(g) -> dict:
    r = g.report
    worst = r.worst_layer
    return {
        "method": g.method,
        "group_size": g.group_size,
        "calibration": g.calibration,
        "seconds": round(g.seconds, 3),
        "mean_error": r.mean_error,
        "worst_layer": None if worst is None else {"layer": worst.layer, "error": worst.mean},
        "layer_errors": {str(i): s.mean for i, s in sorted(r.layers.items())},
        "fallback_experts": r.fallback_experts,
        "raised_damp": r.raised_damp,
        "uncalibrated_weights": r.rtn_weights,
    }


def gptq_summary_line(g) -> str:
    if g.method == "rtn":
        return f"round-to-nearest int4, group size {g.group_size}"
    r = g.report
    worst = r.worst_layer
    worst_text = f", worst layer {worst.layer} {worst.mean:.2e}" if worst else ""
    return (f"GPTQ group size {g.group_size} on {g.calibration}: relative output error mean {r.mean_error:.2e}"
            f"{worst_text} · {g.seconds:.1f} s")


def print_convert_summary(s: ConvertSummary) -> None:
    for w in s.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    for note in s.serving_notes:
        err.print(f"[yellow]note:[/] {note}")
    if s.fp32_groups:
        err.print(
            f"[yellow]note:[/] {len(s.fp32_groups)} fp16 fusion group(s) had amax < 0.041 and were quantized with "
            "fp32 arithmetic (compressed-tensors' fp16 arithmetic would zero them)."
        )
    if s.gptq:
        r = s.gptq.report
        if r.fallback_experts:
            err.print(f"[yellow]note:[/] {len(r.fallback_experts)} expert(s) saw too few calibration tokens and used "
                      f"the fallback (gate/up: all MoE tokens, down: round to nearest): {', '.join(r.fallback_experts[:6])}")
        if r.rtn_weights:
            err.print(f"[yellow]note:[/] {len(r.rtn_weights)} weight(s) were never reached by calibration and were "
                      f"rounded to nearest: {', '.join(r.rtn_weights[:6])}")
        out.print(gptq_summary_line(s.gptq))
    if s.activations:
        a = s.activations
        if a.fallback_experts:
            err.print(f"[yellow]note:[/] {len(a.fallback_experts)} expert(s) saw too few calibration tokens; their input "
                      f"scales use the fallback (gate/up: all MoE tokens, down: the layer's largest): "
                      f"{', '.join(a.fallback_experts[:6])}")
        if a.unreached:
            err.print(f"[yellow]note:[/] {len(a.unreached)} module(s) were never reached by calibration; their "
                      f"input_global_scale is 1: {', '.join(a.unreached[:6])}")
        out.print(f"NVFP4 activations (W4A4): input_global_scale calibrated on {a.calibration} · {a.seconds:.1f} s")
    out.print(convert_summary_line(s))


def plan_rows(plan: Plan) -> list[dict]:
    rows = []
    for u in plan.units:
        rows.append(
            {
                "canonical": u.canonical,
                "source": u.source,
                "rows": list(u.rows) if u.rows else None,
                "output": u.out,
                "role": u.role.value,
                "shape": list(u.shape),
                "dtype": u.dtype,
                "action": u.scheme or "keep",
                "fusion_group": u.group if u.scheme else None,
                "rule": u.rule,
            }
        )
    for m in plan.dropped:
        rows.append({"canonical": None, "source": m.source, "action": "drop", "reason": m.dropped})
    return rows


def plan_dict(plan: Plan) -> dict:
    return {
        "source": plan.source,
        "architecture": plan.arch.name,
        "model_type": plan.arch.model_type,
        "scheme": plan.scheme,
        "group_size": plan.group_size,
        "recipe": plan.recipe.name,
        "tensors": plan_rows(plan),
        "ignore": plan.ignore_list(),
        "warnings": plan.warnings,
    }


def print_plan(plan: Plan) -> None:
    table = Table(title=f"{plan.source} · {plan.arch.model_type} → {plan.scheme}, group size {plan.group_size} "
                        f"(recipe: {plan.recipe.name})")
    for col in ("canonical", "HF output", "shape", "dtype", "action", "fusion group"):
        table.add_column(col, overflow="fold")
    for u in plan.units:
        action = f"[green]{u.scheme}[/]" if u.scheme else "[dim]keep[/]"
        if u.rule:
            action += f" (rule {u.rule})"
        table.add_row(u.canonical or "(tower)", u.out, "×".join(map(str, u.shape)), u.dtype, action,
                      (u.group or "") if u.scheme else "")
    for m in plan.dropped:
        table.add_row("", m.source, "", "", "[red]drop[/]", m.dropped)
    out.print(table)
    roles = Counter((u.role.value, u.scheme or "keep") for u in plan.units)
    summary = ", ".join(f"{n} {role} {action}" for (role, action), n in sorted(roles.items()))
    out.print(f"{len(plan.quantized)} quantized, {len(plan.kept)} kept, {len(plan.dropped)} dropped · {summary}")
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}")


def print_inspection(info, show_tensors: bool = False) -> None:
    dtypes = ", ".join(f"{d} ×{n}" for d, n in info.dtypes.items())
    out.print(f"[bold]{info.path}[/] ({info.kind})")
    out.print(f"architecture: {info.architecture}")
    out.print(f"quantization: {info.quantization}")
    out.print(f"tensors: {info.tensor_count} · {human_bytes(info.total_bytes)} · {dtypes}")
    if show_tensors:
        table = Table()
        for col in ("name", "dtype", "shape", "bytes"):
            table.add_column(col, overflow="fold")
        for t in info.tensors:
            table.add_row(t["name"], t["dtype"], "×".join(map(str, t["shape"])), human_bytes(t["bytes"]))
        out.print(table)


def print_kernel_status(s) -> None:
    """`nvq kernels status`: one fact per line (s is an nvq.ops.KernelStatus)."""
    nvcc = f"{s.nvcc} ({s.nvcc_release})" if s.nvcc else "not found"
    lines = [
        ("nvcc", nvcc),
        ("GPU", "; ".join(s.gpus) or "none visible"),
        ("sources", f"{s.kernel_dir}: {', '.join(s.sources) or 'none'}"),
        ("cache", s.cache_dir),
        ("library", s.library or ("cannot be built here" if s.problem else "not built yet")),
        ("on CPU", s.cpu),  # what ops on CPU tensors run on: the native codec or the reference
    ]
    if s.problem:
        lines.append(("why", s.problem))
    for label, value in lines:
        out.print(f"{label:<8} {value}", markup=False, highlight=False, soft_wrap=True)
    out.print("backends")
    for op, which in s.backends.items():
        out.print(f"  {op:<24} {which}", markup=False, highlight=False, soft_wrap=True)


def _sci(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def verify_verdict_line(cert: dict) -> str:
    """One line: verdict, where it failed (or how much passed), and the logit statistics."""
    lg = cert["logits"]
    stats = (
        f"mean KLD {_sci(lg.get('mean_kld'))} (expected {_sci(lg['expected'].get('mean_kld'))}) · "
        f"top-1 {100 * lg['top1_agreement']:.1f} % · RMS Δp {100 * lg['rms_dp']:.2f} %"
        if lg.get("mean_kld") is not None else "no logits (the candidate's forward failed)"
    )
    if cert["verdict"] == "pass":
        level = ("bit-exact with nvq's storage of the oracle" if cert.get("level") == "bit-exact"
                 else "within the expected-noise band")
        return f"PASS: {len(cert['taps'])} taps and {len(cert['weights'])} weights {level} · {stats}"
    fd = cert["first_divergence"] or {}
    where = fd.get("tap") or fd.get("field") or "(no tap)"
    if fd.get("tensor"):
        where += f" ({fd['tensor']}{', ' + fd['where'] if fd.get('where') else ''})"
    bad_t = sum(not t["ok"] for t in cert["taps"])
    bad_w = sum(not w["ok"] for w in cert["weights"])
    hint = f": {fd['hint']}" if fd.get("hint") else ""
    bad_c = sum(not d["ok"] for key in ("config", "tokenizer") for d in cert.get(key, []))
    config = f", {bad_c} config/tokenizer finding{'s' if bad_c > 1 else ''}" if bad_c else ""
    return f"FAIL at {where}{hint} · {bad_t} taps and {bad_w} weights out of band{config} · {stats}"


def print_verify(cert: dict) -> None:
    """Per-layer table (the worst tap of each layer against its band), then the verdict line."""
    inp = cert["inputs"]
    table = Table(title=f"{inp['candidate']['path']} ({inp['candidate']['format']}) vs {inp['oracle']['path']} · "
                        f"{inp['tokens']['count']} tokens · {cert['mode']}")
    for col in ("layer", "taps ok", "worst tap", "rel-L2", "expected", "limit", "weights ok"):
        table.add_column(col, justify="left" if col in ("layer", "worst tap") else "right")
    layers: dict = {}
    for t in cert["taps"]:
        layers.setdefault(t["layer"], {"taps": [], "weights": []})["taps"].append(t)
    for w in cert["weights"]:
        layers.setdefault(w["layer"], {"taps": [], "weights": []})["weights"].append(w)

    def excess(t):
        return float("inf") if t["rel_l2"] is None else t["rel_l2"] / t["limit"] if t["limit"] else 0.0

    for layer in sorted(layers, key=lambda k: (k is not None, k if k is not None else 0)):
        taps, weights = layers[layer]["taps"], layers[layer]["weights"]
        worst = max(taps, key=excess) if taps else None
        t_ok, w_ok = sum(t["ok"] for t in taps), sum(w["ok"] for w in weights)
        style = "" if t_ok == len(taps) and w_ok == len(weights) else "red"
        table.add_row(
            "global" if layer is None else str(layer), f"{t_ok}/{len(taps)}", worst["name"] if worst else "",
            _sci(worst["rel_l2"]) if worst else "", _sci(worst["expected_rel_l2"]) if worst else "",
            _sci(worst["limit"]) if worst else "", f"{w_ok}/{len(weights)}", style=style,
        )
    out.print(table)
    for note in cert.get("notes", []):
        err.print(f"[yellow]note:[/] {note}", markup=True, highlight=False)
    colour = "green" if cert["verdict"] == "pass" else "red"
    out.print(f"[bold {colour}]{verify_verdict_line(cert)}[/]", highlight=False)
