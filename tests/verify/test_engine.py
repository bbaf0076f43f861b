"""The streamed verifier gives the figures of the whole-model computation it replaced
(tests/support/verify_in_memory.py) and holds one stage's weights at a time."""

from __future__ import annotations

import math

import pytest
import torch

from nvq.verify import engine
from nvq.verify.run import verify
from tests.support.verify_in_memory import in_memory_figures

pytestmark = pytest.mark.llamacpp


def _close(a: float | None, b: float | None, rel: float = 1e-6) -> bool:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


CASES = [  # (fixture, scheme, oracle type, teacher forced)
    ("llama_f32", "nvfp4", "f32", False),
    ("llama_f32", "mxfp4", "q8_0", False),
    ("gemma4_moe_f32", "nvfp4", "q8_0", False),
    ("gemma4_ple_f32", "nvfp4", "f32", True),
]


@pytest.mark.parametrize("fixture, scheme, outtype, forced", CASES)
def test_streamed_figures_equal_the_whole_model_computation(fixture, scheme, outtype, forced, request, tiny_gguf,
                                                            quantized):
    src = request.getfixturevalue(fixture)
    cand, oracle = quantized(src, scheme), tiny_gguf(src, outtype)
    got = verify(cand, oracle, teacher_forced=forced, n_tokens=40)
    ref = in_memory_figures(cand, oracle, got.tokens.sequences, teacher_forced=forced, device=got.device)
    assert [t.name for t in got.taps] == [t.name for t in ref["taps"]]
    for a, b in zip(got.taps, ref["taps"], strict=True):
        assert _close(a.rel_l2, b.rel_l2) and _close(a.expected_rel_l2, b.expected_rel_l2), a.name
        assert _close(a.cosine, b.cosine) and _close(a.max_abs, b.max_abs) and a.ok == b.ok, a.name
    ref_w = {w.name: w for w in ref["weights"]}
    assert [w.name for w in got.weights] == [w.name for w in ref["weights"]]
    for w in got.weights:
        r = ref_w[w.name]
        assert _close(w.rel_l2, r.rel_l2) and _close(w.expected_rel_l2, r.expected_rel_l2), w.name
        assert (w.ok, w.bit_exact) == (r.ok, r.bit_exact), w.name
    for key in ("mean_kld", "kld_p99", "kld_median", "kld_max", "top1_agreement", "rms_dp", "mean_dp",
                "mean_ln_ppl_ratio", "positions"):
        assert _close(got.logits[key], ref["logits"][key]), key
        assert _close(got.logits["expected"][key], ref["expected_logits"][key]), key
    assert got.verdict == "pass"


def test_one_stage_of_weights_at_a_time(gemma4_moe_f32, tiny_gguf, quantized, monkeypatch):
    """Every stage's cache is emptied before the next: the most full tensors held at once is one
    layer's, never the model's."""
    held, most = [], [0]
    real_clear = engine.StageCache.clear

    def clear(self):
        most[0] = max(most[0], len(self._full) + len(self._experts))
        held.append(len(self._full))
        real_clear(self)

    monkeypatch.setattr(engine.StageCache, "clear", clear)
    result = verify(quantized(gemma4_moe_f32, "nvfp4"), tiny_gguf(gemma4_moe_f32, "q8_0"), n_tokens=24)
    n_tensors = len(result.weights)
    assert result.verdict == "pass" and held
    per_layer = max(sum(1 for w in result.weights if w.layer == i) for i in range(6))
    assert most[0] <= 2 * per_layer < n_tensors  # weights and experts of one layer


def test_vocabulary_rows_are_read_in_blocks(llama_f32, tiny_gguf, quantized, monkeypatch):
    """The LM head and embeddings are read in row blocks (ROW_BLOCK_ELEMENTS, VOCAB_CHUNK_ELEMENTS);
    the figures do not depend on the block size."""
    cand, oracle = quantized(llama_f32, "nvfp4"), tiny_gguf(llama_f32, "q8_0")
    whole = verify(cand, oracle, n_tokens=24)
    monkeypatch.setattr(engine, "VOCAB_CHUNK_ELEMENTS", 1000)  # a few rows per block
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 700)
    blocks = verify(cand, oracle, n_tokens=24)
    assert _close(whole.logits["mean_kld"], blocks.logits["mean_kld"])  # GEMM sizes change the fp32 sums
    by_name = {w.name: w for w in whole.weights}
    assert all(_close(w.rel_l2, by_name[w.name].rel_l2) for w in blocks.weights)
    assert torch.isfinite(torch.tensor(blocks.logits["mean_kld"]))
