"""The CI kit in examples/ci: the workflows parse and run the gate script, and the script run as
a CI job runs it (convert, verify under the policy, check, diff against a baseline) passes a good
release and fails a damaged one, leaving the artifacts a job uploads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

KIT = Path(__file__).parents[2] / "examples" / "ci"
GATE = KIT / "gate.sh"


def test_the_workflows_parse_and_call_the_gate_script():
    github = yaml.safe_load((KIT / "github-release-gate.yml").read_text())
    steps = github["jobs"]["gate"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert any("examples/ci/gate.sh" in r for r in runs)
    uses = {s.get("uses", "").split("@")[0] for s in steps}
    assert {"actions/cache", "actions/upload-artifact", "mikepenz/action-junit-report"} <= uses
    gitlab = yaml.safe_load((KIT / "gitlab-release-gate.yml").read_text())["release-gate"]
    assert any("examples/ci/gate.sh" in line for line in gitlab["script"])
    assert gitlab["artifacts"]["reports"]["junit"] == "nvq-artifacts/junit.xml"
    for env in (github["jobs"]["gate"]["env"], gitlab["variables"]):  # every variable is one gate.sh reads
        for name in env:
            assert name in GATE.read_text() or name in ("CANDIDATE", "ORACLE", "NVQ_CACHE_DIR"), name


def gate(tmp_path, candidate, oracle, **env) -> subprocess.CompletedProcess:
    nvq = Path(sys.executable).parent / "nvq"
    tmp_path.mkdir(parents=True, exist_ok=True)
    full = {**os.environ, "NVQ": str(nvq), "ARTIFACTS": str(tmp_path / "artifacts"),
            "NVQ_POLICY": str(KIT / "nvq-policy.yaml"), "NVQ_VERIFY_ARGS": "--tokens 128", **env}
    return subprocess.run(["bash", str(GATE), str(candidate), str(oracle)], capture_output=True, text=True,
                          timeout=900, env=full, cwd=tmp_path)


@pytest.mark.llamacpp
def test_the_gate_passes_a_good_release_and_fails_a_damaged_one(llama_f32, tiny_gguf, tmp_path):
    oracle = tiny_gguf(llama_f32)
    good = gate(tmp_path / "a", tmp_path / "release", oracle, NVQ_SOURCE=str(llama_f32))
    assert good.returncode == 0, good.stderr[-3000:]
    art = tmp_path / "a" / "artifacts"
    assert sorted(p.name for p in art.iterdir()) == ["certificate.json", "certificate.md", "convert.json", "junit.xml",
                                                     "report.html"]
    assert "::group::" in good.stderr and "ok: " in good.stdout

    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "release", damaged)
    shard = damaged / "model.safetensors"
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight_packed"
    tensors[name] = torch.randint(0, 256, tensors[name].shape, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.uint8)
    save_file(tensors, shard, metadata={"format": "pt"})
    bad = gate(tmp_path / "b", damaged, oracle, NVQ_BASELINE=str(art / "certificate.json"))
    assert bad.returncode == 1, bad.stderr[-3000:]
    diff = (tmp_path / "b" / "artifacts" / "diff.txt").read_text()
    assert "regressed" in diff and "blk.1.ffn_down.weight" in diff
    assert 'classname="nvq.verify.weights"' in (tmp_path / "b" / "artifacts" / "junit.xml").read_text()


def test_bad_input_is_exit_2_from_the_gate(tmp_path):
    run = gate(tmp_path, tmp_path / "missing", tmp_path / "missing.gguf")
    assert run.returncode == 2, run.stderr[-2000:]
