"""The release gate: `nvq check` ties a certificate to the exact files it certifies, `nvq diff`
names per layer what changed between two certificates, and `nvq verify --policy` applies the
rules a repository keeps. All on real certificates of a tiny Llama against llama.cpp's GGUF."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nvq import __version__
from nvq.cli import app
from nvq.verify.certificate import SELF_HASH, content_hash
from nvq.verify.policy import load_policy
from tests.support.png import read_png

pytestmark = pytest.mark.llamacpp
runner = CliRunner()


@pytest.fixture(scope="module")
def certified(llama_f32, tiny_gguf, quantized, tmp_path_factory):
    """(candidate copy, oracle, certificate path) of a passing NVFP4 verification."""
    root = tmp_path_factory.mktemp("cert")
    cand = root / "cand"
    shutil.copytree(quantized(llama_f32, "nvfp4"), cand)
    oracle = tiny_gguf(llama_f32)
    cert = root / "cert.json"
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(oracle), "--json", str(cert), "--tokens", "32"])
    assert result.exit_code == 0, result.output
    return cand, oracle, cert


def test_a_certificate_carries_its_own_content_hash(certified):
    cert = json.loads(certified[2].read_text())
    assert cert[SELF_HASH] == content_hash(cert)


def test_check_passes_on_the_certified_files(certified):
    cand, oracle, cert = certified
    result = runner.invoke(app, ["check", str(cert), str(cand), "--oracle", str(oracle)])
    assert result.exit_code == 0, result.output
    assert "ok:" in result.output and "and the oracle" in result.output


def test_check_names_a_changed_an_added_and_a_missing_file(certified, tmp_path):
    cand, oracle, cert = certified
    copy = tmp_path / "cand"
    shutil.copytree(cand, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("weight_global_scale"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    (copy / "extra.txt").write_text("x")
    (copy / "tokenizer.json").unlink()
    result = runner.invoke(app, ["check", str(cert), str(copy)])
    assert result.exit_code == 1
    out = result.output
    assert f"{shard}: sha256" in out and "differs from the certified" in out
    assert "extra.txt: not in the certificate" in out
    assert "tokenizer.json: certified but missing" in out


def test_check_detects_an_edited_certificate_and_another_oracle(certified, tmp_path, llama_f32, tiny_gguf):
    cand, _, cert = certified
    edited = json.loads(cert.read_text())
    edited["verdict"] = "pass" if edited["verdict"] == "fail" else "fail"
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    other = tiny_gguf(llama_f32, "f16")
    result = runner.invoke(app, ["check", str(path), str(cand), "--oracle", str(other)])
    assert result.exit_code == 1
    assert "edited after nvq wrote it" in result.output
    assert f"{other}: sha256" in result.output and "is not the certified oracle's" in result.output


def test_check_names_another_nvq_version(certified, tmp_path):
    cand, _, cert = certified
    old = json.loads(cert.read_text())
    old["nvq_version"] = "0.0.1"
    old[SELF_HASH] = content_hash(old)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    result = runner.invoke(app, ["check", str(path), str(cand)])
    assert result.exit_code == 1 and f"made by nvq 0.0.1, this is nvq {__version__}" in result.output


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"a": 1}', b"\xff\xfe"])
def test_check_refuses_what_is_not_a_certificate_with_exit_2(certified, tmp_path, content):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    result = runner.invoke(app, ["check", str(path), str(certified[0])])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output


def test_diff_of_a_certificate_with_itself_is_quiet(certified):
    result = runner.invoke(app, ["diff", str(certified[2]), str(certified[2]), "--max-ratio", "1.01"])
    assert result.exit_code == 0, result.output
    assert "no regression" in result.output


def test_diff_names_the_layer_that_got_worse(certified, llama_f32, tiny_gguf, tmp_path):
    """Release B damages layer 1's down_proj: diff marks that layer's weight (and taps) as
    regressed, and B's failing verdict, while layer 0 is unchanged."""
    cand, oracle, cert_a = certified
    worse = tmp_path / "worse"
    shutil.copytree(cand, worse)
    shard = sorted(worse.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight_packed"
    g = torch.Generator().manual_seed(1)
    tensors[name] = torch.randint(0, 256, tensors[name].shape, generator=g, dtype=torch.uint8)
    save_file(tensors, shard, metadata={"format": "pt"})
    cert_b = tmp_path / "b.json"
    runner.invoke(app, ["verify", str(worse), "--oracle", str(oracle), "--json", str(cert_b), "--tokens", "32"])
    result = runner.invoke(app, ["diff", str(cert_a), str(cert_b), "--max-ratio", "2", "--json"])
    assert result.exit_code == 1, result.output
    d = json.loads(result.output)
    regressed = {(c["what"], c["layer"]) for c in d["changes"] if c["regressed"]}
    assert ("weight", 1) in regressed and ("verdict", None) in regressed
    assert ("weight", 0) not in regressed
    assert d["changed_files"] == [shard.name] and d["setup"] == []
    text = runner.invoke(app, ["diff", str(cert_a), str(cert_b), "--max-ratio", "2"]).output
    assert "! weight       1  blk.1.ffn_down.weight" in text, text


def verify_with_policy(certified, tmp_path, policy_text, *extra):
    cand, oracle, _ = certified
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    out = {k: tmp_path / f"cert.{k}" for k in ("json", "md", "xml")}
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(oracle), "--policy", str(policy),
                                 "--json", str(out["json"]), "--markdown", str(out["md"]), "--junit", str(out["xml"]),
                                 *extra])
    return result, out


def test_a_policy_that_is_met_passes_and_is_recorded_with_its_thresholds(certified, tmp_path):
    result, out = verify_with_policy(certified, tmp_path, "thresholds:\n  kld_factor: 3\nrequire:\n"
                                     "  level: within band\n  min_tokens: 16\n", "--tokens", "32")
    assert result.exit_code == 0, result.output
    cert = json.loads(out["json"].read_text())
    assert cert["policy"]["ok"] and cert["policy"]["problems"] == []
    assert cert["thresholds"]["kld_factor"] == 3.0 and cert["policy"]["sha256"]
    assert cert[SELF_HASH] == content_hash(cert)
    assert "policy: " in out["md"].read_text() and "met" in out["md"].read_text()


def test_unmet_requirements_fail_the_verdict_and_are_named(certified, tmp_path):
    result, out = verify_with_policy(certified, tmp_path, "require:\n  min_tokens: 1000\n  serve_as: vllm\n"
                                     "  exact_oracle: true\n", "--tokens", "32")
    assert result.exit_code == 1, result.output
    cert = json.loads(out["json"].read_text())
    assert cert["verdict"] == "fail" and cert["level"] != "fail"  # the measurement itself passed
    problems = " ".join(cert["policy"]["problems"])
    assert "at least 1000 tokens; 32 were compared" in problems and "requires --serve-as vllm" in problems
    assert "exact oracle" not in problems  # the F32 GGUF is exact
    assert out["xml"].read_text().count('classname="nvq.verify.policy"') == 2


def test_a_required_level_above_the_certified_one_is_a_problem(tmp_path):
    """Level rule on its own: a nearby NVFP4 candidate against a lossy oracle certifies 'within
    band', which a policy asking for 'bit-exact' refuses (a passing run at 'bit-exact' is met)."""
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("require:\n  level: bit-exact\n")
    rules = load_policy(policy_file, ("checkpoint",))
    cert = {"verdict": "pass", "level": "within band", "served_as": {"name": "checkpoint"},
            "inputs": {"tokens": {"count": 64}, "oracle": {"exact": False, "path": "o.gguf", "storage": "Q8_0"}}}
    assert rules.problems(cert) == ["the policy requires level 'bit-exact'; the candidate is certified 'within band'."]
    assert rules.problems({**cert, "level": "bit-exact"}) == []


@pytest.mark.parametrize("text, message", [
    ("require:\n  level: perfect\n", "require.level must be one of"),
    ("thresholds:\n  kld_factor: 0.5\n", "threshold kld_factor must be"),
    ("thresholds:\n  speed: 2\n", "unknown threshold"),
    ("require:\n  min_tokens: many\n", "require.min_tokens"),
    ("oracle: x.gguf\n", "nothing else"),
    ("a: &x [1]\nb: *x\n", "alias"),
])
def test_a_bad_policy_is_bad_input(certified, tmp_path, text, message):
    result, out = verify_with_policy(certified, tmp_path, text)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out["json"].exists()


def test_factor_cannot_override_a_policy(certified, tmp_path):
    result, _ = verify_with_policy(certified, tmp_path, "thresholds:\n  kld_factor: 2\n", "--factor", "4")
    assert result.exit_code == 2 and "the gate's rule" in result.output


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--window-size=1100,1500"]


def test_the_html_report_is_self_contained_and_renders_its_plot_in_chromium(certified, tmp_path):
    cand, oracle, _ = certified
    page = tmp_path / "report.html"
    result = runner.invoke(app, ["verify", str(cand), "--oracle", str(oracle), "--html", str(page), "--tokens", "32"])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "<svg" in text and "<polyline" in text and "PASS" in text
    assert "<script" not in text and " src=" not in text and " href=" not in text  # nothing to fetch
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed (Debian package chromium; .ci/run installs it)"
    shot = tmp_path / "shot.png"
    run = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    width, height, n, pixels = read_png(shot.read_bytes())
    blue = sum(1 for i in range(0, len(pixels), n)
               if abs(pixels[i] - 0x1F) < 24 and abs(pixels[i + 1] - 0x77) < 24 and abs(pixels[i + 2] - 0xB4) < 24)
    assert blue > 200, f"the taps' line is not drawn ({blue} pixels of its colour in {width}×{height})"
    dark = sum(1 for i in range(0, len(pixels), n) if pixels[i] + pixels[i + 1] + pixels[i + 2] < 200)
    assert dark > 2000, "the page's text did not render"
