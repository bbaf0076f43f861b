"""nvq's W4A4 NVFP4 output against llm-compressor 0.14's `NVFP4` preset on the same tiny Llama and
the same calibration token windows (llm-compressor in its own venv, scripts/llmcompressor-env.sh).

Equal: the tensor set, dtypes and shapes; every weight byte (packed codes, block scales, global
scales); the quantization_config as compressed-tensors 0.20 parses it, except `version` and the
weights' `observer` (calibration provenance that llm-compressor records and loaders ignore).
Close: input_global_scale, within INPUT_SCALE_RTOL. llm-compressor runs the model's bf16 forward
(bf16 matmul outputs, bf16 intermediates) while nvq runs fp32 and rounds only A_x to bf16: the
absmax of a bf16 activation is within a few bf16 steps (2^-8 relative each) of the fp32 one, and g_x
is bf16-rounded twice more, so the two may differ by up to ~4 bf16 steps; measured: ≤ 0.78 %.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nvq.quant import calib
from nvq.quant.act_scales import ActivationSettings
from nvq.quant.pipeline import convert

pytestmark = [pytest.mark.llmcompressor, pytest.mark.slow]

INPUT_SCALE_RTOL = 2**-6  # 1.6 %: four bf16 steps
SAMPLES, SEQ_LEN = 4, 64


@pytest.fixture(scope="module")
def llmc_python():
    from tests.support.llmcompressor_client import llmcompressor_python

    try:
        return llmcompressor_python()
    except RuntimeError as e:
        pytest.skip(
            f"the llm-compressor venv (scripts/llmcompressor-env.sh) could not be created: {e}"
        )


@pytest.fixture(scope="module")
def both(tiny_llama, llmc_python, tmp_path_factory):
    from tests.support.llmcompressor_client import quantize_nvfp4_w4a4

    base = tmp_path_factory.mktemp("w4a4-vs-llmc")
    seqs = calib.calibration_set(tiny_llama, 512, SAMPLES, SEQ_LEN).sequences
    peer = quantize_nvfp4_w4a4(llmc_python, tiny_llama, seqs, base / "llmc")
    ours = base / "nvq"
    convert(
        tiny_llama,
        ours,
        "nvfp4",
        device="cpu",
        activations=ActivationSettings(samples=SAMPLES, seq_len=SEQ_LEN),
    )
    return ours, peer


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def test_tensor_set_dtypes_shapes_and_weight_bytes_equal_llmcompressor(both):
    ours, peer = (load_file(d / "model.safetensors") for d in both)
    assert set(ours) == set(peer)
    assert any(k.endswith("input_global_scale") for k in ours)
    for k, t in ours.items():
        assert (t.dtype, t.shape) == (peer[k].dtype, peer[k].shape), k
        if not k.endswith("input_global_scale"):
            assert torch.equal(_raw(t), _raw(peer[k])), k


def test_input_global_scales_agree_with_llmcompressor(both):
    ours, peer = (load_file(d / "model.safetensors") for d in both)
    rel = {
        k: abs(float(t) / float(peer[k]) - 1)
        for k, t in ours.items()
        if k.endswith("input_global_scale")
    }
    worst = max(rel, key=rel.get)
    assert rel[worst] <= INPUT_SCALE_RTOL, (worst, float(ours[worst]), float(peer[worst]))
    # q/k/v and gate/up read one input: equal within each tool, so sharing matches too
    for layer in range(2):
        p = f"model.layers.{layer}"
        for tensors in (ours, peer):
            assert (
                len({float(tensors[f"{p}.self_attn.{m}_proj.input_global_scale"]) for m in "qkv"})
                == 1
            )


def test_quantization_config_equals_llmcompressor(both):
    from compressed_tensors.quantization import QuantizationConfig

    def parsed(d):
        qc = json.loads((d / "config.json").read_text())["quantization_config"]
        dump = QuantizationConfig.model_validate(qc).model_dump()
        dump.pop("version", None)
        for group in dump["config_groups"].values():
            group["weights"].pop("observer", None)
            group["weights"].pop("observer_kwargs", None)
        return dump

    ours, peer = both
    assert parsed(ours) == parsed(peer)


@pytest.mark.llamacpp
def test_verify_runs_llmcompressors_w4a4_output_with_its_input_scales(both, tiny_llama, tiny_gguf):
    from nvq.verify.run import verify

    ours, peer = both
    oracle = tiny_gguf(tiny_llama, "f32")
    got = {name: verify(d, oracle, n_tokens=32) for name, d in (("nvq", ours), ("llmc", peer))}
    assert all(r.verdict == "pass" and "NVFP4 W4A4" in r.serving.what for r in got.values())
    # the same weights and scales within INPUT_SCALE_RTOL: logits within the same order
    kld = {name: r.logits["mean_kld"] for name, r in got.items()}
    assert 0.5 < kld["nvq"] / kld["llmc"] < 2, kld


def test_moe_experts_layout_and_weight_bytes_equal_llmcompressor(tmp_path, llmc_python):
    """Qwen3-MoE: per-expert modules, tensor set and weight bytes equal. Input scales are not
    compared: llm-compressor feeds every expert all tokens (moe_calibrate_all_experts), nvq the
    routed ones, and on this model llm-compressor 0.14 with transformers 5.17 calibrates under
    non-causal attention (docs/llmcompressor-input-global-scale.md)."""
    from tests.support.llmcompressor_client import quantize_nvfp4_w4a4
    from tests.support.tiny_models import build_tiny_qwen3_moe

    src = build_tiny_qwen3_moe(tmp_path / "src")
    seqs = calib.calibration_set(src, 512, SAMPLES, SEQ_LEN).sequences
    peer = load_file(
        quantize_nvfp4_w4a4(llmc_python, src, seqs, tmp_path / "llmc") / "model.safetensors"
    )
    convert(
        src,
        tmp_path / "nvq",
        "nvfp4",
        device="cpu",
        activations=ActivationSettings(samples=SAMPLES, seq_len=SEQ_LEN),
    )
    ours = load_file(tmp_path / "nvq" / "model.safetensors")
    assert set(ours) == set(peer)
    assert "model.layers.0.mlp.experts.3.down_proj.input_global_scale" in ours
    for k, t in ours.items():
        assert (t.dtype, t.shape) == (peer[k].dtype, peer[k].shape), k
        if not k.endswith("input_global_scale"):
            assert torch.equal(_raw(t), _raw(peer[k])), k
