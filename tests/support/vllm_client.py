"""vLLM's CPU build as a client, from the test process: its venv (scripts/vllm-env.sh, created once
and cached) and a batch of checkpoints served by tests/support/vllm_runner.py inside it.

The runner is one subprocess per batch: vLLM's import and first engine cost ~15 s, each further
checkpoint ~3-7 s (tiny models, enforce_eager).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_SCRIPT = ROOT / "scripts" / "vllm-env.sh"
RUNNER = Path(__file__).with_name("vllm_runner.py")
RESULT_PREFIX = "NVQ-VLLM-RESULT "
_ENV_TIMEOUT_S = 1200  # a cold install downloads ~1 GB and installs 3.5 GB
_SERVE_TIMEOUT_S = 1200

# vLLM log lines that say a checkpoint tensor was not read as written: loader checks, dtype casts
# (utils.py "Attempted to load weight ... with dtype"), fused scales that disagree.
WEIGHT_WARNINGS = re.compile(
    r"Attempted to load weight|not initialized from checkpoint|unexpected|missing|"
    r"Unable to collect loaded parameters|global scale is different|must match",
    re.IGNORECASE,
)
SCALES_IN_MODEL_DTYPE = re.compile(r"\.scales with dtype torch\.float16 into parameter with dtype torch\.bfloat16")


@dataclass(frozen=True)
class Request:
    checkpoint: Path
    prompt: list[int]


@dataclass
class Served:
    """What vLLM made of one checkpoint (see vllm_runner.py for the fields)."""

    checkpoint: str
    ok: bool
    error: str | None
    warnings: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def weight_warnings(self) -> list[str]:
        return [w for w in self.warnings if WEIGHT_WARNINGS.search(w)]

    @property
    def unexpected_weight_warnings(self) -> list[str]:
        """Weight warnings but vLLM's cast of GPTQ's fp16 scales to the bf16 model dtype (issue 12
        item 6: documented, noted by convert, modelled by `nvq verify --serve-as vllm`)."""
        return [w for w in self.weight_warnings if not SCALES_IN_MODEL_DTYPE.search(w)]

    @property
    def error_line(self) -> str:
        """The exception's type and message on one line (from the traceback's last unindented
        line on), or ''."""
        lines = (self.error or "").strip().splitlines()
        start = max((i for i, line in enumerate(lines) if line[:1].strip()), default=0)
        return " ".join(line.strip() for line in lines[start:])


def vllm_python() -> Path:
    """The vLLM venv's python, creating the venv on first use. RuntimeError if it cannot be made."""
    try:
        proc = subprocess.run(["bash", str(ENV_SCRIPT)], capture_output=True, text=True,
                              timeout=_ENV_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{ENV_SCRIPT.name} timed out after {e.timeout} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{ENV_SCRIPT.name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]) / "bin" / "python"


def serve(python: Path, requests: list[Request], max_tokens: int, logprobs: int) -> list[Served]:
    """Serve each checkpoint in one vLLM subprocess; results in request order. A checkpoint the
    subprocess never reported (it died) gets ok=False with the process's output tail."""
    with tempfile.TemporaryDirectory(prefix="vllm-request-") as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps({
            "requests": [{"checkpoint": str(r.checkpoint), "prompt": r.prompt} for r in requests],
            "max_tokens": max_tokens,
            "logprobs": logprobs,
        }))
        env = {**os.environ, "PYTHONPATH": ""}  # nothing of the test venv leaks into vLLM's
        proc = subprocess.run([str(python), str(RUNNER), str(path)], capture_output=True,
                              text=True, timeout=_SERVE_TIMEOUT_S, env=env)
    got = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            s = Served(**json.loads(line[len(RESULT_PREFIX):]))
            got[s.checkpoint] = s
    tail = (proc.stdout + proc.stderr)[-3000:]
    return [got.get(str(r.checkpoint)) or Served(str(r.checkpoint), False,
                                                  f"vLLM runner exited {proc.returncode} "
                                                  f"before this checkpoint:\n{tail}")
            for r in requests]
