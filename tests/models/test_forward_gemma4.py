"""Reference forward, Gemma-4 (gemma4.md §2): equal to transformers in fp32 on the MoE + k_eq_v,
PLE + KV-sharing + double-wide and dense k_eq_v tiny models; RoPE, KV sharing, sliding window."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nvq.models import gemma4
from nvq.models.layers import Taps, rope_inv_freq
from nvq.models.load import load_hf
from tests.models.hf_compare import by_family, captured_errors, hidden_state_errors, run_hf

TOL = 1e-4


def _hooks(cfg: gemma4.Gemma4Config) -> dict:
    hooks = {}
    if cfg.per_layer_input_size:
        hooks["inp_per_layer_selected"] = ("embed_tokens_per_layer", "out", "bt")
        hooks["per_layer_proj"] = ("per_layer_projection_norm", "out", "bt")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        hooks.update(
            {
                f"attn_norm-{i}": (p + "input_layernorm", "out", "bt"),
                f"Qcur-{i}": (a + "q_proj", "out", "bt"),
                f"Qcur_normed-{i}": (a + "q_norm", "out", "bt"),  # Gemma-4 norms before transposing
                f"kqv_out-{i}": (a + "o_proj", "in", "bt"),
                f"attn_post_norm-{i}": (p + "post_attention_layernorm", "out", "bt"),
                f"attn_out-{i}": (p + "pre_feedforward_layernorm", "in", "bt"),
                f"ffn_post_norm-{i}": (p + "post_feedforward_layernorm", "out", "bt"),
            }
        )
        if cfg.kv_source[i] == i:
            hooks[f"Kcur-{i}"] = (a + "k_proj", "out", "bt")
            hooks[f"Kcur_normed-{i}"] = (a + "k_norm", "out", "bt")
            hooks[f"Vcur_normed-{i}"] = (a + "v_norm", "out", "bt")
            if cfg.has_v_proj[i]:
                hooks[f"Vcur-{i}"] = (a + "v_proj", "out", "bt")
        if cfg.num_experts:
            hooks.update(
                {
                    f"ffn_norm_1-{i}": (p + "pre_feedforward_layernorm", "out", "bt"),
                    f"ffn_mlp-{i}": (p + "post_feedforward_layernorm_1", "out", "bt"),
                    f"ffn_moe_logits-{i}": (p + "router.proj", "out", "t"),
                    f"ffn_norm_2-{i}": (p + "pre_feedforward_layernorm_2", "out", "t"),
                    f"ffn_moe_out-{i}": (p + "experts", "out", "t"),
                    f"ffn_moe-{i}": (p + "post_feedforward_layernorm_2", "out", "bt"),
                    f"ffn_moe_combined-{i}": (p + "post_feedforward_layernorm", "in", "bt"),
                }
            )
        else:
            hooks[f"ffn_norm-{i}"] = (p + "pre_feedforward_layernorm", "out", "bt")
            hooks[f"ffn_out-{i}"] = (p + "mlp", "out", "bt")
        if cfg.per_layer_input_size:
            hooks[f"pe_in-{i}"] = (p + "per_layer_input_gate", "in", "bt")
            hooks[f"per_layer_embd_out-{i}"] = (p + "post_per_layer_input_norm", "out", "bt")
    return hooks


@pytest.mark.parametrize(
    "fixture", ["tiny_gemma4_moe_f32", "tiny_gemma4_ple_f32", "tiny_gemma4_dense"]
)
def test_gemma4_forward_equals_transformers_fp32(fixture, token_ids, request):
    path = request.getfixturevalue(fixture)
    arch, tensors = load_hf(path)
    cfg = arch.config
    assert token_ids.numel() > cfg.sliding_window  # the sliding layers really mask
    taps = Taps()
    logits = gemma4.forward(cfg, tensors, token_ids, taps=taps)
    run = run_hf(path, token_ids, _hooks(cfg))
    errs = {**hidden_state_errors(taps, run, cfg.num_layers), **captured_errors(taps, run)}
    print(fixture, {k: f"{v:.1e}" for k, v in by_family(errs).items()})
    assert logits.shape == (token_ids.numel(), cfg.vocab_size)
    assert logits.abs().max() < cfg.final_logit_softcapping
    assert max(errs.values()) <= TOL, {k: v for k, v in errs.items() if v > TOL}

    # RoPE: our frequencies are HF's, and Qcur_pos is HF's rotation of our Qcur_normed.
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    rotary = run.model.get_decoder().rotary_emb
    pos = torch.arange(token_ids.numel())[None]
    for kind, spec in (("sliding_attention", cfg.rope_sliding), ("full_attention", cfg.rope_full)):
        i = cfg.layer_types.index(kind)
        hd = cfg.head_dim[i]
        ours = rope_inv_freq(spec, hd)
        assert torch.allclose(ours.float(), getattr(rotary, f"{kind}_inv_freq"), rtol=1e-6, atol=0)
        cos, sin = rotary(taps["inp_scaled"][None], pos, kind)
        q = taps[f"Qcur_normed-{i}"].view(1, token_ids.numel(), -1, hd)
        want = apply_rotary_pos_emb(q, cos, sin, unsqueeze_dim=2).reshape(token_ids.numel(), -1)
        assert torch.allclose(taps[f"Qcur_pos-{i}"], want, rtol=1e-5, atol=1e-6)


def test_proportional_rope_rotates_a_quarter_of_the_pairs(tiny_gemma4_moe):
    cfg = load_hf(tiny_gemma4_moe)[0].config
    assert cfg.rope_full.kind == "proportional" and cfg.rope_full.partial_rotary_factor == 0.25
    hd = cfg.head_dim[-1]  # 32 on the full layer
    inv = rope_inv_freq(cfg.rope_full, hd)
    r = int(0.25 * hd // 2)
    assert inv.shape == (hd // 2,) and (inv[r:] == 0).all() and (inv[:r] > 0).all()
    # exponent denominator is the full head dim, not the rotated width (gemma4.md §2.4)
    assert torch.allclose(inv[:r], 1e6 ** (-2.0 * torch.arange(r, dtype=torch.float64) / hd))
    q = Taps(pattern=r"Qcur_(normed|pos)-5")
    gemma4.forward(cfg, load_hf(tiny_gemma4_moe)[1], torch.arange(4, 10), taps=q)
    normed, rotated = q["Qcur_normed-5"].view(6, -1, hd), q["Qcur_pos-5"].view(6, -1, hd)
    still = torch.cat([torch.arange(r, hd // 2), torch.arange(hd // 2 + r, hd)])
    assert torch.equal(normed[..., still], rotated[..., still])  # the other 3/4 pass through
    assert not torch.allclose(normed[1:, :, :r], rotated[1:, :, :r])


def test_kv_shared_layers_attend_to_their_donors(tiny_gemma4_ple, token_ids):
    arch, tensors = load_hf(tiny_gemma4_ple)
    cfg = arch.config
    # layers 5 sliding, 1 full, 3 sliding, 1 full; first shared 6: donors 4 (sliding), 5 (full)
    assert cfg.kv_source == (0, 1, 2, 3, 4, 5, 4, 4, 4, 5)
    assert not any(f"blk.{i}.attn_k.weight" in tensors for i in range(6, 10))
    assert (
        tensors["blk.9.ffn_gate.weight"].shape[0] == 2 * tensors["blk.0.ffn_gate.weight"].shape[0]
    )
    taps = Taps(pattern=r"(Kcur|Vcur)(_normed|_pos)?-\d+")
    gemma4.forward(cfg, tensors, token_ids, taps=taps)
    layers = {int(n.rsplit("-", 1)[1]) for n in taps.names()}
    assert layers == set(range(6))
    # a donor's K feeds the shared layers: changing it changes their output
    base, moved = Taps({"l_out-6"}), Taps({"l_out-6", "l_out-3"})
    gemma4.forward(cfg, tensors, token_ids, taps=base)
    bumped = dict(tensors)
    bumped["blk.4.attn_k.weight"] = tensors["blk.4.attn_k.weight"] * 1.5
    gemma4.forward(cfg, bumped, token_ids, taps=moved)
    assert not torch.allclose(base["l_out-6"], moved["l_out-6"], rtol=1e-3, atol=1e-4)


def test_k_eq_v_uses_the_raw_k_projection_as_v(tiny_gemma4_dense, token_ids):
    arch, tensors = load_hf(tiny_gemma4_dense)
    cfg = arch.config
    assert cfg.has_v_proj == (True,) * 5 + (False,) and "blk.5.attn_v.weight" not in tensors
    taps = Taps(pattern=r"(Kcur|Vcur)(_normed)?-5")
    gemma4.forward(cfg, tensors, token_ids, taps=taps)
    assert torch.equal(taps["Vcur-5"], taps["Kcur-5"])
    assert taps["Kcur-5"].shape == (token_ids.numel(), cfg.num_kv_heads[5] * cfg.head_dim[5])
    assert not torch.allclose(taps["Vcur_normed-5"], taps["Kcur_normed-5"])  # v_norm has no weight


def test_gemma4_sliding_window_masks_beyond_the_window(tiny_gemma4_dense, token_ids):
    arch, tensors = load_hf(tiny_gemma4_dense)
    w = arch.config.sliding_window
    assert w == 8 and token_ids.numel() > w
    windowed, unwindowed = Taps({"kqv_out-0"}), Taps({"kqv_out-0"})
    gemma4.forward(arch.config, tensors, token_ids, taps=windowed)
    wide = dataclasses.replace(arch.config, sliding_window=10**6)
    gemma4.forward(wide, tensors, token_ids, taps=unwindowed)
    a, b = windowed["kqv_out-0"], unwindowed["kqv_out-0"]
    assert torch.equal(a[:w], b[:w])
    assert ((a[w:] - b[w:]).abs().amax(dim=-1) > 1e-4).all()


@pytest.mark.parametrize("fixture", ["tiny_gemma4_moe", "tiny_gemma4_ple"])
def test_gemma4_taps_off_and_fp64(fixture, token_ids, request):
    arch, tensors = load_hf(request.getfixturevalue(fixture))
    cfg = arch.config
    off = gemma4.forward(cfg, tensors, token_ids)
    taps = Taps()
    on = gemma4.forward(cfg, tensors, token_ids, taps=taps)
    assert torch.equal(off, on) and torch.equal(taps["result_output"], on)
    if cfg.num_experts:
        assert taps["ffn_moe_topk-0"].shape == (token_ids.numel(), cfg.top_k_experts)
        assert "ffn_out-0" not in taps and "ffn_norm_1-0" in taps
    else:
        assert taps["inp_per_layer"].shape == (
            token_ids.numel(),
            cfg.num_layers * cfg.per_layer_input_size,
        )
    f64 = gemma4.forward(cfg, tensors, token_ids, dtype=torch.float64)
    err = ((off.double() - f64).abs().max() / f64.abs().max()).item()
    print(f"{fixture} fp32 vs fp64 {err:.1e}")
    assert err <= 1e-5


def test_embed_scale_option_changes_only_the_scale(tiny_gemma4_moe, token_ids):
    arch, tensors = load_hf(tiny_gemma4_moe)
    cfg = arch.config
    exact, bf16, two = Taps({"inp_scaled"}), Taps({"inp_scaled"}), Taps({"inp_scaled"})
    gemma4.forward(cfg, tensors, token_ids, taps=exact)
    gemma4.forward(
        cfg, tensors, token_ids, taps=bf16, embed_scale="hf_bf16"
    )  # √64 = 8: exact in bf16
    gemma4.forward(cfg, tensors, token_ids, taps=two, embed_scale=2.0)
    rows = tensors["token_embd.weight"][token_ids].float()
    assert torch.equal(exact["inp_scaled"], rows * 8.0) and torch.equal(
        bf16["inp_scaled"], rows * 8.0
    )
    assert torch.equal(two["inp_scaled"], rows * 2.0)
