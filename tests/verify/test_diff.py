"""Metrics, the expected-noise model, bands, hints and first divergence, on synthetic tensors."""

from __future__ import annotations

import math

import pytest
import torch

from nvq.formats import nvfp4
from nvq.models import llama, qwen3_moe
from nvq.verify.candidate import Scheme
from nvq.verify.damage import LocalDamage
from nvq.verify.diff import (
    TapDiff,
    Thresholds,
    WeightDiff,
    diff_weights,
    entry_tap,
    first_divergence,
    logit_stats,
)
from nvq.verify.hints import Evidence, weight_hint
from nvq.verify.metrics import cosine, rel_l2
from nvq.verify.noise import apply_scheme, expected_draw

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def test_metrics():
    x = randn(8, 16)
    assert rel_l2(x, x) == 0 and cosine(x, x) == 1.0
    assert rel_l2(2 * x, x) == pytest.approx(1.0) and cosine(-x, x) == -1.0
    assert rel_l2(torch.zeros(3), torch.zeros(3)) == 0 and cosine(torch.zeros(3), torch.zeros(3)) == 1.0


def test_dense_schemes_round_to_their_dtype():
    w = randn(4, 32)
    assert torch.equal(apply_scheme(w, Scheme("f32")), w)
    assert torch.equal(apply_scheme(w, Scheme("bf16")), w.bfloat16().float())
    assert torch.equal(apply_scheme(w, Scheme("f16")), w.half().float())


def test_nvfp4_noise_is_per_expert_with_gate_and_up_sharing_a_global_scale():
    stack = randn(3, 8, 32)
    stack[1, 4:] *= 100  # the up half of expert 1 sets the expert's global scale
    got = apply_scheme(stack, Scheme("nvfp4", "ct", row_parts=2))
    for e in range(3):
        assert torch.equal(got[e], nvfp4.dequantize(nvfp4.quantize(stack[e])))
    modelopt = apply_scheme(stack[0], Scheme("nvfp4", "modelopt"))
    assert torch.equal(modelopt, nvfp4.dequantize(nvfp4.quantize(stack[0], profile=nvfp4.Profile.MODELOPT)))


def test_fusion_group_members_share_the_groups_global_scale():
    q, k = randn(8, 32), randn(8, 32) * 10
    oracle = {"blk.0.attn_q.weight": q, "blk.0.attn_k.weight": k}
    schemes = {n: Scheme("nvfp4") for n in oracle}
    fusion = {n: "blk.0:qkv" for n in oracle}
    got = expected_draw(oracle, schemes, {}, 0, fusion=fusion)
    g = nvfp4.global_scale(k.abs().amax(), torch.float32)
    assert torch.equal(got["blk.0.attn_q.weight"], nvfp4.dequantize(nvfp4.quantize(q, g)))
    assert not torch.equal(got["blk.0.attn_q.weight"], nvfp4.dequantize(nvfp4.quantize(q)))


def test_expected_draw_applies_each_tensors_scheme():
    oracle = {"a": randn(4, 32), "s": torch.tensor([0.7]), "n": randn(32), "odd": randn(4, 24)}
    schemes = {"a": Scheme("mxfp4"), "s": Scheme("bf16"), "odd": Scheme("nvfp4")}
    got = expected_draw(oracle, schemes, {}, 0)
    assert torch.equal(got["a"], apply_scheme(oracle["a"], Scheme("mxfp4"))) and not torch.equal(got["a"], oracle["a"])
    assert torch.equal(got["s"], oracle["s"].bfloat16().float())
    assert torch.equal(got["n"], oracle["n"])  # the candidate lacks it: nothing to model
    assert torch.equal(got["odd"], oracle["odd"])  # K = 24 cannot be NVFP4: the candidate cannot have it so


def test_logit_stats_follow_llama_perplexity():
    ids = torch.tensor([1, 2, 3, 0])
    base = randn(4, 5)
    same = logit_stats(base, base, [ids])
    assert same["mean_kld"] == 0 and same["top1_agreement"] == 1 and same["rms_dp"] == 0
    assert same["positions"] == 3  # the last position has no next token
    other = base.clone()
    other[0] = other[0].flip(0)
    s = logit_stats(base, other, [ids])
    lp, lq = base[0].double().log_softmax(0), other[0].double().log_softmax(0)
    kld0 = (lp.exp() * (lp - lq)).sum().item()
    assert s["mean_kld"] == pytest.approx(kld0 / 3)
    dp0 = lq[2].exp() - lp[2].exp()  # the next token of position 0 is ids[1] = 2
    assert s["rms_dp"] == pytest.approx(math.sqrt(dp0.item() ** 2 / 3))
    assert s["kld_max"] == pytest.approx(kld0) and s["dp_of"] == "next token"


TH = Thresholds()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda r: torch.ones_like(r), "norm missing or replaced by ones"),
        (lambda r: r.reshape(4, 2, 8, 64).swapaxes(1, 2).reshape(64, 64), "permutation was left in"),
        (lambda r: r * 1.7e8, "multiplier instead of a divisor"),
        (lambda r: r + 1.0, "norm shift"),
        (lambda r: r + randn(*r.shape), "× its band"),
    ],
)
def test_weight_hints(make, expected):
    norm = expected == "norm missing or replaced by ones"
    ref = randn(64) + 1 if norm else randn(64, 64)
    name = "blk.3.attn_norm.weight" if norm else "blk.3.attn_q.weight"
    assert expected in weight_hint(Evidence(name, make(ref), ref, TH.weight_limit([0.0]), {name: ref}, LocalDamage()))


def test_constant_factor_names_the_expert():
    ref = randn(4, 16, 32)
    got = ref.clone()
    got[2] *= 9.0
    name = "blk.0.ffn_down_exps.weight"
    assert "expert 2" in weight_hint(Evidence(name, got, ref, TH.weight_limit([0.0]), {name: ref}, LocalDamage()))


def test_diff_weights_missing_shape_and_band():
    oracle = {"blk.0.attn_v.weight": randn(8, 32), "blk.0.ffn_up.weight": randn(8, 32), "blk.1.attn_norm.weight": randn(32)}
    cand = {"blk.0.attn_v.weight": oracle["blk.0.attn_v.weight"][:, :16], "blk.0.ffn_up.weight": oracle["blk.0.ffn_up.weight"] * 1.0001}
    schemes = {n: Scheme("f32") for n in cand}
    got = {w.name: w for w in diff_weights(cand, oracle, schemes, TH)}
    assert not got["blk.0.attn_v.weight"].ok and "K read as the packed width" in got["blk.0.attn_v.weight"].hint
    assert not got["blk.1.attn_norm.weight"].ok and got["blk.1.attn_norm.weight"].hint == "missing from the candidate"
    assert not got["blk.0.ffn_up.weight"].ok  # 1e-4 > the 1e-6 floor when nothing is expected
    loose = Thresholds(weight_floor=1e-3)
    assert {w.name: w for w in diff_weights(cand, oracle, schemes, loose)}["blk.0.ffn_up.weight"].ok


def tap(name, err, limit=1e-4, layer=None):
    return TapDiff(name, layer, err, 1.0, err, 0.0, limit, err <= limit)


ORDER = ["embd", "attn_norm-0", "Qcur-0", "ffn_norm-0", "ffn_out-0", "l_out-0",
         "attn_norm-1", "Qcur-1", "ffn_norm-1", "ffn_out-1", "l_out-1", "result_norm", "result_output"]


def test_entry_taps():
    order = {n: i for i, n in enumerate(ORDER)}
    assert entry_tap("blk.1.ffn_norm.weight", order, llama.BLAME) == "ffn_norm-1"
    assert entry_tap("blk.0.ffn_down.weight", order, llama.BLAME) == "ffn_out-0"
    assert entry_tap("blk.1.layer_output_scale.weight", order, llama.BLAME) == "l_out-1"  # fallback
    assert entry_tap("token_embd.weight", order, llama.BLAME) == "embd"
    assert entry_tap("output.weight", order, llama.BLAME) == "result_output"


MOE_ORDER = ["attn_norm-1", "ffn_norm-1", "ffn_moe_logits-1", "ffn_moe_probs-1", "ffn_moe_out-1", "l_out-1",
             "result_norm", "result_output"]


@pytest.mark.parametrize("stack", ["ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight",
                                   "ffn_gate_exps.weight[5]"])
def test_a_failing_qwen3_moe_expert_stack_is_blamed_at_the_moe_output(stack):
    taps = [tap(n, 0.0) for n in MOE_ORDER]
    bad = [WeightDiff(f"blk.1.{stack}", 1, "nvfp4", 0.9, 0.1, 0.3, False, "expert 5 differs")]
    fd = first_divergence(taps, bad, MOE_ORDER, qwen3_moe.BLAME)
    assert (fd["tap"], fd["tensor"], fd["hint"]) == ("ffn_moe_out-1", f"blk.1.{stack}", "expert 5 differs")
    # blame rows are the architecture's: a dense model's rows know no expert stack
    assert first_divergence(taps, bad, MOE_ORDER, llama.BLAME)["tap"] == "l_out-1"


def test_first_divergence_takes_the_earliest_of_taps_and_weights():
    taps = [tap(n, 0.0, layer=int(n[-1]) if n[-1].isdigit() else None) for n in ORDER]
    assert first_divergence(taps, [], ORDER, llama.BLAME) is None
    taps[ORDER.index("ffn_out-1")] = tap("ffn_out-1", 0.5, layer=1)
    fd = first_divergence(taps, [], ORDER, llama.BLAME)
    assert fd["tap"] == "ffn_out-1" and fd["tensor"] is None and "no weight to blame" in fd["hint"]
    weights = [
        WeightDiff("blk.1.ffn_norm.weight", 1, "bf16", 0.3, 0.0, 1e-6, False, "norm missing"),
        WeightDiff("blk.1.ffn_up.weight", 1, "nvfp4", 0.31, 0.1, 0.3, False, "x"),
    ]
    fd = first_divergence(taps, weights, ORDER, llama.BLAME)
    assert fd == {"tap": "ffn_norm-1", "layer": 1, "tensor": "blk.1.ffn_norm.weight", "where": None,
                  "hint": "norm missing"}
    # no candidate taps at all (its forward failed): the oracle's order still places the weight
    assert first_divergence([], weights[1:], ORDER, llama.BLAME)["tap"] == "ffn_out-1"
    assert first_divergence(taps[:1], [], ORDER[:1], llama.BLAME, logits_ok=False)["tap"] == "result_output"
