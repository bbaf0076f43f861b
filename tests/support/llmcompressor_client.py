"""llm-compressor as a peer, from the test process: its venv (scripts/llmcompressor-env.sh,
created once and cached) and tests/support/llmcompressor_runner.py run inside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
ENV_SCRIPT = ROOT / "scripts" / "llmcompressor-env.sh"
RUNNER = Path(__file__).with_name("llmcompressor_runner.py")
_ENV_TIMEOUT_S = (
    1800  # a cold install downloads torch's CPU wheel and llm-compressor's dependencies
)
_RUN_TIMEOUT_S = 1200


def llmcompressor_python() -> Path:
    """The llm-compressor venv's python, creating the venv on first use. RuntimeError if it cannot be made."""
    try:
        proc = subprocess.run(
            ["bash", str(ENV_SCRIPT)], capture_output=True, text=True, timeout=_ENV_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{ENV_SCRIPT.name} timed out after {e.timeout} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{ENV_SCRIPT.name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]) / "bin" / "python"


def quantize_nvfp4_w4a4(
    python: Path, model_dir: Path, sequences: list[torch.Tensor], out: Path
) -> Path:
    """llm-compressor's `NVFP4` preset output of model_dir calibrated on `sequences`, saved at out.
    RuntimeError with the runner's output tail if it fails."""
    with tempfile.TemporaryDirectory(prefix="llmc-request-") as tmp:
        calib = Path(tmp) / "calib.json"
        calib.write_text(json.dumps({"sequences": [s.tolist() for s in sequences]}))
        # -I and cwd: neither this repository nor the test venv leaks in
        env = {**os.environ, "PYTHONPATH": ""}
        proc = subprocess.run(
            [str(python), "-I", str(RUNNER), str(model_dir), str(calib), str(out)],
            capture_output=True,
            text=True,
            timeout=_RUN_TIMEOUT_S,
            env=env,
            cwd=tmp,
        )
    if proc.returncode != 0 or "NVQ-LLMC-DONE" not in proc.stdout:
        raise RuntimeError(
            f"llmcompressor_runner exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return out
