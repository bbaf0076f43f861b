"""The command line: bad input gives exit 2, one sentence, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nvq.cli import app

runner = CliRunner()


def corrupt_truncate(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def corrupt_lying_header(d):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = "model.layers.0.mlp.up_proj.weight"
    header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] * 2]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data[8 + n :]))


def corrupt_missing_config(d):
    (d / "config.json").unlink()


def corrupt_malformed_config(d):
    (d / "config.json").write_text('{"model_type": "llama", ')


def corrupt_unknown_arch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba9"
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensor(d, name, fn):
    tensors = load_file(d / "model.safetensors")
    tensors[name] = fn(tensors[name])
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def corrupt_nan(d):
    def poison(t):
        t = t.clone()
        t[1, 2] = float("inf")
        return t

    _edit_tensor(d, "model.layers.0.self_attn.o_proj.weight", poison)


def corrupt_odd_k(d):
    from tests.support.checkpoints import with_mlp_width

    with_mlp_width(d, 100)  # down_proj's input dimension 100 is no multiple of 16


CASES = {
    "truncated safetensors": (corrupt_truncate, "truncated"),
    "header lies about sizes": (corrupt_lying_header, "model.layers.0.mlp.up_proj.weight"),
    "missing config": (corrupt_missing_config, "config.json"),
    "malformed config": (corrupt_malformed_config, "config.json"),
    "unknown architecture": (corrupt_unknown_arch, "mamba9"),
    "NaN/Inf in a weight": (corrupt_nan, "model.layers.0.self_attn.o_proj.weight holds Inf at row 1, column 2"),
    "K not a multiple of the group": (corrupt_odd_k, "input dimension 100"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_sentence_and_writes_nothing(case, tiny_llama, tmp_path):
    corrupt, expected = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    corrupt(src)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(src), str(out), "--scheme", "nvfp4", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_usage_errors_exit_2(tiny_llama, tmp_path):
    result = runner.invoke(app, ["convert", str(tiny_llama), str(tmp_path / "o"), "--scheme", "int3"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--scheme", "nvfp4"])
    assert result.exit_code == 2 and "error:" in result.stderr


def test_existing_output_needs_force(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(app, ["convert", str(tiny_llama), str(out), "--scheme", "nvfp4", "--device", "cpu"])
    assert result.exit_code == 2 and "--force" in result.stderr
    result = runner.invoke(app, ["convert", str(tiny_llama), str(out), "--scheme", "nvfp4", "--device", "cpu", "--force"])
    assert result.exit_code == 0, result.output
    assert "14 weights quantized" in result.stdout


def test_convert_json_summary_and_plan_and_inspect(tiny_gemma4_moe, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(tiny_gemma4_moe), str(out), "--scheme", "mxfp4", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["scheme"] == "mxfp4" and summary["quantized"] > 0
    result = runner.invoke(app, ["plan", str(tiny_gemma4_moe), "--scheme", "nvfp4", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    actions = {t["canonical"]: t["action"] for t in plan["tensors"]}
    assert actions["blk.0.ffn_gate_inp.weight"] == "keep"
    assert actions["blk.0.ffn_gate_exps.weight[3]"] == "nvfp4"
    result = runner.invoke(app, ["plan", str(tiny_gemma4_moe), "--scheme", "nvfp4"])
    assert result.exit_code == 0 and "6 router keep" in result.stdout
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["quantization"] == "compressed-tensors mxfp4-pack-quantized"


def test_real_entry_point_reports_errors_without_traceback(tmp_path):
    (tmp_path / "m").mkdir()
    proc = subprocess.run([sys.executable, "-m", "nvq", "plan", str(tmp_path / "m"), "--scheme", "nvfp4"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
