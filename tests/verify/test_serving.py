"""`nvq verify --serve-as`: the candidate (and every expected draw) runs as the engine serves it
(issue 12 items 5 and 6): MXFP4 Linears quantize their inputs on vLLM's Blackwell path, and vLLM
holds GPTQ fp16 scales in the model dtype."""

from __future__ import annotations

import pytest
import torch

from nvq.formats import mxfp4
from nvq.models import layers as L
from nvq.quant.gptq_write import GPTQSettings
from nvq.quant.pipeline import convert
from nvq.verify.run import verify
from nvq.verify.serving import SERVINGS, MXFP4Inputs, ServedView, mxfp4_inputs
from tests.support.tiny_models import build_tiny_llama


def test_mxfp4_inputs_are_the_even_rule_round_trip_per_token():
    x = torch.randn(5, 96, dtype=torch.bfloat16) * 3
    want = mxfp4.dequantize(mxfp4.quantize(x), torch.float32).to(torch.bfloat16)
    assert torch.equal(mxfp4_inputs(x), want)
    assert not torch.equal(mxfp4_inputs(x), x)


def test_an_input_quantized_weight_keeps_its_type_through_casts_and_quantizes_in_linear():
    w = torch.randn(8, 64)
    x = torch.randn(3, 64)
    served = ServedView({"blk.0.attn_q.weight": w}, {"blk.0.attn_q.weight": type("S", (), {"name": "mxfp4"})()},
                        SERVINGS["vllm-sm100"])["blk.0.attn_q.weight"]
    cast = served.to(dtype=torch.float64)
    assert isinstance(cast, MXFP4Inputs) and isinstance(cast[0:4], MXFP4Inputs)
    got = L.UNOBSERVED.linear(x, served)
    assert type(got) is torch.Tensor  # the type stays on the weight, not the activations
    assert torch.equal(got, torch.nn.functional.linear(mxfp4_inputs(x), w))
    assert torch.equal(L.UNOBSERVED.linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.llamacpp
def test_vllm_sm100_runs_mxfp4_inputs_quantized_and_still_passes(llama_f32, quantized, tiny_gguf):
    cand, oracle = quantized(llama_f32, "mxfp4"), tiny_gguf(llama_f32, "f32")
    plain = verify(cand, oracle, n_tokens=32)
    served = verify(cand, oracle, n_tokens=32, serve_as="vllm-sm100")
    assert plain.verdict == served.verdict == "pass"
    assert served.serving.name == "vllm-sm100"
    # activation noise on top of weight noise: larger errors, and a band that grew with them
    attn = [(p, s) for p, s in zip(plain.taps, served.taps, strict=True) if p.name.startswith("attn_out")]
    assert attn and all(s.rel_l2 > p.rel_l2 and s.expected_rel_l2 > p.expected_rel_l2 for p, s in attn)
    assert [w.rel_l2 for w in plain.weights] == [w.rel_l2 for w in served.weights]  # weights unchanged


@pytest.fixture(scope="module")
def llama_bf16_gptq(tmp_path_factory):
    src = build_tiny_llama(tmp_path_factory.mktemp("bf16") / "src", dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("gptq") / "out"
    convert(src, out, "gptq", device="cpu", gptq=GPTQSettings(method="rtn", group_size=32))
    return src, out


@pytest.mark.llamacpp
def test_vllm_holds_gptq_scales_in_the_model_dtype(llama_bf16_gptq, tiny_gguf):
    src, cand = llama_bf16_gptq
    oracle = tiny_gguf(src, "f32")
    plain = verify(cand, oracle, n_tokens=32)
    served = verify(cand, oracle, n_tokens=32, serve_as="vllm")
    assert plain.verdict == served.verdict == "pass"
    q = {w.name: w for w in plain.weights if w.scheme and w.scheme.startswith("gptq")}
    s = {w.name: w for w in served.weights if w.scheme and w.scheme.startswith("gptq")}
    assert q and set(q) == set(s)
    assert all(w.scheme == "gptq-bf16-scales-g32" for w in s.values())
    # bf16 scales move each group by up to 2^-9 of its step: a visible, small change
    assert any(s[n].rel_l2 != q[n].rel_l2 for n in q)
    assert all(abs(s[n].rel_l2 - q[n].rel_l2) < 0.01 * q[n].rel_l2 + 1e-6 for n in q)
    assert all(w.bit_exact for w in s.values())  # expected draws hold bf16 scales too


def test_convert_summary_says_where_vllm_serves_it_differently(llama_bf16_gptq, tmp_path):
    from nvq import schemes

    def serving_notes(scheme, dtype):
        return schemes.get(scheme).serving_notes(dtype)

    assert any("--serve-as vllm-sm100" in n for n in serving_notes("mxfp4", "bfloat16"))
    assert any("--serve-as vllm" in n for n in serving_notes("gptq", "bfloat16"))
    assert serving_notes("gptq", "float16") == serving_notes("nvfp4", "bfloat16") == []
    src, _ = llama_bf16_gptq
    summary = convert(src, tmp_path / "mx", "mxfp4", device="cpu")
    assert any("W4A4 on Blackwell" in n for n in summary.serving_notes)
