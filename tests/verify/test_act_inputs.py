"""`nvq verify` runs the activation quantization a candidate declares (NVFP4 W4A4 with each
module's input_global_scale, MXFP4 inputs) in the candidate and every expected draw, where the
serving honours it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from nvq.models import layers as L
from nvq.quant.act_scales import ActivationSettings
from nvq.quant.pipeline import convert
from nvq.verify.act_inputs import (
    NVFP4Inputs,
    declared_inputs,
    nvfp4_inputs,
    nvfp4_inputs_type,
    nvfp4_module_types,
)
from nvq.verify.candidate import open_layout
from nvq.verify.noise import fusion_groups
from nvq.verify.run import verify

W4A4 = ActivationSettings(samples=2, seq_len=32)


def vllm_ref_nvfp4_round_trip(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """vLLM's `ref_nvfp4_quant` + `cast_to_fp4` + `dequantize_to_dtype`, transcribed line by line."""

    def get_reciprocal(t):
        if isinstance(t, torch.Tensor):
            return torch.where(t == 0, torch.tensor(0.0, dtype=t.dtype), 1.0 / t)
        return 1.0 / t

    def cast_to_fp4(t):
        sign = torch.sign(t)
        t = torch.abs(t)
        t[(t >= 0.0) & (t <= 0.25)] = 0.0
        t[(t > 0.25) & (t < 0.75)] = 0.5
        t[(t >= 0.75) & (t <= 1.25)] = 1.0
        t[(t > 1.25) & (t < 1.75)] = 1.5
        t[(t >= 1.75) & (t <= 2.5)] = 2.0
        t[(t > 2.5) & (t < 3.5)] = 3.0
        t[(t >= 3.5) & (t <= 5.0)] = 4.0
        t[t > 5.0] = 6.0
        return t * sign

    m, n = x.shape
    xb = torch.reshape(x, (m, n // 16, 16))
    vec_max = torch.max(torch.abs(xb), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = g * (vec_max * get_reciprocal(6.0))
    scale = torch.clamp(scale, max=448, min=-448).to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = get_reciprocal(scale * get_reciprocal(g))
    scaled = xb.to(torch.float32) * output_scale
    q = cast_to_fp4(torch.clamp(scaled, -6.0, 6.0).reshape(m, n))
    return (q.reshape(m, n // 16, 16) * (scale / g)).reshape(m, n)


@pytest.mark.parametrize("g", [1.0, 37.25, 2688.0 / 11.3, 5e4])
def test_nvfp4_inputs_equal_vllms_activation_path(g):
    gen = torch.Generator().manual_seed(int(g))
    x = torch.randn(7, 96, generator=gen) * torch.logspace(-3, 2, 96)
    x[0, :16] = 0.0  # all-zero block: scale 0 stays 0 (CT's weight path would store 0.125)
    x[1, 16:32] = 1e-6  # scale underflows to 0 in FP8
    gt = torch.tensor([g], dtype=torch.float32)
    assert torch.equal(nvfp4_inputs(x, gt), vllm_ref_nvfp4_round_trip(x, gt))


def test_nvfp4_inputs_type_carries_its_scale_through_casts_and_linear():
    w, x = torch.randn(8, 32), torch.randn(3, 32) * 4
    kind = nvfp4_inputs_type(448.0)
    assert kind is nvfp4_inputs_type(448.0) and issubclass(kind, NVFP4Inputs)
    typed = w.as_subclass(kind).to(torch.float64)
    assert type(typed) is kind
    want = torch.nn.functional.linear(nvfp4_inputs(x, torch.tensor([448.0])), w)
    assert torch.equal(L.UNOBSERVED.linear(x, w.as_subclass(kind)), want)
    assert not torch.equal(want, torch.nn.functional.linear(x, w))


NVFP4_ARGS = {
    "num_bits": 4,
    "type": "float",
    "strategy": "tensor_group",
    "group_size": 16,
    "dynamic": "local",
}
MXFP4_ARGS = {
    "num_bits": 4,
    "type": "float",
    "strategy": "group",
    "group_size": 32,
    "dynamic": True,
}


@pytest.mark.parametrize(
    "groups, want",
    [
        ({"g": {"input_activations": NVFP4_ARGS}}, "nvfp4"),
        ({"g": {"input_activations": MXFP4_ARGS}}, "mxfp4"),
        ({"g": {"input_activations": None}}, None),
        ({"a": {"input_activations": NVFP4_ARGS}, "b": {"input_activations": None}}, None),
        ({"g": {"input_activations": {**NVFP4_ARGS, "num_bits": 8}}}, None),
    ],
)
def test_declared_input_quantization_is_read_from_the_config_groups(groups, want):
    assert declared_inputs({"quant_method": "compressed-tensors", "config_groups": groups}) == want
    assert declared_inputs({"quant_method": "gptq", "config_groups": groups}) is None


def test_gemma4_expert_stacks_run_each_expert_with_its_own_input_scale(gemma4_moe_f32, tmp_path):
    out = tmp_path / "w4a4"
    convert(gemma4_moe_f32, out, "nvfp4", device="cpu", activations=W4A4)
    stored = load_file(next(out.glob("*.safetensors")))
    lay = open_layout(out)
    types = nvfp4_module_types(lay, fusion_groups(lay.arch.table, list(lay.sources)))
    stacks = {n: t for n, t in types.items() if isinstance(t, tuple)}
    assert stacks and all(len(t) == len(lay.sources[n].experts) for n, t in stacks.items())
    for name, per_expert in stacks.items():
        for e, kind in enumerate(per_expert):
            modules = [leaf.module for leaf in lay.sources[name].experts[e]]
            want = max(float(stored[f"{m}.input_global_scale"]) for m in modules)
            assert float(kind.global_scale) == want, (name, e)
    assert len(types) == sum(s.scheme.quantized for s in lay.sources.values())


@pytest.fixture(scope="module")
def llama_w4a4(llama_f32, tmp_path_factory):
    out = tmp_path_factory.mktemp("v-w4a4") / "out"
    convert(llama_f32, out, "nvfp4", device="cpu", activations=W4A4)
    return out


@pytest.mark.llamacpp
def test_w4a4_candidate_runs_its_inputs_quantized_where_the_serving_honours_it(
    llama_f32, llama_w4a4, quantized, tiny_gguf
):
    oracle = tiny_gguf(llama_f32, "f32")
    a16 = verify(quantized(llama_f32, "nvfp4"), oracle, n_tokens=32)
    w4a4 = verify(llama_w4a4, oracle, n_tokens=32)
    marlin = verify(llama_w4a4, oracle, n_tokens=32, serve_as="vllm")
    blackwell = verify(llama_w4a4, oracle, n_tokens=32, serve_as="vllm-sm100")
    assert a16.verdict == w4a4.verdict == marlin.verdict == blackwell.verdict == "pass"
    assert "NVFP4 W4A4" in w4a4.serving.what and "NVFP4 W4A4" in blackwell.serving.what
    assert "W4A4" not in marlin.serving.what
    # weights are the same bytes: weight diffs agree, and vLLM's Marlin path runs them weight-only
    assert [w.rel_l2 for w in a16.weights] == [w.rel_l2 for w in w4a4.weights]
    assert marlin.logits["mean_kld"] == a16.logits["mean_kld"]
    assert blackwell.logits["mean_kld"] == w4a4.logits["mean_kld"] != a16.logits["mean_kld"]
    # activation noise on top of weight noise, in the candidate and in its expected band alike
    attn = [
        (p, s) for p, s in zip(a16.taps, w4a4.taps, strict=True) if p.name.startswith("attn_out")
    ]
    assert attn and all(
        s.rel_l2 > p.rel_l2 and s.expected_rel_l2 > p.expected_rel_l2 for p, s in attn
    )
