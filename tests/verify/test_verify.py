"""`nvq verify` end to end against f32 GGUF oracles made by llama.cpp's converter: dense
candidates pass within fp32 noise, nvq's NVFP4/MXFP4 outputs pass within their expected noise,
and the certificate files carry CLI.md's fields."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from nvq.cli import app
from tests.support.checkpoints import as_modelopt_names

pytestmark = pytest.mark.llamacpp
runner = CliRunner()

DENSE = ["llama_f32", "gemma4_moe_f32", "gemma4_ple_f32"]


def nvq_verify(candidate, oracle, *extra, code=None):
    result = runner.invoke(app, ["verify", str(candidate), "--oracle", str(oracle), *map(str, extra)])
    if code is not None:
        assert result.exit_code == code, result.output
    return result


def certify(tmp_path, candidate, oracle, *extra, code=0):
    paths = tmp_path / "cert.json", tmp_path / "cert.md", tmp_path / "cert.xml"
    result = nvq_verify(candidate, oracle, "--json", paths[0], "--markdown", paths[1], "--junit", paths[2], *extra, code=code)
    cert = json.loads(paths[0].read_text())
    check_minimum_fields(cert, candidate, oracle)
    assert (cert["verdict"] == "pass") == (code == 0)
    check_junit(paths[2].read_text(), cert)
    md = paths[1].read_text()
    assert md.startswith(f"# nvq verify: {cert['verdict'].upper()}") and "| l_out-0 |" in md
    return cert, result.output


def check_minimum_fields(cert, candidate, oracle):
    """CLI.md § Certificate, minimum fields."""
    for key in ("nvq_version", "verdict", "first_divergence", "logits", "taps", "weights", "inputs", "thresholds",
                "config", "tokenizer"):
        assert key in cert, key
    assert cert["verdict"] in ("pass", "fail")
    assert set(cert["logits"]) >= {"mean_kld", "kld_p99", "top1_agreement", "rms_dp"}
    assert cert["taps"] and cert["weights"]
    for t in cert["taps"]:
        assert set(t) >= {"name", "layer", "rel_l2", "cosine", "max_abs", "expected_rel_l2", "ok"}
    for w in cert["weights"]:
        assert set(w) >= {"name", "rel_l2", "expected_rel_l2", "ok"}
    files = cert["inputs"]["candidate"]["files"]
    assert cert["inputs"]["candidate"]["path"] == str(candidate)
    assert set(files) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert all(len(h) == 64 for h in files.values())
    assert cert["inputs"]["oracle"]["path"] == str(oracle) and len(cert["inputs"]["oracle"]["sha256"]) == 64
    assert set(cert["thresholds"]) >= {"weight_factor", "tap_factor", "kld_factor", "tap_floor", "weight_floor"}
    names = [t["name"] for t in cert["taps"]]
    assert names.index("l_out-0") < names.index("attn_norm-1") < names.index("result_output")
    if cert["verdict"] == "pass":
        assert cert["first_divergence"] is None
    else:
        # "field" names the config or tokenizer field when a finding is the first divergence
        assert {"tap", "layer", "tensor", "hint"} <= set(cert["first_divergence"]) <= {"tap", "layer", "tensor", "hint", "field"}


def check_junit(text, cert):
    suite = ET.fromstring(text).find("testsuite")
    cases = suite.findall("testcase")
    bad_findings = sum(not d["ok"] for key in ("config", "tokenizer") for d in cert[key])  # one testcase each
    assert len(cases) == len(cert["taps"]) + len(cert["weights"]) + 1 + bad_findings
    failures = [c for c in cases if c.find("failure") is not None]
    assert int(suite.get("failures")) == len(failures)
    assert len(failures) == (sum(not t["ok"] for t in cert["taps"]) + sum(not w["ok"] for w in cert["weights"])
                             + (not cert["logits"]["ok"]) + bad_findings)


@pytest.mark.parametrize("model", DENSE)
def test_dense_fp32_candidate_passes_with_every_tap_within_fp32_noise(model, request, tiny_gguf, tmp_path):
    src = request.getfixturevalue(model)
    cert, out = certify(tmp_path, src, tiny_gguf(src, "f32"))
    worst = max(t["rel_l2"] for t in cert["taps"])
    print(model, f"worst tap rel-L2 {worst:.1e}, mean KLD {cert['logits']['mean_kld']:.1e}")
    assert worst <= 1e-4
    assert cert["logits"]["mean_kld"] <= 1e-9 and cert["logits"]["top1_agreement"] == 1.0
    assert all(w["ok"] and w["rel_l2"] <= 1e-6 for w in cert["weights"])
    assert cert["inputs"]["tokens"]["count"] == 128 and "PASS" in out


def test_bf16_candidate_against_the_f32_gguf_of_it_passes(tiny_llama, tiny_gguf, tmp_path):
    cert, _ = certify(tmp_path, tiny_llama, tiny_gguf(tiny_llama, "f32"), "--tokens", "40")
    assert {w["scheme"] for w in cert["weights"]} == {"bf16"}
    assert cert["inputs"]["tokens"] == {**cert["inputs"]["tokens"], "source": "--tokens 40", "count": 40}


@pytest.mark.parametrize(
    "model, scheme",
    [("llama_f32", "nvfp4"), ("llama_f32", "mxfp4"), ("gemma4_moe_f32", "nvfp4"), ("gemma4_ple_f32", "nvfp4")],
)
def test_nvq_quantized_output_passes_within_its_expected_noise(model, scheme, request, tiny_gguf, quantized, tmp_path):
    src = request.getfixturevalue(model)
    cert, _ = certify(tmp_path, quantized(src, scheme), tiny_gguf(src, "f32"))
    lg, taps = cert["logits"], {t["name"]: t for t in cert["taps"]}
    last = max(t["layer"] for t in cert["taps"] if t["layer"] is not None)
    print(model, scheme, {n: f"{taps[n]['rel_l2']:.3f} (exp {taps[n]['expected_rel_l2']:.3f})" for n in ("l_out-0", f"l_out-{last}", "result_output")},
          f"KLD {lg['mean_kld']:.2e} (exp {lg['expected']['mean_kld']:.2e}) top-1 {lg['top1_agreement']:.3f} RMS dp {lg['rms_dp']:.2e}")
    quantized_weights = [w for w in cert["weights"] if w["scheme"] == scheme]
    assert quantized_weights and all(w["expected_rel_l2"] > 0.01 for w in quantized_weights)
    assert all(t["rel_l2"] <= 2 * t["expected_rel_l2"] + 1e-4 for t in cert["taps"])
    assert 0 < lg["mean_kld"] <= 4 * lg["expected"]["mean_kld"] + 1e-5


def test_teacher_forced_mode_passes_and_shrinks_the_late_errors(llama_f32, tiny_gguf, quantized, tmp_path):
    oracle, cand = tiny_gguf(llama_f32, "f32"), quantized(llama_f32, "nvfp4")
    free, _ = certify(tmp_path, cand, oracle)
    forced, _ = certify(tmp_path, cand, oracle, "--teacher-forced")
    assert forced["mode"] == "teacher-forced" and free["mode"] == "free-running"
    f, t = ({x["name"]: x["rel_l2"] for x in c["taps"]} for c in (free, forced))
    assert t["attn_norm-1"] < f["attn_norm-1"] and t["attn_norm-0"] == f["attn_norm-0"]
    assert forced["logits"] == free["logits"]  # logit statistics are always free-running


def test_modelopt_nvfp4_candidate_passes(gemma4_moe_f32, tiny_gguf, quantized, tmp_path):
    cand = as_modelopt_names(quantized(gemma4_moe_f32, "nvfp4"), tmp_path / "modelopt")
    cert, _ = certify(tmp_path, cand, tiny_gguf(gemma4_moe_f32, "f32"))
    assert cert["inputs"]["candidate"]["format"] == "modelopt nvfp4"
    assert "nvfp4-modelopt" in {w["scheme"] for w in cert["weights"]}


def test_recipe_and_factor_set_the_thresholds(llama_f32, tiny_gguf, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules: []\nverify:\n  tap_factor: 3\n  tap_floor: 0.001\n")
    cert, _ = certify(tmp_path, llama_f32, tiny_gguf(llama_f32, "f32"), "--recipe", recipe)
    assert cert["thresholds"] == {"weight_factor": 1.25, "tap_factor": 3.0, "kld_factor": 2.0, "z": 3.0,
                                  "tap_floor": 0.001, "weight_floor": 1e-6, "kld_floor": 1e-5}
    cert, _ = certify(tmp_path, llama_f32, tiny_gguf(llama_f32, "f32"), "--recipe", recipe, "--factor", "1.5")
    assert cert["thresholds"]["tap_factor"] == 1.5 and cert["thresholds"]["weight_factor"] == 1.5
    assert cert["taps"][-1]["limit"] == pytest.approx(0.001)


def test_fp64_reference_forwards_agree_to_fp64_noise(llama_f32, tiny_gguf, tmp_path):
    # the f32 GGUF holds the candidate's own values, so candidate and oracle agree exactly
    cert, _ = certify(tmp_path, llama_f32, tiny_gguf(llama_f32, "f32"), "--fp64", "--tokens", "24")
    assert cert["precision"] == "fp64"
    assert max(t["rel_l2"] for t in cert["taps"]) <= 1e-12


def test_fp64_precision_runs_the_forwards_in_float64(llama_f32):
    import torch

    from nvq.models.load import load_hf
    from nvq.verify.run import PRECISIONS
    from nvq.verify.taps import run_forward

    arch, tensors = load_hf(llama_f32)
    run = run_forward(arch, tensors, [torch.arange(8)], dtype=PRECISIONS["fp64"])
    assert run.taps["l_out-0"].dtype == torch.float64
