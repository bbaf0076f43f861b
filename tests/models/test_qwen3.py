"""Qwen3 (dense, per-head q/k RMSNorm before RoPE) end to end on a tiny random model: the
reference forward equals transformers, nvq's outputs load in transformers, the fp32 original
verifies against llama.cpp's GGUF of it with every tap ≤ 1e-4, nvq's outputs verify within their
noise, and a fault is localized to its layer and tensor."""

from __future__ import annotations

import pytest
import torch

from nvq.models.layers import Taps
from nvq.models.load import load_hf
from tests.models.arch_e2e import (
    ArchSuite,
    from_gguf,
    llamacpp_reads_output,
    nvq_logits,
    rel_l2,
    transformers_logits,
    worst_tap,
)
from tests.models.hf_compare import by_family, captured_errors, hidden_state_errors, run_hf
from tests.support.tiny_models import build_tiny_qwen3
from tests.verify import faults

TOL = 1e-4
IDS = torch.randint(4, 325, (20,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return ArchSuite(tmp_path_factory.mktemp("qwen3"), build_tiny_qwen3)


def _hooks(n: int) -> dict:
    hooks = {}
    for i in range(n):
        p = f"layers.{i}."
        hooks.update({
            f"attn_norm-{i}": (p + "input_layernorm", "out", "bt"),
            f"Qcur_normed-{i}": (p + "self_attn.q_norm", "out", "bt"),
            f"Kcur_normed-{i}": (p + "self_attn.k_norm", "out", "bt"),
            f"Vcur-{i}": (p + "self_attn.v_proj", "out", "bt"),
            f"kqv_out-{i}": (p + "self_attn.o_proj", "in", "bt"),
            f"attn_out-{i}": (p + "self_attn.o_proj", "out", "bt"),
            f"ffn_norm-{i}": (p + "post_attention_layernorm", "out", "bt"),
            f"ffn_out-{i}": (p + "mlp", "out", "bt"),
        })  # fmt: skip
    return hooks


def test_qwen3_forward_equals_transformers_fp32(suite):
    path = suite.original()
    arch, tensors = load_hf(path)
    assert arch.name == "qwen3"
    taps = Taps()
    arch.module.forward(arch.config, tensors, IDS, taps=taps)
    n = arch.config.num_layers
    run = run_hf(path, IDS, _hooks(n))
    errs = {**hidden_state_errors(taps, run, n), **captured_errors(taps, run)}
    print({k: f"{v:.1e}" for k, v in by_family(errs).items()})
    assert max(errs.values()) <= TOL, {k: v for k, v in errs.items() if v > TOL}


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_transformers_loads_qwen3_output_and_agrees_with_nvq(scheme, suite):
    out = suite.converted(scheme, torch.bfloat16)
    theirs, ours = transformers_logits(out, IDS), nvq_logits(out, IDS)
    assert rel_l2(theirs, ours) <= 2e-2  # transformers runs in bf16, nvq in fp32


@pytest.mark.llamacpp
def test_dense_qwen3_verifies_against_llamacpp_gguf_with_every_tap_within_1e4(suite):
    code, cert = suite.certificate(suite.original())
    print(f"worst tap rel-L2 {worst_tap(cert):.1e}")
    assert (code, cert["verdict"]) == (0, "pass")
    assert worst_tap(cert) <= TOL and all(w["ok"] for w in cert["weights"])
    assert {"Qcur_normed-1", "Kcur_normed-1"} <= {t["name"] for t in cert["taps"]}


@pytest.mark.llamacpp
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4", "rtn", "gptq"])
def test_qwen3_outputs_verify_within_their_noise(scheme, suite):
    code, cert = suite.certificate(suite.converted(scheme))
    assert (code, cert["verdict"]) == (0, "pass"), cert["first_divergence"]
    assert any(w["scheme"].startswith("gptq" if scheme == "rtn" else scheme) for w in cert["weights"])


@pytest.mark.llamacpp
def test_qwen3_k_norm_replaced_by_ones_is_localized(suite, tmp_path):
    def fn(t, cfg):
        name = "model.layers.1.self_attn.k_norm.weight"
        t[name] = torch.ones_like(t[name])

    cand = faults._edit(suite.original(), tmp_path / "c", fn)
    code, cert = suite.certificate(cand, "k-norm-fault")
    fd = cert["first_divergence"]
    assert code == 1 and (fd["tap"], fd["layer"], fd["tensor"]) == ("Kcur_normed-1", 1, "blk.1.attn_k_norm.weight")
    assert [w["name"] for w in cert["weights"] if not w["ok"]] == ["blk.1.attn_k_norm.weight"]


@pytest.mark.llamacpp
def test_gguf_converts_back_to_a_checkpoint_transformers_loads(suite):
    import json

    back = from_gguf(suite)
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    theirs = transformers_logits(back, IDS, dtype=torch.float32)
    assert rel_l2(theirs, transformers_logits(suite.original(), IDS, dtype=torch.float32)) <= 2e-2  # bf16 weights


@pytest.mark.llamacpp
@pytest.mark.parametrize("scheme", ["nvfp4", "rtn"])  # the converter has no compressed-tensors MXFP4 reader
def test_llamacpp_converter_reads_the_output_as_nvq_decodes_it(scheme, suite):
    assert llamacpp_reads_output(suite, scheme) <= 1e-6
