"""`nvq verify`: candidate and oracle through the same reference forward, judged against the
expected noise of the candidate's scheme, written as a certificate.

Three forwards run on the same token ids: the oracle (GGUF weights), the candidate, and the
expected-noise run (the oracle's weights stored the way the candidate stores each tensor). With
`teacher_forced`, the candidate and expected runs are fed the oracle's residual stream at every
layer (nvq.verify.taps), so each layer's error is its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from nvq import limits
from nvq.errors import ConfigError, RecipeError
from nvq.io.output_guard import refuse_overlap
from nvq.quant.pipeline import resolve_device
from nvq.quant.recipe import load_recipe, read_recipe_text, safe_yaml
from nvq.verify import act_inputs, certificate, config_check, findings, html_report, tokenizer_check
from nvq.verify.candidate import Candidate
from nvq.verify.diff import (
    TapDiff,
    Thresholds,
    WeightDiff,
    first_divergence,
    weight_layer,
)
from nvq.verify.engine import stream_verify
from nvq.verify.noise import DEFAULT_DRAWS, fusion_groups
from nvq.verify.oracle import DEFAULT_MAX_TOKENS, Oracle, Tokens, load_oracle, token_ids
from nvq.verify.policy import Policy
from nvq.verify.serving import DEFAULT_SERVING, SERVINGS, Serving
from nvq.verify.sources import open_candidate

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}
FACTORS = ("weight_factor", "tap_factor", "kld_factor")  # what --factor X sets


@dataclass
class VerifyResult:
    candidate: Candidate
    oracle: Oracle
    tokens: Tokens
    thresholds: Thresholds
    teacher_forced: bool
    device: str
    taps: list[TapDiff]
    weights: list[WeightDiff]
    logits: dict  # candidate statistics, "expected" statistics, "limit_mean_kld", "ok"
    first_divergence: dict | None
    seconds: float
    candidate_error: str | None = None  # the candidate's forward could not run
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"  # of the reference forwards
    draws: int = 0  # dithered expected-noise draws (0: the oracle is exact, one nominal draw)
    config_findings: list[findings.Finding] = field(default_factory=list)
    tokenizer_findings: list[findings.Finding] = field(default_factory=list)
    resources: dict = field(default_factory=dict)  # peak host RSS and GPU memory, in bytes
    input_hashes: Any = None  # Future of (candidate file hashes, oracle sha256), computed alongside
    serving: Serving = SERVINGS[DEFAULT_SERVING]  # whose arithmetic the candidate ran under

    @property
    def level(self) -> str:
        """How strongly the candidate is certified: "bit-exact" when every compared tensor equals
        nvq's own storage of the oracle's values, else "within band" (or "fail")."""
        if not self.passed:
            return "fail"
        return "bit-exact" if self.weights and all(w.bit_exact for w in self.weights) else "within band"

    @property
    def passed(self) -> bool:
        return (
            self.candidate_error is None
            and all(f.ok for f in self.config_findings + self.tokenizer_findings)
            and all(t.ok for t in self.taps)
            and all(w.ok for w in self.weights)
            and bool(self.logits.get("ok", False))
            and not any(f.serious for f in self.candidate.client_findings)
        )

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"


def load_thresholds(recipe: str | Path | None = None, factor: float | None = None) -> Thresholds:
    """Defaults, overridden by a recipe's `verify:` mapping, overridden by --factor."""
    th = Thresholds()
    if recipe is not None:
        section = _recipe_verify_section(recipe)
        unknown = set(section) - set(Thresholds.keys())
        if unknown:
            raise RecipeError(
                f"recipe {recipe}: unknown verify key(s) {sorted(unknown)}; allowed: {Thresholds.keys()}."
            )
        try:
            th = replace(th, **{k: float(v) for k, v in section.items()})
        except (TypeError, ValueError):
            raise RecipeError(f"recipe {recipe}: verify thresholds must be numbers.") from None
    limits.check_option("--factor", factor)
    if factor is not None:
        th = replace(th, **{k: float(factor) for k in FACTORS})
    bad = [k for k, v in th.as_dict().items() if not 0 <= v < math.inf]
    if bad or any(getattr(th, k) < 1 for k in FACTORS):
        raise RecipeError(f"thresholds must be finite and ≥ 0, and every factor ≥ 1; got {th.as_dict()}.")
    return th


def _recipe_verify_section(recipe: str | Path) -> dict:
    load_recipe(recipe)  # the whole recipe must be valid (a file or a preset)
    path = Path(recipe)
    if path.is_file():
        text = read_recipe_text(path)
    else:
        text = resources.files("nvq.recipes").joinpath(f"{recipe}.yaml").read_text(encoding="utf-8")
    data = safe_yaml(text, str(recipe)) or {}
    section = data.get("verify") if isinstance(data, dict) else None
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise RecipeError(f"recipe {recipe}: 'verify' must be a mapping of threshold names to numbers.")
    return section


def verify(
    candidate: str | Path,
    oracle: str | Path,
    prompt: str | None = None,
    prompt_file: str | Path | None = None,
    n_tokens: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    device: str = "auto",
    thresholds: Thresholds | None = None,
    teacher_forced: bool = False,
    precision: str = "fp32",
    draws: int = DEFAULT_DRAWS,
    progress: Callable[[int, int], None] | None = None,
    n_sequences: int = 1,
    serve_as: str = DEFAULT_SERVING,
) -> VerifyResult:
    started = time.perf_counter()
    for flag, value in (("--tokens", n_tokens), ("--max-tokens", max_tokens), ("--sequences", n_sequences)):
        limits.check_option(flag, value)
    if prompt_file is not None:  # refused before the checkpoint and the oracle are opened
        limits.read_text_file(prompt_file, "--prompt-file")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    if serve_as not in SERVINGS:
        raise ConfigError(f"--serve-as {serve_as!r} is not one of {', '.join(SERVINGS)}.")
    serving = SERVINGS[serve_as]
    dtype = PRECISIONS[precision]
    th = thresholds or Thresholds()
    dev = resolve_device(device)
    cand = open_candidate(candidate, dev, serving)
    orc = load_oracle(oracle, cand)
    hashes = certificate.start_hashing(cand.path, orc.path)
    tokens = token_ids(cand, prompt, prompt_file, n_tokens, max_tokens, n_sequences)
    arch, seqs = cand.arch, tokens.sequences
    configs = config_check.compare(arch.name, arch.config, orc.arch_config, cand.config, orc.config, orc.metadata)
    vocab = tokenizer_check.compare(cand.path, cand.config, orc.metadata)
    # The oracle (and the expected-noise run, the oracle's weights stored the candidate's way) runs
    # under the GGUF's own values, the candidate's only where the GGUF has none; the candidate
    # under its own config. So a config bug shows in the taps too.
    o_arch = replace(arch, config=config_check.oracle_run_config(arch.name, arch.config, orc.arch_config, orc.metadata))
    n_draws = draws if orc.lossy else 0
    fusion = fusion_groups(cand.arch.table, list(orc.tensors))
    serving = act_inputs.for_candidate(serving, cand.tensors, cand.config.get("quantization_config"), fusion)
    try:
        res = stream_verify(o_arch, arch, orc.tensors, cand.tensors, cand.schemes, fusion, cand.group_index,
                            _source_dtype(cand), n_draws, seqs, dev, dtype, th, teacher_forced, progress,
                            serving)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"the oracle {orc.path} does not run under the config its GGUF implies ({_one_line(e)}); "
            f"config findings: {[f.message for f in configs] or 'none'}."
        ) from None
    taps, weights, logits, error = res.taps, res.weights, res.logits, res.candidate_error
    order = res.order
    first = first_divergence(taps, weights, order, arch.blame, logits.get("ok", True))
    first = findings.first_divergence(first, configs + vocab, order)
    serious = [f for f in cand.client_findings if f.serious]
    if first is None and serious:
        f = serious[0]
        first = {"tap": None, "layer": weight_layer(f.tensor), "tensor": f.tensor, "where": None,
                 "hint": f"{f.client} would serve other weights: {f.what}"}
    if first is None and error is not None:
        first = {"tap": None, "layer": None, "tensor": None, "hint": f"the candidate's forward failed: {error}"}
    notes = [f"candidate tensor '{n}' has no counterpart in the oracle" for n in sorted(set(cand.tensors) - set(orc.tensors))]
    notes += [f"oracle tensor '{n}' is not compared: the model never reads it" for n in orc.ignored]
    notes += [f.message for f in configs + vocab if f.verdict == findings.NOTE]
    return VerifyResult(
        cand, orc, tokens, th, teacher_forced, str(dev), taps, weights, logits, first,
        time.perf_counter() - started, error, notes, precision, n_draws, configs, vocab,
        resources=_resources(res.peak_gpu_bytes), input_hashes=hashes, serving=serving,
    )


def _resources(peak_gpu_bytes: int) -> dict:
    """Peak host memory of this process (ru_maxrss, KiB on Linux) and of the GPU, in bytes."""
    import resource

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_gpu_bytes": int(peak_gpu_bytes)}


def _source_dtype(cand: Candidate) -> torch.dtype:
    """The dtype nvq quantized the candidate from: its dense tensors' (bf16 for most releases)."""
    dense = {s.name for s in cand.schemes.values() if not s.quantized}
    for name, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        if dense == {name}:
            return dtype
    return torch.float32


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text.strip("'\"")


def run(
    candidate: str | Path,
    oracle: str | Path,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    junit_path: str | Path | None = None,
    policy: Policy | None = None,
    html_path: str | Path | None = None,
    **options,
) -> dict:
    """Verify, then write the certificate files asked for (all or none); returns the certificate."""
    asked = (("json", json_path), ("markdown", markdown_path), ("junit", junit_path), ("html", html_path))
    outputs = {k: Path(p) for k, p in asked if p}
    for kind, path in outputs.items():  # a certificate must never overwrite what it certifies
        refuse_overlap(path, [Path(candidate), Path(oracle)], what=f"--{kind}")
    certificate.check_outputs(list(outputs.values()))
    result = verify(candidate, oracle, **options)
    cert = certificate.build(result, policy)
    renderers = {"json": certificate.to_json, "markdown": certificate.to_markdown, "junit": certificate.to_junit,
                 "html": html_report.to_html}
    certificate.write_atomically({path: renderers[kind](cert) for kind, path in outputs.items()})
    return cert
