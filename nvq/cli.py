"""The `nvq` command line: parse, call one library function, render. No logic lives here.

Exit codes (CLI.md): 0 success, 1 verification failed, 2 bad input or usage.
"""

from __future__ import annotations

import json
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from nvq import __version__
from nvq.errors import ConfigError, NvqError
from nvq.limits import parse_float, parse_int
from nvq.schemes import BUILTIN

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize Hugging Face checkpoints to NVFP4 / MXFP4 / GPTQ-int4 and certify them.",
)
_state = {"debug": False}


# --scheme choices: the registry's modules (nvq.schemes), named without importing them
Scheme = Enum("Scheme", {name: name for name in BUILTIN}, type=str)


class Activations(str, Enum):
    nvfp4 = "nvfp4"


class Method(str, Enum):
    gptq = "gptq"
    rtn = "rtn"


class DenseDtype(str, Enum):
    bfloat16 = "bfloat16"
    float32 = "float32"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# the engines `nvq verify --serve-as` models (nvq.verify.serving.SERVINGS)
ServeAs = Enum("ServeAs", {name.replace("-", "_"): name for name in ("checkpoint", "vllm", "vllm-sm100")}, type=str)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nvq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    _state["debug"] = debug


RecipeOpt = Annotated[
    str | None, typer.Option("--recipe", help="Recipe file (YAML) or preset name (see recipes/).")
]


# Numeric options parse with limits.parse_int / parse_float and are checked by limits.check_options, so
# 'nan', 'inf' or 'abc' get the same one-sentence refusal and exit 2 as any other bad value.
def _int(flag: str, **kw):
    return typer.Option(flag, parser=parse_int, metavar="N", **kw)


def _float(flag: str, **kw):
    return typer.Option(flag, parser=parse_float, metavar="X", **kw)


GroupSizeOpt = Annotated[
    int | None,
    _int("--group-size", help="GPTQ group size (128, 64, 32, or -1 for one group per row). "
                 "Default 128, or with --tp the largest that aligns."),
]
TPOpt = Annotated[
    int | None,
    _int("--tp", help="Check that every row-parallel weight splits into whole groups over N "
                 "tensor-parallel ranks; refuse otherwise."),
]


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Hugging Face checkpoint directory (or Hub id in the local cache), or a .gguf file (with --scheme bf16).")],
    out: Annotated[Path, typer.Argument(help="New output directory.")],
    scheme: Annotated[Scheme, typer.Option("--scheme", help="Target format; bf16 writes a dense HF checkpoint from a GGUF file (GGUF -> HF only for now).")],
    recipe: RecipeOpt = None,
    dtype: Annotated[DenseDtype | None, typer.Option("--dtype", help="Weight dtype of the dense --scheme bf16 output (float32 keeps dequantized values exactly).")] = None,
    device: Annotated[Device, typer.Option("--device", help="Where to quantize.")] = Device.auto,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is an earlier nvq output (config, weights, tokenizer files only).")] = False,
    force_replace_any: Annotated[bool, typer.Option("--force-replace-any", help="Replace OUT whatever it holds (never an input, nor a folder holding one).")] = False,
    max_shard_gb: Annotated[float, _float("--max-shard-gb", help="Largest output shard, in GB.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    method: Annotated[Method | None, typer.Option("--method", help="gptq: calibrated GPTQ (default); rtn: round to nearest, no calibration.")] = None,
    group_size: GroupSizeOpt = None,
    tp_size: TPOpt = None,
    damp: Annotated[float | None, _float("--damp", help="GPTQ dampening, a fraction of the mean Hessian diagonal (default 0.01; raised automatically when needed).")] = None,
    act_order: Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="Solve columns in descending Hessian order, with static groups (default on).")] = None,
    calib_file: Annotated[Path | None, typer.Option("--calib-file", help="UTF-8 text to calibrate on instead of the embedded public-domain corpus.")] = None,
    calib_samples: Annotated[int | None, _int("--calib-samples", help="Calibration sequences (default 128).")] = None,
    calib_seq_len: Annotated[int | None, _int("--calib-seq-len", help="Tokens per calibration sequence (default 2048).")] = None,
    activations: Annotated[Activations | None, typer.Option("--activations", help="nvfp4: also quantize activations (W4A4): calibrate each Linear's input_global_scale on the --calib-* corpus (--scheme nvfp4 only).")] = None,
    act_headroom: Annotated[float | None, _float("--act-headroom", help="Multiply every calibrated activation absmax by this (default 1; below 1 clips outliers).")] = None,
) -> None:
    """Convert a checkpoint to compressed-tensors NVFP4 / MXFP4 or GPTQ-int4, or a GGUF file to a dense HF checkpoint."""
    from nvq import dist, limits, report, schemes
    from nvq.quant.act_scales import settings_from_options
    from nvq.quant.gptq_write import GPTQSettings
    from nvq.quant.pipeline import convert as run_convert
    from nvq.quant.pipeline import source_bytes

    given = {k: v for k, v in dict(method=method and method.value, group_size=group_size, damp=damp,
                                   act_order=act_order, calib_file=calib_file, samples=calib_samples,
                                   seq_len=calib_seq_len).items() if v is not None}
    world = _guard(dist.join)
    interactive = sys.stderr.isatty() and world.is_main  # under torchrun, rank 0 speaks for all

    def job():
        limits.check_options({"--max-shard-gb": max_shard_gb, "--group-size": group_size, "--tp": tp_size,
                              "--damp": damp, "--calib-samples": calib_samples, "--calib-seq-len": calib_seq_len})
        acts, rest = settings_from_options(activations and activations.value, act_headroom, given)
        gptq = GPTQSettings(**rest) if rest else None
        with report.byte_progress(source_bytes(src), f"{scheme.value}", enabled=interactive) as tick, \
                report.layer_progress(enabled=interactive and schemes.get(scheme.value).whole_model is not None) \
                as layer_done:
            return run_convert(src, out, scheme.value, recipe=recipe, device=device.value,
                               force=force or force_replace_any, replace_any=force_replace_any,
                               max_shard_bytes=int(max_shard_gb * 1e9), progress=tick,
                               dtype=dtype.value if dtype else None, gptq=gptq, tp_size=tp_size,
                               layer_progress=layer_done, activations=acts)

    summary = _guard(job)
    if not world.is_main:
        return
    if as_json:
        typer.echo(json.dumps(report.convert_summary_dict(summary), indent=2))
    else:
        report.print_convert_summary(summary)


@app.command()
def plan(
    src: Annotated[str, typer.Argument(help="Hugging Face checkpoint directory.")],
    scheme: Annotated[Scheme, typer.Option("--scheme", help="Target format.")],
    recipe: RecipeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    group_size: GroupSizeOpt = None,
    tp_size: TPOpt = None,
) -> None:
    """Show the per-tensor plan (quantize / keep / fusion group / drop) without writing anything."""
    from nvq import limits, report
    from nvq.quant.pipeline import plan_convert

    def job():
        limits.check_options({"--group-size": group_size, "--tp": tp_size})
        return plan_convert(src, scheme.value, recipe, group_size, tp_size)

    p = _guard(job)
    if as_json:
        typer.echo(json.dumps(report.plan_dict(p), indent=2))
    else:
        report.print_plan(p)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="HF directory, quantized directory or .gguf file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Architecture, tensors, formats and sizes of a checkpoint or GGUF."""
    from dataclasses import asdict

    from nvq import report
    from nvq.inspect import inspect as run_inspect

    info = _guard(lambda: run_inspect(path))
    if as_json:
        typer.echo(json.dumps(asdict(info), indent=2))
        return
    report.print_inspection(info, show_tensors=tensors)


@app.command()
def verify(
    candidate: Annotated[str, typer.Argument(help="Checkpoint to certify: dense HF, nvq output, compressed-tensors NVFP4/MXFP4 or ModelOpt NVFP4 directory.")],
    oracle: Annotated[Path, typer.Option("--oracle", help="GGUF file of the same model (any type gguf-py dequantizes).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the certificate (JSON) to this file.")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Write the certificate as Markdown to this file.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML (one testcase per tap and weight) to this file.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report (per-layer plot, logits, inputs) to this file.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Verify on this text instead of the built-in prompts.")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="Verify on the text of this file.")] = None,
    tokens: Annotated[int | None, _int("--tokens", help="Verify on N deterministic pseudo-random token ids (no tokenizer needed).")] = None,
    max_tokens: Annotated[int, _int("--max-tokens", help="Cap on the tokens taken from the prompts.")] = 128,
    sequences: Annotated[int, _int("--sequences", help="Split the --tokens ids into this many sequences.")] = 1,
    device: Annotated[Device, typer.Option("--device", help="Where the reference forwards run.")] = Device.auto,
    recipe: RecipeOpt = None,
    factor: Annotated[float | None, _float("--factor", help="Set the weight, tap and KLD factors at once: candidate error allowed as a multiple of the expected error (defaults 1.25, 2.5, 2).")] = None,
    draws: Annotated[int, _int("--draws", help="Expected-noise draws against a lossy oracle (each one more forward).")] = 2,
    teacher_forced: Annotated[bool, typer.Option("--teacher-forced", help="Feed every layer the oracle's input, so each tap shows that layer's own error.")] = False,
    fp64: Annotated[bool, typer.Option("--fp64", help="Run the reference forwards in float64 instead of float32.")] = False,
    policy: Annotated[Path | None, typer.Option("--policy", help="Release policy (YAML, kept in version control): thresholds and what a passing certificate must show.")] = None,
    serve_as: Annotated[ServeAs, typer.Option("--serve-as", help="Run the candidate as this engine serves it: checkpoint (its own arithmetic), vllm (GPTQ scales in the model dtype), vllm-sm100 (and MXFP4 inputs quantized, Blackwell).")] = ServeAs.checkpoint,
) -> None:
    """Certify a checkpoint layer by layer against a GGUF oracle; exit 0 pass, 1 fail, 2 bad input."""
    from nvq import limits, report
    from nvq.verify.policy import load_policy
    from nvq.verify.run import load_thresholds, run
    from nvq.verify.serving import SERVINGS

    def job():
        limits.check_options({"--tokens": tokens, "--max-tokens": max_tokens, "--sequences": sequences,
                              "--factor": factor, "--draws": draws})
        rules = load_policy(policy, tuple(SERVINGS)) if policy is not None else None
        if rules is not None and factor is not None:
            raise ConfigError(f"--factor and --policy both set thresholds; the policy {policy} is the gate's rule, "
                              "change it there.")
        thresholds = load_thresholds(recipe, factor)
        with report.stage_progress(enabled=sys.stderr.isatty()) as progress:
            return run(candidate, oracle, json_out, markdown, junit, prompt=prompt, prompt_file=prompt_file,
                       n_tokens=tokens, max_tokens=max_tokens, device=device.value, policy=rules, html_path=html,
                       thresholds=rules.apply(thresholds) if rules else thresholds, teacher_forced=teacher_forced,
                       precision="fp64" if fp64 else "fp32", draws=draws, progress=progress,
                       n_sequences=sequences, serve_as=ServeAs(serve_as).value)

    cert = _guard(job)
    report.print_verify(cert)
    raise typer.Exit(0 if cert["verdict"] == "pass" else 1)


@app.command()
def check(
    certificate: Annotated[Path, typer.Argument(help="Certificate JSON written by nvq verify --json.")],
    candidate: Annotated[Path, typer.Argument(help="The checkpoint directory it should certify.")],
    oracle: Annotated[Path | None, typer.Option("--oracle", help="Also check the GGUF it was verified against.")] = None,
) -> None:
    """Re-hash the inputs: exit 0 when the certificate belongs to these exact files and this nvq, 1 naming each mismatch."""
    from nvq.verify.cert_check import check as run_check

    result = _guard(lambda: run_check(certificate, candidate, oracle))
    for line in result.problems:
        typer.echo(f"mismatch: {line}", err=True)
    if result.ok:
        typer.echo(f"ok: {certificate} certifies {candidate} ({result.checked_files} files"
                   f"{' and the oracle' if oracle else ''}).")
    raise typer.Exit(0 if result.ok else 1)


@app.command("diff")
def diff_certificates(
    cert_a: Annotated[Path, typer.Argument(help="The earlier certificate (e.g. the last release's).")],
    cert_b: Annotated[Path, typer.Argument(help="The later certificate.")],
    max_ratio: Annotated[float | None, typer.Option("--max-ratio", min=1.0, help="A per-layer worst error or KLD that grows by more than this factor is a regression (default: only checks that newly fail).")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="List every layer, not only the ones that changed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """What changed from CERT_A to CERT_B, per layer and in the logits; exit 1 on a regression."""
    import math

    from nvq.verify import cert_diff
    from nvq.verify.cert_check import load_certificate

    def job():
        return cert_diff.diff(load_certificate(cert_a), load_certificate(cert_b),
                              math.inf if max_ratio is None else max_ratio)

    d = _guard(job)
    typer.echo(json.dumps(d.as_dict(), indent=2) if as_json else cert_diff.to_text(d, all_rows))
    raise typer.Exit(1 if d.regressed else 0)


kernels_app = typer.Typer(no_args_is_help=True, help="Build the CUDA kernels ahead of time, or show what would run.")
app.add_typer(kernels_app, name="kernels")


@kernels_app.command("build")
def kernels_build(
    arch: Annotated[
        list[str] | None,
        typer.Option("--arch", help="Compute capability to build for, e.g. 9.0 or 9.0+PTX (repeatable). "
                     "Default: TORCH_CUDA_ARCH_LIST, else the GPUs present."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the cache holds the library.")] = False,
) -> None:
    """Compile the CUDA kernels into the cache and print the library's path."""
    from nvq import ops

    typer.echo(str(_guard(lambda: ops.build_library(arch or None, force=force))))


@kernels_app.command("status")
def kernels_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """nvcc, the GPU, the kernel cache, and the backend each op would use. Compiles nothing."""
    from dataclasses import asdict

    from nvq import ops, report

    status = _guard(ops.kernel_status)
    if as_json:
        typer.echo(json.dumps(asdict(status), indent=2))
    else:
        report.print_kernel_status(status)


def _guard(job):
    """Run a library call; an NvqError becomes one sentence on stderr and its exit code."""
    try:
        return job()
    except NvqError as e:
        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP raised as nvq.io.atomic.Terminated
        typer.echo("interrupted; nothing was left half-written.", err=True)
        raise typer.Exit(getattr(e, "exit_code", 130)) from None


def main() -> None:
    app()
