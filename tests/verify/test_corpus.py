"""The verify corpus (issue 10): clean candidates must PASS against exact and lossy GGUF oracles,
every fault of tests/verify/fault_corpus.py must FAIL and be named where it was injected.

Clean candidates: nvq's NVFP4, MXFP4 and GPTQ (RTN) outputs and the third-party variants of
tests/support/third_party.py. Oracles: F32 (exact), Q8_0 (llama.cpp's converter) and Q4_0
(re-quantized, tests/support/lossy_oracles.py). Faults are injected into nvq's NVFP4 output.
The tiny Llama runs by default; the Gemma-4 models are `slow`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from nvq.formats import e2m1, nvfp4
from tests.support.lossy_oracles import lossy_oracles  # noqa: F401 (session fixture)
from tests.support.third_party import CLEAN_KINDS, make_clean
from tests.support.tiny_models import build_tiny_gemma4, build_tiny_llama
from tests.verify.fault_corpus import ARCHS, FAULTS, NOISE_RATIO, faults_for, judge, verify_cli

pytestmark = pytest.mark.llamacpp

ORACLES = ("f32", "q8_0", "q4_0")
FAULT_ORACLES = ("f32", "q8_0")
BUILDERS = {
    "llama": lambda d: build_tiny_llama(d, dtype=torch.float32),
    "gemma4_dense": lambda d: build_tiny_gemma4(d, "dense_keqv", dtype=torch.float32, conditional=False),
    "gemma4_moe": lambda d: build_tiny_gemma4(d, "moe", dtype=torch.float32),
}


def _arch_param(arch: str, *rest):
    marks = () if arch == "llama" else (pytest.mark.slow,)
    return pytest.param(arch, *rest, marks=marks, id="-".join([arch, *rest]))


@pytest.fixture(scope="session")
def corpus_models(tmp_path_factory):
    """arch -> fp32 tiny checkpoint, built on first use."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = BUILDERS[arch](tmp_path_factory.mktemp(f"corpus-{arch}"))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def corpus_oracle(corpus_models, lossy_oracles):  # noqa: F811
    """(arch, type) -> GGUF oracle; the first call makes every type of ORACLES for that model in
    one converter batch."""
    def get(arch, outtype):
        lossy_oracles.prepare([corpus_models(arch)], ORACLES)
        return lossy_oracles.get(corpus_models(arch), outtype)

    return get


@pytest.fixture(scope="session")
def corpus_candidate(corpus_models, tmp_path_factory):
    """(arch, kind) -> clean candidate directory, made once."""
    made = {}

    def get(arch, kind):
        if (arch, kind) not in made:
            made[(arch, kind)] = make_clean(corpus_models(arch), tmp_path_factory.mktemp(f"clean-{arch}") / kind, kind)
        return made[(arch, kind)]

    return get


CLEAN_CASES = [_arch_param(a, k, o) for a in ARCHS for k in CLEAN_KINDS for o in ORACLES]


@pytest.mark.parametrize("arch, kind, oracle", CLEAN_CASES)
def test_clean_candidate_passes(arch, kind, oracle, corpus_candidate, corpus_oracle, tmp_path):
    code, cert, out = verify_cli(corpus_candidate(arch, kind), corpus_oracle(arch, oracle), tmp_path / "cert.json")
    fd = (cert or {}).get("first_divergence")
    assert code == 0, f"false alarm on a clean {kind} candidate against a {oracle} oracle: {fd or out[-400:]}"


FAULT_CASES = [_arch_param(a, f.name, o) for o in FAULT_ORACLES for a in ARCHS for f in faults_for(a)]


@pytest.mark.parametrize("arch, fault, oracle", FAULT_CASES)
def test_fault_is_detected_and_localized(arch, fault, oracle, corpus_models, corpus_candidate, corpus_oracle, tmp_path):
    f = next(x for x in FAULTS if x.name == fault)
    cand = f.apply(corpus_candidate(arch, "nvq-nvfp4"), tmp_path / "faulted", corpus_models(arch))
    code, cert, out = verify_cli(cand, corpus_oracle(arch, oracle), tmp_path / "cert.json")
    outcome = judge(code, cert, f.expect)
    assert outcome.detected, f"{fault} not detected against {oracle} (exit {code}): {outcome.where or out[-400:]}"
    assert outcome.localized, f"{fault} detected but not localized as {f.expect}: {outcome.where}"


# --- the corpus itself: every fault changes the candidate, the noise fault has the size it claims


@pytest.mark.parametrize("fault", [f.name for f in faults_for("llama")])
def test_fault_changes_the_candidate(fault, corpus_models, corpus_candidate, tmp_path):
    f = next(x for x in FAULTS if x.name == fault)
    cand = corpus_candidate("llama", "nvq-nvfp4")
    out = f.apply(cand, tmp_path / "faulted", corpus_models("llama"))
    changed = [p.name for p in sorted(cand.iterdir()) if p.is_file() and p.read_bytes() != (out / p.name).read_bytes()]
    assert changed, f"{fault} left every file of the candidate unchanged"


def test_noise_fault_has_the_claimed_size(corpus_models, corpus_candidate, tmp_path):
    f = next(x for x in FAULTS if x.name == "one_tensor_with_1.5x_quantization_noise")
    cand = corpus_candidate("llama", "nvq-nvfp4")
    out = f.apply(cand, tmp_path / "faulted", corpus_models("llama"))
    module = "model.layers.1.mlp.down_proj"
    w = load_file(corpus_models("llama") / "model.safetensors")[f"{module}.weight"].float()

    def error(path):
        t = load_file(path / "model.safetensors")
        q = nvfp4.NVFP4Quantized(e2m1.unpack_pairs(t[f"{module}.weight_packed"]), t[f"{module}.weight_scale"],
                                 t[f"{module}.weight_global_scale"].float().reshape(1))
        return float((nvfp4.dequantize(q) - w).norm())

    assert error(out) / error(cand) == pytest.approx(NOISE_RATIO, abs=0.05)
