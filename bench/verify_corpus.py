"""The verify corpus as a table for bench/RESULTS.md: clean candidates (false alarms) and the fault
corpus (detected / localized) per oracle type and tiny model.

    python bench/verify_corpus.py [--models llama,gemma4_dense,gemma4_moe] [--oracles f32,q8_0,q4_0]
                                  [--tokens 32] [--details]

Clean candidates: nvq NVFP4 / MXFP4 / GPTQ-RTN and the third-party variants
(tests/support/third_party.py). Faults (tests/verify/fault_corpus.py) are injected into nvq's
NVFP4 output. "named" = the certificate names the tensor or config field; "localized" = named,
plus the expert / rows / token id where the fault has one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.lossy_oracles import ORACLE_TYPES, OracleCache  # noqa: E402
from tests.support.third_party import CLEAN_KINDS, make_clean  # noqa: E402
from tests.verify.fault_corpus import ARCHS, faults_for, judge, verify_cli  # noqa: E402
from tests.verify.test_corpus import BUILDERS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ARCHS))
    ap.add_argument("--oracles", default="f32,q8_0,q4_0")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--details", action="store_true", help="one line per run that did not go as it should")
    args = ap.parse_args()
    models, oracles = args.models.split(","), args.oracles.split(",")
    if set(oracles) - set(ORACLE_TYPES):
        ap.error(f"oracle types are {ORACLE_TYPES}")
    started = time.perf_counter()
    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="nvq-verify-corpus-") as tmp:
        root = Path(tmp)
        src = {a: BUILDERS[a](root / a) for a in models}
        cache = OracleCache(root / "oracles")
        cache.prepare(src.values(), oracles)
        clean = {(a, k): make_clean(src[a], root / f"{a}-{k}", k) for a in models for k in CLEAN_KINDS}
        faulted = {(a, f.name): (f, f.apply(clean[(a, "nvq-nvfp4")], root / f"{a}-fault-{f.name}", src[a]))
                   for a in models for f in faults_for(a)}
        cert_path = root / "cert.json"
        for oracle in oracles:
            for a in models:
                gguf = cache.get(src[a], oracle)
                alarms = []
                for k in CLEAN_KINDS:
                    code, cert, out = verify_cli(clean[(a, k)], gguf, cert_path, args.tokens)
                    if code != 0:
                        fd = (cert or {}).get("first_divergence") or {}
                        alarms.append(k)
                        details.append(f"{oracle} {a} clean {k}: exit {code}, {fd.get('tensor')}: {fd.get('hint') or out[-200:]}")
                outcomes = {}
                for (fa, name), (f, cand) in faulted.items():
                    if fa != a:
                        continue
                    code, cert, _ = verify_cli(cand, gguf, cert_path, args.tokens)
                    outcomes[name] = o = judge(code, cert, f.expect)
                    if not o.localized:
                        state = "localized" if o.localized else "named only" if o.named else "detected, misplaced" if o.detected else "MISSED"
                        details.append(f"{oracle} {a} fault {name}: {state}; {o.where}")
                n = len(outcomes)
                rows.append((oracle, a, len(CLEAN_KINDS), len(alarms),
                             sum(o.detected for o in outcomes.values()), sum(o.named for o in outcomes.values()),
                             sum(o.localized for o in outcomes.values()), n))
                print(f"  done {oracle} {a} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print("| oracle | model | clean runs | false alarms | faults | detected | named | localized |")
    print("|---|---|---|---|---|---|---|---|")
    for oracle, a, n_clean, n_alarm, det, named, loc, n in rows:
        print(f"| {oracle} | {a} | {n_clean} | {n_alarm} | {n} | {det} | {named} | {loc} |")
    print(f"\n{time.perf_counter() - started:.0f} s, {args.tokens} tokens per run")
    if args.details:
        print("\n" + "\n".join(details))


if __name__ == "__main__":
    main()
