"""transformers + optimum + gptqmodel on CPU as a client, from the test process: its venv
(scripts/gptqmodel-env.sh, created once and cached) and a batch of GPTQ checkpoints loaded and run
by tests/support/gptqmodel_runner.py inside it, in one subprocess (imports cost ~15 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_SCRIPT = ROOT / "scripts" / "gptqmodel-env.sh"
RUNNER = Path(__file__).with_name("gptqmodel_runner.py")
RESULT_PREFIX = "NVQ-GPTQMODEL-RESULT "
_ENV_TIMEOUT_S = 1800  # a cold install downloads and installs ~6 GB (torch's CUDA build)
_RUN_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Request:
    checkpoint: Path
    prompts: list[list[int]]


@dataclass
class Generated:
    tokens: list[int]
    logprobs: list[float]
    top: list[dict[str, float]]


@dataclass
class Loaded:
    """What transformers + gptqmodel made of one checkpoint (see gptqmodel_runner.py)."""

    checkpoint: str
    ok: bool
    error: str | None
    warnings: list[str] = field(default_factory=list)
    loading: dict[str, list[str]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    kernels: dict[str, int] = field(default_factory=dict)
    dense_linears: list[str] = field(default_factory=list)
    dtype: str = ""
    results: list[Generated] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self):
        self.results = [r if isinstance(r, Generated) else Generated(**r) for r in self.results]


def gptqmodel_python() -> Path:
    """The gptqmodel venv's python, creating the venv on first use. RuntimeError if it cannot be made."""
    try:
        proc = subprocess.run(["bash", str(ENV_SCRIPT)], capture_output=True, text=True,
                              timeout=_ENV_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{ENV_SCRIPT.name} timed out after {e.timeout} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{ENV_SCRIPT.name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]) / "bin" / "python"


def generate(python: Path, requests: list[Request], max_new_tokens: int, dtype: str,
             top: int = 2) -> list[Loaded]:
    """Load each checkpoint and generate greedily from each of its prompts, in one subprocess;
    results in request order. A checkpoint the subprocess never reported gets ok=False."""
    with tempfile.TemporaryDirectory(prefix="gptqmodel-request-") as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps({
            "requests": [{"checkpoint": str(r.checkpoint), "prompts": r.prompts} for r in requests],
            "max_new_tokens": max_new_tokens, "dtype": dtype, "top": top,
        }))
        # -I and cwd: neither this repository (its kernels/ package) nor the test venv leaks in
        env = {**os.environ, "PYTHONPATH": ""}
        proc = subprocess.run([str(python), "-I", str(RUNNER), str(path)], capture_output=True,
                              text=True, timeout=_RUN_TIMEOUT_S, env=env, cwd=tmp)
    got = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            loaded = Loaded(**json.loads(line[len(RESULT_PREFIX):]))
            got[loaded.checkpoint] = loaded
    tail = (proc.stdout + proc.stderr)[-3000:]
    return [got.get(str(r.checkpoint)) or Loaded(str(r.checkpoint), False,
                                                  f"gptqmodel runner exited {proc.returncode} "
                                                  f"before this checkpoint:\n{tail}")
            for r in requests]
