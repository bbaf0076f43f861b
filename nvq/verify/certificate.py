"""The verification certificate: a JSON document (CLI.md's minimum fields and more), and its
Markdown and JUnit XML renderings. Files are written all at once or not at all.

Non-finite numbers (a tap whose shape differs has no rel-L2) are written as null: JSON has no
Infinity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nvq import __version__
from nvq.errors import ConfigError
from nvq.io import atomic

LOGIT_KEYS = ("mean_kld", "kld_p99", "kld_p95", "kld_p90", "kld_median", "kld_max",
              "top1_agreement", "rms_dp", "mean_dp", "mean_ln_ppl_ratio", "dp_of", "positions")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink()]


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under the directory, by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in _files(directory)}


class PendingHashes:
    """The sha256 of every input, computed in background threads while verification runs
    (hashlib releases the GIL), one file per thread: an oracle of 16 GB is one stream, so the
    candidate's shards hash beside it rather than after it. A quarter of the cores, at least one."""

    def __init__(self, candidate_dir: Path, oracle_file: Path) -> None:
        workers = max(1, min(8, (os.cpu_count() or 1) // 4))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvq-sha256")
        self._oracle = pool.submit(sha256_file, oracle_file)
        self._candidate = {p.relative_to(candidate_dir).as_posix(): pool.submit(sha256_file, p)
                           for p in _files(candidate_dir)}
        pool.shutdown(wait=False)

    def result(self) -> tuple[dict[str, str], str]:
        """(candidate file hashes, oracle hash), waiting for the threads."""
        return {k: f.result() for k, f in self._candidate.items()}, self._oracle.result()


def start_hashing(candidate_dir: Path, oracle_file: Path) -> PendingHashes:
    return PendingHashes(candidate_dir, oracle_file)


SELF_HASH = "certificate_sha256"


def content_hash(cert: dict) -> str:
    """sha256 of the certificate's canonical JSON (sorted keys, no spaces), itself left out:
    `nvq check` recomputes it to detect an edited certificate."""
    body = {k: v for k, v in cert.items() if k != SELF_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(cert: dict) -> dict:
    """The certificate with its own content hash as its last field."""
    return {**cert, SELF_HASH: content_hash(cert)}


def _num(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def build(result, policy=None) -> dict:
    """The certificate of a `nvq.verify.run.VerifyResult`, judged also by a release `policy`
    (nvq.verify.policy.Policy) when given: a requirement not met fails the verdict."""
    cert = _build(result)
    if policy is None:
        return seal(cert)
    problems = policy.problems(cert)
    cert["policy"] = policy.section(problems)
    if problems:
        cert["verdict"] = "fail"
    return seal(cert)


def _build(result) -> dict:
    c, o, tokens = result.candidate, result.oracle, result.tokens
    logits = {k: _num(result.logits[k]) for k in LOGIT_KEYS if k in result.logits}
    logits["expected"] = {k: _num(v) for k, v in result.logits["expected"].items() if k in LOGIT_KEYS}
    logits["expected"]["mean_kld_draws"] = [_num(x) for x in result.logits["expected"].get("mean_kld_draws", [])]
    logits["limit_mean_kld"] = _num(result.logits.get("limit_mean_kld"))
    logits["ok"] = bool(result.logits.get("ok", False))
    ids = b"".join(s.long().numpy().astype("<i8").tobytes() for s in tokens.sequences)
    pending = getattr(result, "input_hashes", None)
    c_files, o_hash = pending.result() if pending is not None else (file_hashes(c.path), sha256_file(o.path))
    return {
        "nvq_version": __version__,
        "verdict": result.verdict,
        "level": result.level,
        "first_divergence": result.first_divergence,
        "logits": logits,
        "taps": [
            {"name": t.name, "layer": t.layer, "rel_l2": _num(t.rel_l2), "cosine": _num(t.cosine),
             "max_abs": _num(t.max_abs), "expected_rel_l2": _num(t.expected_rel_l2),
             "expected_sd": _num(t.expected_sd), "limit": _num(t.limit), "ok": t.ok}
            for t in result.taps
        ],
        "weights": [
            {"name": w.name, "layer": w.layer, "scheme": w.scheme, "oracle_type": w.oracle_type,
             "rel_l2": _num(w.rel_l2), "expected_rel_l2": _num(w.expected_rel_l2), "limit": _num(w.limit),
             "ok": w.ok, "bit_exact": w.bit_exact,
             **({"where": w.where} if w.where else {}), **({"hint": w.hint} if w.hint else {})}
            for w in result.weights
        ],
        # every finding: {field, layer, candidate, oracle, verdict ("fail" / "note"), ok, hint, ...}
        "config": [f.as_dict() for f in result.config_findings],
        "tokenizer": [f.as_dict() for f in result.tokenizer_findings],
        "inputs": {
            "candidate": {"path": str(c.path), "format": c.format, "architecture": c.arch.model_type,
                          "files": c_files},
            "oracle": {"path": str(o.path), "sha256": o_hash, "storage": o.exactness,
                       "exact": not o.lossy, "noise_draws": result.draws},
            "tokens": {"source": tokens.source, "count": tokens.count,
                       "sequences": [int(s.numel()) for s in tokens.sequences],
                       "sha256": hashlib.sha256(ids).hexdigest()},
        },
        "thresholds": result.thresholds.as_dict(),
        "mode": "teacher-forced" if result.teacher_forced else "free-running",
        "served_as": {"name": result.serving.name, "what": result.serving.what},
        "device": result.device,
        "precision": result.precision,
        "seconds": round(result.seconds, 3),
        "resources": result.resources,
        "candidate_error": result.candidate_error,
        "notes": result.notes,
        # where a serving client reads the candidate differently; serious ones fail the verdict
        "client_findings": [
            {"tensor": f.tensor, "client": f.client, "check": f.check, "what": f.what,
             "rel_l2": _num(f.rel_l2), "serious": f.serious}
            for f in c.client_findings
        ],
    }


# ---------------------------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------------------------


def to_json(cert: dict) -> str:
    return json.dumps(cert, indent=2, allow_nan=False) + "\n"


def _g(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def oracle_exactness(oracle: dict) -> str:
    """How exact the oracle is: its storage types, and what the band was drawn from."""
    types = ", ".join(f"{n} {k}" for k, n in oracle.get("storage", {}).items())
    if oracle.get("exact"):
        return f"exact ({types}): one nominal expected-noise draw"
    return f"lossy ({types}): {oracle.get('noise_draws')} expected-noise draws within its rounding cells"


def divergence_line(cert: dict) -> str:
    fd = cert["first_divergence"]
    if fd is None:
        return "none"
    where = fd.get("tap") or fd.get("field") or "(no tap)"
    if fd.get("tensor"):
        where += f", tensor `{fd['tensor']}`"
    return where + (f": {fd['hint']}" if fd.get("hint") else "")


def to_markdown(cert: dict) -> str:
    inp, lg = cert["inputs"], cert["logits"]
    lines = [
        f"# nvq verify: {cert['verdict'].upper()} ({cert['level']})",
        "",
        f"- candidate: `{inp['candidate']['path']}` ({inp['candidate']['format']}, {inp['candidate']['architecture']})",
        f"- oracle: `{inp['oracle']['path']}` (sha256 `{inp['oracle']['sha256']}`), "
        f"{oracle_exactness(inp['oracle'])}",
        f"- tokens: {inp['tokens']['count']} from {inp['tokens']['source']}; mode {cert['mode']}; "
        f"device {cert['device']}; nvq {cert['nvq_version']}",
        f"- thresholds: {', '.join(f'{k} {v:g}' for k, v in cert['thresholds'].items())}",
        f"- first divergence: {divergence_line(cert)}",
    ]
    if cert.get("candidate_error"):
        lines.append(f"- the candidate's forward failed: {cert['candidate_error']}")
    if cert.get("policy"):
        pol = cert["policy"]
        lines.append(f"- policy: `{pol['path']}` (sha256 `{pol['sha256'][:16]}…`): "
                     + ("met" if pol["ok"] else "**not met**: " + " ".join(pol["problems"])))
    lines += ["", "## Logits (llama-perplexity statistics)", "",
              "| statistic | candidate | expected |", "|---|---|---|"]
    for k in ("mean_kld", "kld_p99", "kld_p95", "kld_p90", "kld_median", "kld_max", "top1_agreement", "rms_dp"):
        lines.append(f"| {k} | {_g(lg.get(k))} | {_g(lg['expected'].get(k))} |")
    lines.append(f"| limit on mean_kld | {_g(lg.get('limit_mean_kld'))} | ok: {_g(lg['ok'])} |")
    lines += ["", "## Taps", "", "| tap | rel-L2 | expected | limit | cosine | max abs | ok |", "|---|---|---|---|---|---|---|"]
    for t in cert["taps"]:
        lines.append(f"| {t['name']} | {_g(t['rel_l2'])} | {_g(t['expected_rel_l2'])} | {_g(t['limit'])} | "
                     f"{_g(t['cosine'], 7)} | {_g(t['max_abs'])} | {_g(t['ok'])} |")
    lines += ["", "## Weights", "", "| weight | scheme | oracle | rel-L2 | expected | limit | ok | where | hint |",
              "|---|---|---|---|---|---|---|---|---|"]
    for w in cert["weights"]:
        ok = "bit-exact" if w.get("bit_exact") else _g(w["ok"])
        lines.append(f"| {w['name']} | {w['scheme'] or '—'} | {w.get('oracle_type') or '—'} | {_g(w['rel_l2'])} | "
                     f"{_g(w['expected_rel_l2'])} | {_g(w['limit'])} | {ok} | {w.get('where', '')} | {w.get('hint', '')} |")
    for key, title in (("config", "Config"), ("tokenizer", "Tokenizer")):
        if cert.get(key):
            lines += ["", f"## {title} (against the GGUF)", ""]
            lines += [f"- {'**FAIL**' if not d['ok'] else 'note'} `{d['field']}`: {d['hint']}" for d in cert[key]]
    if cert.get("client_findings"):
        lines += ["", "## Clients", ""] + client_lines(cert["client_findings"])
    if cert.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in cert["notes"]]
    return "\n".join(lines) + "\n"


def client_lines(findings: list[dict]) -> list[str]:
    """Serious findings one by one; notes one line per client and check, with the largest rel-L2."""
    rel = lambda f: f"rel-L2 {_g(f['rel_l2'])}" if f["rel_l2"] is not None else "not loaded"  # noqa: E731
    lines = [f"- **{f['client']}** `{f['tensor']}`: {f['what']} ({rel(f)})" for f in findings if f["serious"]]
    notes: dict[tuple[str, str], list[dict]] = {}
    for f in findings:
        if not f["serious"]:
            notes.setdefault((f["client"], f["check"]), []).append(f)
    for (client, _), fs in notes.items():
        worst = max(fs, key=lambda f: f["rel_l2"] or 0.0)
        where = f"`{worst['tensor']}`" if len(fs) == 1 else f"{len(fs)} tensors, largest `{worst['tensor']}`"
        lines.append(f"- {client} (note): {worst['what']}; {where} ({rel(worst)})")
    return lines


def to_junit(cert: dict) -> str:
    """One testcase per tap and per weight, one for the logits; failures carry the message."""
    cases = []
    for t in cert["taps"]:
        msg = f"rel-L2 {_g(t['rel_l2'])} > limit {_g(t['limit'])} (expected {_g(t['expected_rel_l2'])})"
        cases.append(("nvq.verify.taps", t["name"], t["ok"], msg))
    for w in cert["weights"]:
        msg = f"rel-L2 {_g(w['rel_l2'])} > limit {_g(w['limit'])} (expected {_g(w['expected_rel_l2'])})"
        if w.get("where"):
            msg += f" at {w['where']}"
        if w.get("hint"):
            msg += f": {w['hint']}"
        cases.append(("nvq.verify.weights", w["name"], w["ok"], msg))
    for key in ("config", "tokenizer"):  # one failing testcase per failing finding; notes are no testcases
        for d in cert.get(key, []):
            if not d["ok"]:
                where = f" (layer {d['layer']})" if d.get("layer") is not None else ""
                where += f" (id {d['token_id']})" if d.get("token_id") is not None else ""
                cases.append((f"nvq.verify.{key}", d["field"] + where, False, d["hint"]))
    for problem in cert.get("policy", {}).get("problems", []):
        cases.append(("nvq.verify.policy", problem.split(";")[0], False, problem))
    lg = cert["logits"]
    cases.append(("nvq.verify.logits", "mean_kld", lg["ok"],
                  f"mean KLD {_g(lg.get('mean_kld'))} > limit {_g(lg.get('limit_mean_kld'))}"))
    if cert.get("candidate_error"):
        cases.append(("nvq.verify", "candidate_forward", False, cert["candidate_error"]))
    for f in cert.get("client_findings", []):
        if f["serious"]:
            cases.append(("nvq.verify.clients", f"{f['client']}: {f['tensor']}", False, f["what"]))
    failures = sum(1 for *_, ok, _ in cases if not ok)
    root = ET.Element("testsuites", tests=str(len(cases)), failures=str(failures))
    suite = ET.SubElement(root, "testsuite", name="nvq verify", tests=str(len(cases)), failures=str(failures),
                          errors="0", skipped="0", time=str(cert["seconds"]))
    props = ET.SubElement(suite, "properties")
    for k, v in (("candidate", cert["inputs"]["candidate"]["path"]), ("oracle", cert["inputs"]["oracle"]["path"]),
                 ("verdict", cert["verdict"]), ("first_divergence", divergence_line(cert))):
        ET.SubElement(props, "property", name=k, value=str(v))
    for classname, name, ok, msg in cases:
        case = ET.SubElement(suite, "testcase", classname=classname, name=name)
        if not ok:
            ET.SubElement(case, "failure", message=msg, type="VerificationFailure").text = msg
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def check_outputs(paths: list[Path]) -> None:
    """Refuse, before any work, outputs that cannot be written: a missing parent or a directory."""
    if len(set(map(str, paths))) != len(paths):
        raise ConfigError("--json, --markdown, --junit and --html must name different files.")
    for p in paths:
        if p.is_dir():
            raise ConfigError(f"{p} is a directory; a certificate output must be a file path.")
        if not p.parent.is_dir():
            raise ConfigError(f"{p}: the directory {p.parent} does not exist.")


def write_atomically(files: dict[Path, str]) -> None:
    """Write every file to a temporary sibling and fsync; then move any old targets aside, rename
    the new files in, and only then delete the old ones. On any failure the old files are put
    back and no temporary is left: the targets hold all old or all new contents."""
    check_outputs(list(files))
    for path in files:  # what killed runs left for these files: deleted, or put back if missing
        atomic.recover_stale(path)
    with atomic.signals_as_interrupts():
        _write_all(files)


def _write_all(files: dict[Path, str]) -> None:
    pid = os.getpid()
    tmps: list[tuple[Path, Path]] = []
    moved: list[tuple[Path, Path]] = []  # (old copy, target)
    placed: list[Path] = []
    try:
        for path, text in files.items():
            tmp = path.parent / f".{path.name}.nvq-tmp-{pid}"
            tmps.append((tmp, path))
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in tmps:
            if path.exists() or path.is_symlink():
                old = path.parent / f".{path.name}.nvq-old-{pid}"
                os.replace(path, old)
                moved.append((old, path))
            os.rename(tmp, path)
            placed.append(path)
    except BaseException as e:
        for path in placed:
            path.unlink(missing_ok=True)
        for old, path in moved:
            os.replace(old, path)
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ConfigError(f"the certificate cannot be written ({e.strerror or e}); nothing was written.") from None
        raise
    for old, _ in moved:
        old.unlink(missing_ok=True)
