"""Release policy: the gate's rules in a YAML file checked into the repository, read by
`nvq verify --policy FILE`. It sets the thresholds and what a passing certificate must also show:

    thresholds:            # any of Thresholds' fields (nvq/verify/diff.py)
      kld_factor: 1.5
    require:
      level: within band   # or bit-exact
      min_tokens: 256      # tokens compared, over all sequences
      serve_as: vllm       # the engine arithmetic the certificate must describe
      exact_oracle: false  # true: refuse certificates made against a lossy GGUF

A requirement not met makes the verdict fail (exit 1) and is named in the certificate; a policy
file that cannot be read is bad input (exit 2). The certificate records the policy's sha256.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from nvq import limits
from nvq.errors import ConfigError
from nvq.quant.recipe import safe_yaml
from nvq.verify.diff import Thresholds

MAX_POLICY_BYTES = 64 << 10
MAX_MIN_TOKENS = 1 << 20
LEVELS = ("within band", "bit-exact")  # weakest first
# requirement -> (type it must have, what it means)
REQUIREMENTS = {
    "level": (str, "the certificate level at least"),
    "min_tokens": (int, "tokens compared at least"),
    "serve_as": (str, "the serving arithmetic verified"),
    "exact_oracle": (bool, "an exact (F32/F16/BF16) oracle"),
}


@dataclass(frozen=True)
class Policy:
    path: Path
    sha256: str
    thresholds: dict[str, float] = field(default_factory=dict)
    require: dict[str, object] = field(default_factory=dict)

    def apply(self, th: Thresholds) -> Thresholds:
        return replace(th, **self.thresholds)

    def problems(self, cert: dict) -> list[str]:
        """Each requirement the certificate does not meet, one sentence each."""
        out = []
        req = self.require
        if "level" in req and cert["verdict"] == "pass" and LEVELS.index(cert["level"]) < LEVELS.index(req["level"]):
            out.append(f"the policy requires level {req['level']!r}; the candidate is certified {cert['level']!r}.")
        tokens = cert["inputs"]["tokens"]["count"]
        if "min_tokens" in req and tokens < req["min_tokens"]:
            out.append(f"the policy requires at least {req['min_tokens']} tokens; {tokens} were compared.")
        if "serve_as" in req and cert["served_as"]["name"] != req["serve_as"]:
            out.append(f"the policy requires --serve-as {req['serve_as']}; this run used {cert['served_as']['name']}.")
        if req.get("exact_oracle") and not cert["inputs"]["oracle"]["exact"]:
            out.append(f"the policy requires an exact oracle; {cert['inputs']['oracle']['path']} is stored lossy "
                       f"({cert['inputs']['oracle']['storage']}).")
        return out

    def section(self, problems: list[str]) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "thresholds": self.thresholds,
                "require": self.require, "problems": problems, "ok": not problems}


def load_policy(path: str | Path, servings: tuple[str, ...]) -> Policy:
    path = Path(path)
    text = limits.read_text_file(path, "--policy", MAX_POLICY_BYTES)
    data = safe_yaml(text, str(path)) or {}
    if not isinstance(data, dict) or set(data) - {"thresholds", "require"}:
        raise ConfigError(f"{path}: a policy holds a 'thresholds' and/or a 'require' mapping, nothing else.")
    thresholds = data.get("thresholds") or {}
    require = data.get("require") or {}
    if not isinstance(thresholds, dict) or not isinstance(require, dict):
        raise ConfigError(f"{path}: 'thresholds' and 'require' must be mappings.")
    unknown = set(thresholds) - set(Thresholds.keys())
    if unknown:
        raise ConfigError(f"{path}: unknown threshold(s) {sorted(unknown)}; allowed: {', '.join(Thresholds.keys())}.")
    for k, v in thresholds.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf \
                or (k.endswith("_factor") and v < 1):
            raise ConfigError(f"{path}: threshold {k} must be a finite number ≥ 0 (a factor ≥ 1), got {v!r}.")
    unknown = set(require) - set(REQUIREMENTS)
    if unknown:
        raise ConfigError(f"{path}: unknown requirement(s) {sorted(unknown)}; allowed: {', '.join(REQUIREMENTS)}.")
    for k, v in require.items():
        kind, meaning = REQUIREMENTS[k]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ConfigError(f"{path}: require.{k} ({meaning}) must be a {kind.__name__}, got {v!r}.")
    allowed = {"level": LEVELS, "serve_as": servings}
    for k, choices in allowed.items():
        if k in require and require[k] not in choices:
            raise ConfigError(f"{path}: require.{k} must be one of {', '.join(choices)}, got {require[k]!r}.")
    if "min_tokens" in require and not 1 <= require["min_tokens"] <= MAX_MIN_TOKENS:
        raise ConfigError(f"{path}: require.min_tokens must be from 1 to {MAX_MIN_TOKENS}, got {require['min_tokens']}.")
    return Policy(path, hashlib.sha256(text.encode("utf-8")).hexdigest(),
                  {k: float(v) for k, v in thresholds.items()}, dict(require))
