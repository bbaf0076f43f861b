"""Stepwise forwards: `forward_layers` driven step by step plus `head` over vocabulary chunks gives
what `forward` gives, bit for bit, with the same taps, and yields where its docstring says."""

from __future__ import annotations

import pytest
import torch

from nvq.models import layers as L
from nvq.models.load import load_hf

FIXTURES = [
    "tiny_llama_f32",
    "tiny_llama_untied",
    "tiny_gemma3_f32",
    "tiny_gemma4_moe_f32",
    "tiny_gemma4_ple_f32",  # PLE and KV-shared layers
    "tiny_gemma4_dense",
]
CHUNK = 100  # does not divide the vocabulary of 325: the last chunk is short


def _embedding_tap(taps: L.Taps) -> str:
    return "embd" if "embd" in taps else "inp_scaled"


@pytest.mark.parametrize("fixture", FIXTURES)
def test_forward_layers_and_chunked_head_equal_forward(fixture, token_ids, request):
    arch, tensors = load_hf(request.getfixturevalue(fixture))
    cfg, module = arch.config, arch.module
    whole = L.Taps()
    logits = module.forward(cfg, tensors, token_ids, taps=whole)

    taps = L.Taps()
    steps = module.forward_layers(cfg, tensors, token_ids, taps=taps)
    seen = []
    while True:
        try:
            step = next(steps)
        except StopIteration as done:
            hidden = done.value
            break
        seen.append(step)
        if step == L.EMBEDDED:
            assert _embedding_tap(taps) in taps and "attn_norm-0" not in taps
        else:  # right after l_out-step, before the next layer starts
            assert f"l_out-{step}" in taps and f"attn_norm-{step + 1}" not in taps
            assert "result_norm" not in taps
    assert seen == [L.EMBEDDED, *range(cfg.num_layers)]
    assert torch.equal(hidden, whole["result_norm"]) and hidden.shape == (token_ids.numel(), cfg.hidden_size)

    w = L.Weights(tensors, torch.float32, "cpu")
    vocab = w.lm_head().shape[0]
    chunks = [module.head(cfg, hidden, w.lm_head_rows(a, min(a + CHUNK, vocab))) for a in range(0, vocab, CHUNK)]
    assert len(chunks) > 1
    assert torch.equal(torch.cat(chunks, dim=1), logits)
    assert set(taps.names()) | {"result_output"} == set(whole.names())
    for name in taps.names():
        assert torch.equal(taps[name], whole[name]), name


def test_run_layers_returns_the_final_norm(tiny_llama_f32, token_ids):
    arch, tensors = load_hf(tiny_llama_f32)
    taps = L.Taps({"result_norm"})
    hidden = L.run_layers(arch.module.forward_layers(arch.config, tensors, token_ids, taps=taps))
    assert torch.equal(hidden, taps["result_norm"])


def test_gemma_head_softcaps_each_chunk(tiny_gemma4_moe_f32, token_ids):
    arch, tensors = load_hf(tiny_gemma4_moe_f32)
    cfg = arch.config
    hidden = L.run_layers(arch.module.forward_layers(cfg, tensors, token_ids))
    rows = tensors["token_embd.weight"][:7].float()
    raw = hidden @ rows.T
    capped = arch.module.head(cfg, hidden, rows)
    assert torch.equal(capped, torch.tanh(raw / cfg.final_logit_softcapping) * cfg.final_logit_softcapping)
    assert not torch.equal(capped, raw)


class Recorder:
    """An observer that notes every Linear weight (by identity) and every kept tensor."""

    def __init__(self):
        self.linears, self.kept = [], 0

    def linear(self, x, weight, expert):
        self.linears.append((id(weight), expert))

    def keep(self, t):
        self.kept += 1


@pytest.mark.parametrize("fixture", ["tiny_llama_f32", "tiny_gemma4_moe_f32"])
def test_the_observer_sees_only_the_forward_it_is_handed_to(fixture, token_ids, request):
    arch, tensors = load_hf(request.getfixturevalue(fixture))
    cfg, module = arch.config, arch.module
    seen = Recorder()
    observed = module.forward_layers(cfg, tensors, token_ids, observer=seen)
    plain = module.forward_layers(cfg, tensors, token_ids)
    # interleaved: the unobserved forward's Linears never reach the observer
    next(observed), next(plain), next(observed)
    L.run_layers(plain)
    hidden = L.run_layers(observed)
    assert seen.kept
    if fixture == "tiny_llama_f32":  # q, k, v, o, gate, up, down per layer, once each
        assert len(seen.linears) == 7 * cfg.num_layers
    else:  # MoE: every expert call is announced with its index, the block input as ALL_EXPERTS
        assert any(e == L.ALL_EXPERTS for _, e in seen.linears)
        assert any(e is not None and e >= 0 for _, e in seen.linears)
    assert torch.equal(hidden, L.run_layers(module.forward_layers(cfg, tensors, token_ids)))
