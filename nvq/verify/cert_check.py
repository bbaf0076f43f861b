"""`nvq check`: does a certificate belong to these exact files and this nvq?

A certificate carries the sha256 of every candidate file, of the oracle, and of itself (its
canonical JSON without that field), so a gate can refuse a release whose files, oracle or
certificate changed after verification: every mismatch is named, one line each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nvq import __version__
from nvq.errors import ConfigError
from nvq.verify.certificate import SELF_HASH, content_hash, file_hashes, sha256_file

MAX_CERTIFICATE_BYTES = 64 << 20  # a 100-layer MoE certificate is a few MB


def load_certificate(path: Path) -> dict:
    """A certificate JSON, or ConfigError (exit 2) naming why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file; nvq check takes the certificate JSON that nvq verify --json wrote.")
    if path.stat().st_size > MAX_CERTIFICATE_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size} bytes, more than any certificate; is it the right file?")
    try:
        cert = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not JSON ({e}); nvq check takes a certificate from nvq verify --json.") from None
    needed = ("nvq_version", "verdict", "inputs")
    if not isinstance(cert, dict) or any(k not in cert for k in needed):
        raise ConfigError(f"{path} is JSON but not an nvq certificate (it lacks {', '.join(needed)}).")
    return cert


@dataclass
class CheckResult:
    certificate: Path
    problems: list[str] = field(default_factory=list)
    checked_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check(cert_path: Path, candidate: Path, oracle: Path | None = None) -> CheckResult:
    """Every problem that makes `cert_path` not a certificate of `candidate` (and `oracle`) made
    by this nvq: a changed, missing or extra file, another oracle, another version, an edit."""
    cert = load_certificate(cert_path)
    candidate = Path(candidate)
    if not candidate.is_dir():
        raise ConfigError(f"{candidate} is not a directory; nvq check takes the candidate checkpoint directory.")
    if oracle is not None and not Path(oracle).is_file():
        raise ConfigError(f"{oracle} is not a file; --oracle takes the GGUF the certificate was made against.")
    result = CheckResult(Path(cert_path))
    problems = result.problems
    stored = cert.get(SELF_HASH)
    if stored is None:
        problems.append(f"{cert_path.name}: carries no {SELF_HASH}, so edits to it cannot be detected "
                        f"(made by nvq before {__version__}?).")
    elif stored != content_hash(cert):
        problems.append(f"{cert_path.name}: its content does not match its {SELF_HASH}; it was edited after nvq "
                        f"wrote it.")
    if cert["nvq_version"] != __version__:
        problems.append(f"{cert_path.name}: made by nvq {cert['nvq_version']}, this is nvq {__version__}.")
    want = cert["inputs"].get("candidate", {}).get("files", {})
    have = file_hashes(candidate)
    result.checked_files = len(have)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            problems.append(f"{candidate / name}: certified but missing.")
        elif name not in want:
            problems.append(f"{candidate / name}: not in the certificate (added after verification).")
        elif have[name] != want[name]:
            problems.append(f"{candidate / name}: sha256 {have[name][:16]}… differs from the certified "
                            f"{want[name][:16]}….")
    if oracle is not None:
        certified = cert["inputs"].get("oracle", {}).get("sha256")
        actual = sha256_file(Path(oracle))
        if actual != certified:
            problems.append(f"{oracle}: sha256 {actual[:16]}… is not the certified oracle's "
                            f"{str(certified)[:16]}….")
    return result
