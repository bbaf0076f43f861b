"""Reference forward, Gemma-3: equal to transformers in fp32; (1 + w) norms; sliding window."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nvq.models import gemma3
from nvq.models.layers import Taps
from nvq.models.load import load_hf
from tests.models.hf_compare import by_family, captured_errors, hidden_state_errors, run_hf
from tests.support.tiny_models import TOKENIZER_VOCAB_SIZE

TOL = 1e-4


def _hooks(num_layers: int) -> dict:
    hooks = {}
    for i in range(num_layers):
        p = f"layers.{i}."
        hooks.update(
            {
                f"attn_norm-{i}": (p + "input_layernorm", "out", "bt"),
                # Gemma-3 transposes to [B, H, T, D] before q_norm / k_norm
                f"Qcur_normed-{i}": (p + "self_attn.q_norm", "out", "bhtd"),
                f"Kcur_normed-{i}": (p + "self_attn.k_norm", "out", "bhtd"),
                f"Vcur-{i}": (p + "self_attn.v_proj", "out", "bt"),
                f"kqv_out-{i}": (p + "self_attn.o_proj", "in", "bt"),
                f"attn_post_norm-{i}": (p + "post_attention_layernorm", "out", "bt"),
                f"sa_out-{i}": (p + "pre_feedforward_layernorm", "in", "bt"),
                f"ffn_norm-{i}": (p + "pre_feedforward_layernorm", "out", "bt"),
                f"ffn_out-{i}": (p + "mlp", "out", "bt"),
                f"ffn_post_norm-{i}": (p + "post_feedforward_layernorm", "out", "bt"),
            }
        )
    return hooks


def _compare(path, ids, label):
    arch, tensors = load_hf(path)
    taps = Taps()
    logits = gemma3.forward(arch.config, tensors, ids, taps=taps)
    n = arch.config.num_layers
    run = run_hf(path, ids, _hooks(n))
    errs = {**hidden_state_errors(taps, run, n), **captured_errors(taps, run)}
    print(label, {k: f"{v:.1e}" for k, v in by_family(errs).items()})
    assert torch.equal(taps["ffn_inp-0"], taps["sa_out-0"])
    assert max(errs.values()) <= TOL, {k: v for k, v in errs.items() if v > TOL}
    return arch, tensors, logits


def test_gemma3_forward_equals_transformers_fp32(tiny_gemma3_f32, token_ids):
    arch, tensors, logits = _compare(tiny_gemma3_f32, token_ids, "gemma3")
    cfg = arch.config
    assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (cfg.rope_sliding.theta, cfg.rope_full.theta) == (1e4, 1e6)
    assert cfg.query_pre_attn_scalar == 16 and cfg.final_logit_softcapping is None
    # The norms are stored as HF's w (around 0) and applied as 1 + w: a plain-w norm is far off.
    w = tensors["blk.0.attn_norm.weight"]
    assert w.abs().max() < 0.5
    plain = {k: (v + 1 if k.endswith("norm.weight") else v) for k, v in tensors.items()}
    shifted = gemma3.forward(cfg, plain, token_ids)
    assert not torch.allclose(shifted, logits, rtol=1e-2, atol=1e-3)


def test_gemma3_sliding_window_masks_beyond_the_window(tiny_gemma3_f32):
    # sliding_window is 32: T = 40 puts 8 query rows past the window on every sliding layer.
    ids = torch.randint(4, TOKENIZER_VOCAB_SIZE, (40,), generator=torch.Generator().manual_seed(7))
    arch, tensors, _ = _compare(tiny_gemma3_f32, ids, "gemma3 T=40")
    w = arch.config.sliding_window
    assert w == 32 and ids.numel() > w
    windowed, unwindowed = Taps({"l_out-0"}), Taps({"l_out-0"})
    gemma3.forward(arch.config, tensors, ids, taps=windowed)
    wide = dataclasses.replace(arch.config, sliding_window=None)
    gemma3.forward(wide, tensors, ids, taps=unwindowed)
    a, b = windowed["l_out-0"], unwindowed["l_out-0"]
    assert torch.equal(a[:w], b[:w])  # rows whose keys all lie inside the window
    assert ((a[w:] - b[w:]).abs().amax(dim=-1) > 1e-4).all()


def test_gemma3_taps_off_and_fp64(tiny_gemma3_f32, token_ids):
    arch, tensors = load_hf(tiny_gemma3_f32)
    off = gemma3.forward(arch.config, tensors, token_ids)
    taps = Taps(pattern=r"l_out-\d+")
    on = gemma3.forward(arch.config, tensors, token_ids, taps=taps)
    assert torch.equal(off, on) and len(taps) == arch.config.num_layers
    f64 = gemma3.forward(arch.config, tensors, token_ids, dtype=torch.float64)
    err = ((off.double() - f64).abs().max() / f64.abs().max()).item()
    print(f"gemma3 fp32 vs fp64 {err:.1e}")
    assert err <= 1e-5


@pytest.mark.parametrize(
    ("hidden", "bf16"), [(1536, 39.25), (2560, 50.5), (2816, 53.0), (3840, 62.0), (5376, 73.5)]
)
def test_embed_scale_exact_and_hf_bf16(hidden, bf16):
    # gemma4.md §2.2: llama.cpp multiplies by fp32 sqrtf(H); transformers' bf16 runs by bf16(√H).
    exact = gemma3.embed_scale_value(hidden)
    assert exact == float(torch.tensor(hidden, dtype=torch.float32).sqrt())
    assert gemma3.embed_scale_value(hidden, "hf_bf16") == bf16
    assert gemma3.embed_scale_value(hidden, 2.0) == 2.0
    with pytest.raises(ValueError):
        gemma3.embed_scale_value(hidden, "bf16")
