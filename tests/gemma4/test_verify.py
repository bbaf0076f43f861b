"""`nvq verify CONVERTED --oracle ORIGINAL.gguf` passes for every miniature × scheme, the oracle
being llama.cpp's converter's f32 GGUF of the original. The table of verdicts is collected in one
test and, with NVQ_WRITE_TABLE=1, written to bench/gemma4_minis.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.gemma4.conftest import ALL_SCHEMES, CASES

pytestmark = pytest.mark.llamacpp
PARAMS = [pytest.param(c, s, id=f"{c.id}-{s}") for c in CASES for s in ALL_SCHEMES]
TABLE_PATH = Path(__file__).resolve().parents[2] / "bench" / "gemma4_minis.md"


@pytest.mark.parametrize("case, scheme", PARAMS)
def test_nvq_verify_passes_against_the_gguf_of_the_original(case, scheme, minis):
    code, cert = minis.certificate(case, scheme)
    assert (code, cert["verdict"]) == (0, "pass"), cert["first_divergence"]
    assert cert["first_divergence"] is None and cert["inputs"]["tokens"]["count"] == 128
    weights = [w for w in cert["weights"] if w["scheme"].startswith(scheme)]
    assert weights and all(w["ok"] for w in cert["weights"])
    assert all(t["ok"] for t in cert["taps"])
    assert 0 < cert["logits"]["mean_kld"] <= cert["logits"]["limit_mean_kld"]


def render_table(rows: list[dict]) -> str:
    lines = [
        "# Gemma-4 miniatures: `nvq verify` against llama.cpp's GGUF of the original",
        "",
        "Written by `NVQ_WRITE_TABLE=1 pytest tests/gemma4/test_verify.py` (tests/gemma4/test_verify.py).",
        "Each miniature (tests/support/gemma4_variants.py: hidden 64, 6-12 layers, 325-token vocab,",
        "random bf16 weights) is converted by `nvq convert` and certified by `nvq verify --oracle` on",
        "128 tokens of the built-in prompts; the oracle is the f32 GGUF that llama.cpp's converter",
        "(llama-cpp-python 0.3.36 sdist) makes of the original. Tiny random models amplify",
        "quantization noise, so KLD is high and top-1 agreement low for every scheme; the verdict",
        "compares each number with the same scheme applied to the oracle's own weights (expected).",
        "GPTQ runs at group size 32, calibrated on 8 × 128 tokens of the embedded corpus; its",
        "expected KLD is round-to-nearest at that group size.",
        "",
        "| variant | form | dialect | scheme | verdict | mean KLD | expected KLD | top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['form']} | {r['dialect']} | {r['scheme']} | {r['verdict'].upper()} "
                     f"| {r['mean_kld']:.4f} | {r['expected_kld']:.4f} | {r['top1']:.1%} |")
    return "\n".join(lines) + "\n"


def test_verify_table_of_every_miniature_and_scheme(minis):
    rows = []
    for case in CASES:
        for scheme in ALL_SCHEMES:
            _, cert = minis.certificate(case, scheme)
            lg = cert["logits"]
            rows.append(dict(variant=case.variant, form=case.form, dialect=case.dialect, scheme=scheme,
                             verdict=cert["verdict"], mean_kld=lg["mean_kld"],
                             expected_kld=lg["expected"]["mean_kld"], top1=lg["top1_agreement"]))  # fmt: skip
    table = render_table(rows)
    print("\n" + table)
    if os.environ.get("NVQ_WRITE_TABLE") == "1":
        TABLE_PATH.write_text(table, encoding="utf-8")
    assert len(rows) == 5 * 2 * 2 * 3
    assert [r for r in rows if r["verdict"] != "pass"] == []
