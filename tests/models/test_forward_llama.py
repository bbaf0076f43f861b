"""Reference forward, Llama: equal to transformers in fp32 (logits, hidden states, hooked taps)."""

from __future__ import annotations

import pytest
import torch

from nvq.models import llama
from nvq.models.layers import Taps
from nvq.models.load import load_hf
from tests.models.hf_compare import by_family, captured_errors, hidden_state_errors, run_hf

TOL = 1e-4


def _hooks(num_layers: int) -> dict:
    hooks = {}
    for i in range(num_layers):
        p = f"layers.{i}."
        hooks.update(
            {
                f"attn_norm-{i}": (p + "input_layernorm", "out", "bt"),
                f"Vcur-{i}": (p + "self_attn.v_proj", "out", "bt"),
                f"kqv_out-{i}": (p + "self_attn.o_proj", "in", "bt"),
                f"attn_out-{i}": (p + "self_attn.o_proj", "out", "bt"),
                f"ffn_inp-{i}": (p + "post_attention_layernorm", "in", "bt"),
                f"ffn_norm-{i}": (p + "post_attention_layernorm", "out", "bt"),
                f"ffn_out-{i}": (p + "mlp", "out", "bt"),
            }
        )
    return hooks


@pytest.mark.parametrize("fixture", ["tiny_llama_f32", "tiny_llama_untied"])
def test_llama_forward_equals_transformers_fp32(fixture, token_ids, request):
    path = request.getfixturevalue(fixture)
    arch, tensors = load_hf(path)
    assert ("output.weight" in tensors) == (fixture == "tiny_llama_untied")
    taps = Taps()
    logits = llama.forward(arch.config, tensors, token_ids, taps=taps)
    n = arch.config.num_layers
    run = run_hf(path, token_ids, _hooks(n))
    errs = {**hidden_state_errors(taps, run, n), **captured_errors(taps, run)}
    print(fixture, {k: f"{v:.1e}" for k, v in by_family(errs).items()})
    assert logits.shape == (token_ids.numel(), arch.config.vocab_size)
    assert max(errs.values()) <= TOL, {k: v for k, v in errs.items() if v > TOL}


def test_llama_taps_off_gives_the_same_logits_and_selection_works(tiny_llama, token_ids):
    arch, tensors = load_hf(tiny_llama)
    off = llama.forward(arch.config, tensors, token_ids)
    everything = Taps()
    on = llama.forward(arch.config, tensors, token_ids, taps=everything)
    assert torch.equal(off, on)
    assert torch.equal(everything["result_output"], on)
    n = arch.config.num_layers
    per_layer = {
        "attn_norm",
        "Qcur",
        "Kcur",
        "Vcur",
        "kqv_out",
        "attn_out",
        "ffn_inp",
        "ffn_norm",
        "ffn_out",
        "l_out",
    }
    globals_ = {"embd", "result_norm", "result_output"}
    assert set(everything.names()) == {f"{f}-{i}" for f in per_layer for i in range(n)} | globals_

    some = Taps({"l_out-1", "no-such-tap"}, pattern=r"Qcur-\d+")
    llama.forward(arch.config, tensors, token_ids, taps=some)
    assert set(some.names()) == {"l_out-1"} | {f"Qcur-{i}" for i in range(n)}
    assert torch.equal(some["l_out-1"], everything["l_out-1"])
    t, cfg = token_ids.numel(), arch.config
    assert some["Qcur-0"].shape == (t, cfg.num_heads * cfg.head_dim)
    assert everything["Kcur-0"].shape == (t, cfg.num_kv_heads * cfg.head_dim)


def test_llama_fp64_agrees_with_fp32(tiny_llama, token_ids):
    arch, tensors = load_hf(tiny_llama)  # bf16 weights: the forward casts them
    assert tensors["blk.0.attn_q.weight"].dtype == torch.bfloat16
    f32 = llama.forward(arch.config, tensors, token_ids)
    f64 = llama.forward(arch.config, tensors, token_ids, dtype=torch.float64)
    assert f32.dtype == torch.float32 and f64.dtype == torch.float64
    err = ((f32.double() - f64).abs().max() / f64.abs().max()).item()
    print(f"llama fp32 vs fp64 {err:.1e}")
    assert err <= 1e-5


def test_to_gguf_rope_order_is_the_converter_permutation_of_the_rows(tiny_llama, token_ids):
    # llama.cpp's converter: gguf = hf.reshape(n, 2, d/2, in).swapaxes(1, 2).reshape(n·d, in)
    # (gemma4.md §8). Projecting with the permuted rows must give our activations reordered.
    arch, tensors = load_hf(tiny_llama)
    cfg = arch.config
    wq = tensors["blk.0.attn_q.weight"].float()
    n, d = cfg.num_heads, cfg.head_dim
    gguf_rows = wq.reshape(n, 2, d // 2, -1).swapaxes(1, 2).reshape(n * d, -1)
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    ours = llama.to_gguf_rope_order(x @ wq.T, n)
    assert torch.equal(ours, x @ gguf_rows.T)
    assert not torch.equal(ours, x @ wq.T)
