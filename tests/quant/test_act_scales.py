"""W4A4 NVFP4 (`--activations nvfp4`): input_global_scale per quantized module from the calibrated
input absmax, shared in fusion groups, MoE experts on their routed tokens with the fallback, and
the config's input_activations."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from nvq.cli import app
from nvq.formats import nvfp4
from nvq.quant import calib
from nvq.quant.act_scales import INPUT_ACTIVATIONS_ARGS, ActivationSettings
from nvq.quant.pipeline import convert
from tests.support.tiny_models import build_tiny_qwen3_moe

SAMPLES, SEQ_LEN = 3, 48
SETTINGS = ActivationSettings(samples=SAMPLES, seq_len=SEQ_LEN)


def load_dir(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors |= load_file(f)
    return tensors


@pytest.fixture(scope="module")
def llama_w4a4(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4a4") / "llama-w4a4"
    summary = convert(tiny_llama, out, "nvfp4", device="cpu", activations=SETTINGS)
    return out, summary


@pytest.fixture(scope="module")
def llama_a16(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("a16") / "llama-a16"
    convert(tiny_llama, out, "nvfp4", device="cpu")
    return out


def hf_input_absmax(model_dir, sequences) -> dict[str, torch.Tensor]:
    """Every nn.Linear's input absmax over the sequences, from transformers' fp32 forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            a = args[0].detach().abs().amax()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for s in sequences:
            model(s[None])
    return amax


def test_input_global_scale_is_2688_over_the_calibrated_absmax_in_the_model_dtype(
    tiny_llama, llama_w4a4
):
    out, _ = llama_w4a4
    got = load_dir(out)
    seqs = calib.calibration_set(tiny_llama, 512, SAMPLES, SEQ_LEN).sequences
    amax = hf_input_absmax(tiny_llama, seqs)
    for layer in range(2):
        p = f"model.layers.{layer}"
        for group in (
            [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"],
            [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"],
            [f"{p}.self_attn.o_proj"],
            [f"{p}.mlp.down_proj"],
        ):
            a = torch.stack([amax[m] for m in group]).max()
            want = nvfp4.global_scale(a.to(torch.bfloat16), torch.bfloat16)
            for m in group:
                g = got[f"{m}.input_global_scale"]
                assert g.dtype == torch.float32 and g.shape == (1,), m
                # nvq's forward equals transformers' to ~1e-6; the bf16 rounding of A_x may still
                # land one bf16 step away at a rounding boundary
                assert abs(float(g) / float(want) - 1) <= 2**-8, (m, float(g), float(want))


def test_w4a4_weights_equal_weight_only_and_config_declares_input_activations(
    llama_w4a4, llama_a16
):
    out, summary = llama_w4a4
    w4a4, a16 = load_dir(out), load_dir(llama_a16)
    scales = {k for k in w4a4 if k.endswith(".input_global_scale")}
    assert set(w4a4) - scales == set(a16)
    assert {k.removesuffix(".input_global_scale") for k in scales} == {
        k.removesuffix(".weight_packed") for k in a16 if k.endswith(".weight_packed")
    }
    for k, t in a16.items():
        assert torch.equal(w4a4[k].view(torch.uint8), t.view(torch.uint8)), k
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc_a16 = json.loads((llama_a16 / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"] == INPUT_ACTIVATIONS_ARGS
    qc["config_groups"]["group_0"]["input_activations"] = None
    assert qc == qc_a16
    assert any("W4A4 NVFP4 with FP4 activations on Blackwell" in n for n in summary.serving_notes)
    assert summary.activations.calibration.startswith(
        f"{SAMPLES} × {SEQ_LEN} tokens from embedded corpus"
    )


def test_config_parses_with_compressed_tensors_as_the_nvfp4_preset(llama_w4a4):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import NVFP4

    qc = QuantizationConfig.model_validate(
        json.loads((llama_w4a4[0] / "config.json").read_text())["quantization_config"]
    )
    assert qc.config_groups["group_0"].input_activations == NVFP4["input_activations"]


def convert_cli(src, out, *flags: str):
    return CliRunner().invoke(app, ["convert", str(src), str(out), *flags])


@pytest.mark.parametrize("scheme", ["mxfp4", "gptq"])
def test_activations_refused_for_schemes_other_than_nvfp4(tiny_llama, tmp_path, scheme):
    result = convert_cli(tiny_llama, tmp_path / "out", "--scheme", scheme, "--activations", "nvfp4")
    assert result.exit_code == 2, result.output
    assert f"--activations nvfp4 applies to --scheme nvfp4 only, not to {scheme}." in result.output
    assert not (tmp_path / "out").exists()


def test_act_headroom_without_activations_is_refused(tiny_llama, tmp_path):
    result = convert_cli(tiny_llama, tmp_path / "out", "--scheme", "nvfp4", "--act-headroom", "1.5")
    assert result.exit_code == 2
    assert "--act-headroom applies with --activations nvfp4 only" in result.output


def test_non_positive_act_headroom_is_refused(tiny_llama, tmp_path):
    flags = ["--scheme", "nvfp4", "--activations", "nvfp4", "--act-headroom", "0"]
    result = convert_cli(tiny_llama, tmp_path / "out", *flags)
    assert result.exit_code == 2 and "--act-headroom must be a positive number" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_calibrates_on_the_calib_options(tiny_llama, tmp_path):
    out = tmp_path / "out"
    flags = [
        "--scheme",
        "nvfp4",
        "--activations",
        "nvfp4",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "16",
    ]
    result = convert_cli(tiny_llama, out, *flags, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["activations"]["calibration"].startswith("2 × 16 tokens")
    assert any(k.endswith("input_global_scale") for k in load_dir(out))


def test_headroom_divides_every_input_scale(tiny_llama, llama_w4a4, tmp_path):
    out = tmp_path / "headroom"
    convert(
        tiny_llama,
        out,
        "nvfp4",
        device="cpu",
        activations=ActivationSettings(samples=SAMPLES, seq_len=SEQ_LEN, headroom=2.0),
    )
    base, wide = load_dir(llama_w4a4[0]), load_dir(out)
    for k in (k for k in base if k.endswith("input_global_scale")):
        assert float(wide[k]) == float(base[k]) / 2, k  # 2× a power of two: exact in bf16


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"))


def _expert_scales(tensors, layer):
    e = {}
    for k, t in tensors.items():
        if f"layers.{layer}.mlp.experts." in k and k.endswith("input_global_scale"):
            idx, proj = k.split("experts.")[1].split(".")[:2]
            e.setdefault(int(idx), {})[proj] = float(t)
    return e


def test_moe_experts_use_routed_tokens_and_rare_experts_fall_back(tiny_moe, tmp_path):
    routed = tmp_path / "routed"
    s = convert(
        tiny_moe,
        routed,
        "nvfp4",
        device="cpu",
        activations=ActivationSettings(samples=SAMPLES, seq_len=SEQ_LEN, min_expert_tokens=1),
    )
    fallback = tmp_path / "fallback"
    f = convert(
        tiny_moe,
        fallback,
        "nvfp4",
        device="cpu",
        activations=ActivationSettings(samples=SAMPLES, seq_len=SEQ_LEN, min_expert_tokens=10**6),
    )
    assert not s.activations.fallback_experts
    n_experts = len(_expert_scales(load_dir(routed), 0))
    assert len(f.activations.fallback_experts) == 2 * n_experts
    for layer in range(2):
        r, fb = _expert_scales(load_dir(routed), layer), _expert_scales(load_dir(fallback), layer)
        assert all(v["gate_proj"] == v["up_proj"] for v in r.values())  # one fusion group
        # routed tokens: experts differ; every one sees a subset of the MoE block's input
        assert len({v["gate_proj"] for v in r.values()}) > 1
        (moe_input,) = {v["gate_proj"] for v in fb.values()}  # all tokens entering the block
        assert all(v["gate_proj"] >= moe_input for v in r.values())
        # down of a rare expert: the layer's largest expert down-input absmax (the smallest g)
        assert {v["down_proj"] for v in fb.values()} == {min(v["down_proj"] for v in r.values())}


def test_gemma4_fused_expert_stack_gets_a_scale_per_expert_slice(tiny_gemma4_moe, tmp_path):
    out = tmp_path / "g4"
    convert(tiny_gemma4_moe, out, "nvfp4", device="cpu", activations=SETTINGS)
    got = load_dir(out)
    packed = {k.removesuffix(".weight_packed") for k in got if k.endswith(".weight_packed")}
    assert {
        k.removesuffix(".input_global_scale") for k in got if k.endswith("input_global_scale")
    } == packed
    assert any(".experts.0.gate_proj" in m for m in packed)
    for m in (m for m in packed if m.endswith("gate_proj")):
        assert torch.equal(
            got[f"{m}.input_global_scale"],
            got[f"{m[: -len('gate_proj')]}up_proj.input_global_scale"],
        )
