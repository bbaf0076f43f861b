"""Certificate renderers and the all-or-nothing writer, on a synthetic failing certificate."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import pytest

from nvq.errors import ConfigError
from nvq.report import verify_verdict_line
from nvq.verify import certificate

CERT = {
    "nvq_version": "0.1.0",
    "verdict": "fail",
    "level": "fail",
    "first_divergence": {"tap": "ffn_norm-1", "layer": 1, "tensor": "blk.1.ffn_norm.weight", "hint": "norm missing"},
    "logits": {"mean_kld": 0.02, "kld_p99": 0.1, "top1_agreement": 0.9, "rms_dp": 0.01, "expected": {"mean_kld": 0.0},
               "limit_mean_kld": 1e-5, "ok": False},
    "taps": [
        {"name": "ffn_norm-1", "layer": 1, "rel_l2": 0.3, "cosine": 0.95, "max_abs": 2.0, "expected_rel_l2": 0.0,
         "limit": 1e-4, "ok": False},
        {"name": "Vcur-1", "layer": 1, "rel_l2": None, "cosine": 0.0, "max_abs": None, "expected_rel_l2": 0.0,
         "limit": 0.0, "ok": False},
    ],
    "weights": [
        {"name": "blk.1.ffn_norm.weight", "layer": 1, "scheme": "bf16", "rel_l2": 0.3, "expected_rel_l2": 0.0,
         "limit": 1e-6, "ok": False, "hint": "norm missing"},
        {"name": "blk.1.ffn_up.weight", "layer": 1, "scheme": "nvfp4", "rel_l2": 0.1, "expected_rel_l2": 0.1,
         "limit": 0.2, "ok": True},
    ],
    "inputs": {"candidate": {"path": "/c", "format": "dense", "architecture": "llama", "files": {}},
               "oracle": {"path": "/o.gguf", "sha256": "0" * 64, "storage": {"Q8_0": 2},
                          "exact": False, "noise_draws": 2},
               "tokens": {"source": "--tokens 8", "count": 8, "sequences": [8], "sha256": "1" * 64}},
    "thresholds": {"factor": 2.0, "tap_floor": 1e-4, "weight_floor": 1e-6, "kld_floor": 1e-5},
    "mode": "free-running", "device": "cpu", "seconds": 0.5, "candidate_error": None, "notes": ["a note"],
}


def test_json_is_strict_and_round_trips():
    assert json.loads(certificate.to_json(CERT)) == CERT
    with pytest.raises(ValueError):
        certificate.to_json({**CERT, "seconds": float("inf")})  # never written as Infinity


def test_junit_has_one_case_per_tap_and_weight_and_carries_the_messages():
    suite = ET.fromstring(certificate.to_junit(CERT)).find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["ffn_norm-1", "Vcur-1", "blk.1.ffn_norm.weight", "blk.1.ffn_up.weight", "mean_kld"]
    failed = {c.get("name"): c.find("failure").get("message") for c in cases if c.find("failure") is not None}
    assert set(failed) == {"ffn_norm-1", "Vcur-1", "blk.1.ffn_norm.weight", "mean_kld"} and suite.get("failures") == "4"
    assert failed["blk.1.ffn_norm.weight"].endswith(": norm missing")


def test_markdown_and_verdict_line():
    md = certificate.to_markdown(CERT)
    assert md.startswith("# nvq verify: FAIL")
    assert "first divergence: ffn_norm-1, tensor `blk.1.ffn_norm.weight`: norm missing" in md
    assert "| Vcur-1 | — |" in md and "- a note" in md
    line = verify_verdict_line(CERT)
    assert line.startswith("FAIL at ffn_norm-1 (blk.1.ffn_norm.weight): norm missing")
    assert "2 taps and 1 weights out of band" in line


def test_writes_all_files_or_none(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a.json", tmp_path / "b.md", tmp_path / "c.xml"
    certificate.write_atomically({a: "1", b: "2"})
    assert a.read_text() == "1" and b.read_text() == "2"
    real, calls = os.rename, []

    def flaky(src, dst):  # the third file's rename fails, after two were placed
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(certificate.os, "rename", flaky)
    with pytest.raises(ConfigError, match="nothing was written"):
        certificate.write_atomically({a: "new", b: "new", c: "new"})
    assert a.read_text() == "1" and b.read_text() == "2" and not c.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md"]


def test_outputs_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="different files"):
        certificate.check_outputs([tmp_path / "x", tmp_path / "x"])
    with pytest.raises(ConfigError, match="is a directory"):
        certificate.check_outputs([tmp_path])
