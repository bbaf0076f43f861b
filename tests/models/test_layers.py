"""Building blocks of the reference forward, checked against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from nvq.models import gemma4
from nvq.models import layers as L


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_attention_mask_is_causal_and_windowed():
    allowed = L.attention_mask(5, window=2).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert torch.equal(L.attention_mask(4, None), torch.ones(4, 4).tril().bool())


def test_attention_matches_a_per_head_loop_with_gqa_and_softcap():
    t, hq, hkv, d = 6, 4, 2, 8
    q, k, v = (
        torch.randn(t, h, d, generator=_g(i), dtype=torch.float64)
        for i, h in enumerate((hq, hkv, hkv))
    )
    out = L.attention(q, k, v, scale=0.3, window=3, softcap=2.0)
    want = []
    for h in range(hq):
        kh, vh = k[:, h // (hq // hkv)], v[:, h // (hq // hkv)]  # repeat_interleave grouping
        s = torch.tanh(q[:, h] @ kh.T * 0.3 / 2.0) * 2.0
        s = s.masked_fill(~L.attention_mask(t, 3), -math.inf)
        want.append(torch.softmax(s, -1) @ vh)
    assert torch.allclose(out, torch.stack(want, 1).reshape(t, hq * d), rtol=1e-12, atol=1e-12)


def test_rms_norm_flavours():
    x = torch.randn(3, 16, generator=_g(), dtype=torch.float64)
    w = torch.rand(16, generator=_g(1), dtype=torch.float64)
    base = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(L.rms_norm(x, None, 1e-6), base)
    assert torch.allclose(L.rms_norm(x, w, 1e-6, L.NORM_PLAIN), base * w)
    assert torch.allclose(L.rms_norm(x, w, 1e-6, L.NORM_ONE_PLUS), base * (1 + w))
    assert torch.allclose(L.rms_norm(x, w, 1e-6, L.NORM_LLAMA), base * w)
    # Llama rounds the normalized value to the input dtype before the weight; Gemma after.
    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    llama = L.rms_norm(xb, wb, 1e-6, L.NORM_LLAMA)
    n = L.rms_norm(xb, None, 1e-6)
    assert torch.equal(llama, wb * n)
    xf = xb.float()
    n32 = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    plain = L.rms_norm(xb, wb, 1e-6, L.NORM_PLAIN)
    assert plain.dtype == torch.bfloat16 and torch.equal(
        plain, (n32 * wb.float()).to(torch.bfloat16)
    )
    assert not torch.equal(plain, llama)
    with pytest.raises(ValueError):
        L.rms_norm(x, w, 1e-6, "gemma")


def test_rope_rotates_pairs_j_and_j_plus_half():
    d = 8
    inv = L.rope_inv_freq(L.RopeSpec(theta=100.0), d)
    assert torch.allclose(inv, 100.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))
    x = torch.randn(5, 2, d, generator=_g(), dtype=torch.float64)
    cos, sin = L.rope_cos_sin(inv, torch.arange(5), torch.float64, "cpu")
    y = L.apply_rope(x, cos, sin)
    for p in range(5):
        for j in range(d // 2):
            a = p * inv[j]
            c, s = math.cos(a), math.sin(a)
            assert torch.allclose(y[p, :, j], x[p, :, j] * c - x[p, :, j + d // 2] * s)
            assert torch.allclose(y[p, :, j + d // 2], x[p, :, j + d // 2] * c + x[p, :, j] * s)
    assert torch.equal(y[0], x[0])  # position 0 does not rotate


def test_rope_scaling_kinds():
    d = 16
    base = L.rope_inv_freq(L.RopeSpec(theta=1e4), d)
    assert torch.allclose(
        L.rope_inv_freq(L.RopeSpec(theta=1e4, kind="linear", factor=8.0), d), base / 8
    )
    prop = L.rope_inv_freq(
        L.RopeSpec(theta=1e4, kind="proportional", partial_rotary_factor=0.25), d
    )
    assert torch.equal(prop[:2], base[:2]) and (prop[2:] == 0).all()
    l3 = L.rope_inv_freq(
        L.RopeSpec(theta=5e5, kind="llama3", factor=8.0, original_max_position_embeddings=64), d
    )
    raw = L.rope_inv_freq(L.RopeSpec(theta=5e5), d)
    wavelen = 2 * math.pi / raw
    assert torch.equal(l3[wavelen < 16], raw[wavelen < 16])  # high frequencies untouched
    assert torch.allclose(l3[wavelen > 64], raw[wavelen > 64] / 8)  # low frequencies / factor
    with pytest.raises(ValueError):
        L.RopeSpec.from_hf({"rope_type": "yarn"}, 1e4)
    assert L.RopeSpec.from_hf({"rope_theta": 5.0}, 1e4) == L.RopeSpec(theta=5.0)


def test_gemma4_route_and_experts_against_a_token_loop():
    t, h, e, k, ie = 7, 16, 4, 2, 8
    x = torch.randn(t, h, generator=_g(), dtype=torch.float64)
    proj = torch.randn(e, h, generator=_g(1), dtype=torch.float64)
    scale = torch.rand(h, generator=_g(2), dtype=torch.float64) + 0.5
    pes = torch.rand(e, generator=_g(3), dtype=torch.float64) + 0.5
    r = gemma4.route(L.UNOBSERVED, x, proj, scale, pes, k, 1e-6)
    xn = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    probs = torch.softmax((xn * scale / math.sqrt(h)) @ proj.T, -1)
    assert torch.allclose(r.probs, probs)
    gate_up = torch.randn(e, 2 * ie, h, generator=_g(4), dtype=torch.float64)
    down = torch.randn(e, h, ie, generator=_g(5), dtype=torch.float64)
    out = L.UNOBSERVED.moe_experts(x, gate_up, down, r.experts, r.weights, "gelu_pytorch_tanh")
    for i in range(t):
        top = torch.argsort(probs[i], descending=True)[:k]
        assert set(top.tolist()) == set(r.experts[i].tolist())
        wts = probs[i, top] / probs[i, top].sum() * pes[top]
        want = sum(
            wt * down[ex] @ (L.gelu_tanh(gate_up[ex, :ie] @ x[i]) * (gate_up[ex, ie:] @ x[i]))
            for wt, ex in zip(wts, top.tolist(), strict=True)
        )
        assert torch.allclose(out[i], want)


def test_glu_mlp_activations():
    x = torch.randn(3, 8, generator=_g(), dtype=torch.float64)
    g, u, d = (
        torch.randn(*s, generator=_g(i), dtype=torch.float64)
        for i, s in enumerate(((5, 8), (5, 8), (8, 5)))
    )
    silu = L.UNOBSERVED.glu_mlp(x, g, u, d, "silu")
    assert torch.allclose(silu, ((x @ g.T) * torch.sigmoid(x @ g.T) * (x @ u.T)) @ d.T)
    z = x @ g.T
    gelu = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    assert torch.allclose(L.UNOBSERVED.glu_mlp(x, g, u, d, "gelu_pytorch_tanh"), (gelu * (x @ u.T)) @ d.T)
    with pytest.raises(ValueError):
        L.UNOBSERVED.glu_mlp(x, g, u, d, "relu")


def test_taps_record_only_what_was_asked_for():
    x = torch.ones(2, 3)
    taps = L.Taps({"a-1"}, pattern=r"b-\d+")
    for name in ("a-1", "a-2", "b-7", "b-x"):
        assert taps(name, x) is x
    assert taps.names() == ["a-1", "b-7"] and "a-2" not in taps and len(taps) == 2
    everything = L.Taps()
    everything("anything", x)
    assert list(everything) == ["anything"]
    assert L.as_taps(None)("a-1", x) is x and not L.as_taps(None).wants("a-1")
    moved = L.Taps(device="meta")
    moved("m", x)
    assert moved["m"].device.type == "meta"
    softcapped = L.softcap(torch.tensor([100.0, -100.0, 0.5]), 30.0)
    assert softcapped.abs().max() < 30 and torch.equal(L.softcap(x, None), x)
