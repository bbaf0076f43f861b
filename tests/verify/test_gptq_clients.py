"""GPTQ checkpoints as clients read them (issue 10 part 3): act-order g_idx and qzeros decoded as
GPTQModel and llama.cpp's converter do, and what vLLM 0.33 would serve differently, as findings.

The act-order checkpoints come from tests/support/gptq_writer.py (formats.md §4.3, no nvq code)
made from a tiny Llama whose input channels differ in size (`with_salient_channels`), as real
models' do: on iid random weights every group has the same range and a wrong group is invisible.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nvq.cli import app
from nvq.errors import CheckpointError
from nvq.io.hf import Checkpoint
from nvq.layouts import gptq
from nvq.verify.candidate import load_candidate
from nvq.verify.run import verify
from tests.support.gptq_writer import decode_spec, edit_tensors, with_salient_channels, write_gptq
from tests.support.tiny_models import build_tiny_llama

O_PROJ = "model.layers.1.self_attn.o_proj"
O_PROJ_CANONICAL = "blk.1.attn_output.weight"


@pytest.fixture(scope="module")
def salient_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq-clients")
    return with_salient_channels(build_tiny_llama(root / "iid", dtype=torch.float32), root / "src")


@pytest.fixture(scope="module")
def made(salient_llama, tmp_path_factory):
    """Factory: made(name, **write_gptq options) -> a GPTQ checkpoint of salient_llama, once each."""
    root, cache = tmp_path_factory.mktemp("gptq-made"), {}

    def make(name, **options):
        if name not in cache:
            cache[name] = write_gptq(salient_llama, root / name, **options)
        return cache[name]

    return make


def _modules(ckpt_dir) -> dict[str, dict[str, np.ndarray]]:
    ckpt = Checkpoint.open(ckpt_dir)
    mods: dict[str, dict[str, np.ndarray]] = {}
    for name in ckpt.tensors:
        stem, suffix = name.rsplit(".", 1)
        if suffix in gptq.SUFFIXES:
            mods.setdefault(stem, {})[suffix] = ckpt.read(name).numpy()
    return mods


def _checks(cand, serious=None) -> set[tuple[str, str]]:
    return {(f.tensor, f.check) for f in cand.client_findings if serious is None or f.serious == serious}


# ---------------------------------------------------------------------------------------------
# Reading (no oracle needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, sym", [("gptq", True), ("gptq_v2", True), ("gptq", False), ("gptq_v2", False)])
def test_act_order_candidate_decodes_like_an_independent_numpy_reader(made, fmt, sym):
    ckpt = made(f"ao-{fmt}-{sym}", fmt=fmt, sym=sym)
    cand = load_candidate(ckpt)
    hf = Checkpoint.open(ckpt)
    mods = _modules(ckpt)
    assert len(mods) == 14
    for stem, parts in mods.items():
        expect = decode_spec(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], fmt)
        got = gptq.dequantize({k: torch.from_numpy(v) for k, v in parts.items()}, fmt)
        np.testing.assert_array_equal(got.numpy(), expect, err_msg=stem)
        assert hf.tensors[f"{stem}.g_idx"].dtype == "I32"
    # every module's groups are the written, non-monotonic g_idx, under its canonical name
    assert len(cand.group_index) == 14
    g = cand.group_index[O_PROJ_CANONICAL]
    assert g.dtype == torch.int64 and torch.equal(g, torch.from_numpy(mods[O_PROJ]["g_idx"]).long())
    assert (g.diff() < 0).any()
    expected_notes = {("quantization_config", "act-order-refused")} | (
        set() if sym else {("quantization_config", "asym-refused")})
    assert _checks(cand) == expected_notes and not _checks(cand, serious=True)


def test_desc_act_false_with_a_permuted_g_idx_is_what_vllm_would_drop(made, tmp_path):
    # GPTQModel and llama.cpp read g_idx whatever desc_act says; vLLM drops it when desc_act is false
    src = made("ao-gptq-True", fmt="gptq", sym=True)
    ckpt = edit_tensors(src, tmp_path / "no-desc-act", {})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["desc_act"] = False
    (ckpt / "config.json").write_text(json.dumps(cfg))
    cand, ref = load_candidate(ckpt), load_candidate(src)
    assert all(torch.equal(cand.tensors[n], ref.tensors[n]) for n in ref.tensors)
    dropped = {f.tensor: f for f in cand.client_findings if f.check == "g_idx-dropped"}
    assert len(dropped) == 14 and all(f.serious and f.client == "vLLM 0.33" for f in dropped.values())
    assert dropped[O_PROJ_CANONICAL].rel_l2 > 0.1
    assert ("quantization_config", "act-order-refused") not in _checks(cand)


def test_g_idx_out_of_range_is_a_checkpoint_error_naming_the_module(made, tmp_path):
    src = made("ao-gptq-True", fmt="gptq", sym=True)
    bad = edit_tensors(src, tmp_path / "bad", {f"{O_PROJ}.g_idx": lambda g: torch.where(g == 0, 2, g)})
    with pytest.raises(CheckpointError, match=rf"module '{O_PROJ}' .*g_idx\[\d+\] = 2 is outside \[0, 2\)"):
        load_candidate(bad)


def test_bfloat16_model_gets_a_scale_dtype_note_per_tensor(made):
    cand = load_candidate(made("bf16-sym", desc_act=False, model_dtype="bfloat16"))
    notes = [f for f in cand.client_findings if f.check == "scale-dtype"]
    assert len(notes) == 14 and not any(f.serious for f in notes)
    assert all(0 < f.rel_l2 < 1e-2 for f in notes)
    assert not cand.group_index  # desc_act false: g_idx is k // G


def test_fused_expert_stack_carries_each_members_groups(tiny_gemma4_moe, tmp_path):
    from nvq.quant.gptq_write import GPTQSettings
    from nvq.quant.pipeline import convert

    out = tmp_path / "out"
    convert(tiny_gemma4_moe, out, "gptq", device="cpu", gptq=GPTQSettings(method="rtn", group_size=32))
    assert not load_candidate(out).group_index  # nvq writes trivial g_idx
    module = next(n.removesuffix(".g_idx") for n in Checkpoint.open(out).tensors
                  if ".experts.1.up_proj." in n and n.endswith(".g_idx"))
    permuted = {}

    def permute(g):  # a valid act-order grouping: the same group sizes, columns shuffled
        permuted["g"] = g[torch.randperm(g.shape[0], generator=torch.Generator().manual_seed(0))]
        return permuted["g"]

    cand = load_candidate(edit_tensors(out, tmp_path / "edited", {f"{module}.g_idx": permute}))
    (name, g), = cand.group_index.items()
    assert name.endswith("ffn_gate_up_exps.weight") and cand.schemes[name].row_parts == 2
    k = cand.tensors[name].shape[-1]
    assert g.shape == (cand.tensors[name].shape[0], 2, k)
    assert torch.equal(g[1, 1], permuted["g"].long())  # expert 1, up rows
    trivial = torch.arange(k) // 32
    assert all(torch.equal(g[e, p], trivial) for e in range(g.shape[0]) for p in range(2) if (e, p) != (1, 1))
    assert ("g_idx-dropped" in {f.check for f in cand.client_findings if f.tensor == name})


# ---------------------------------------------------------------------------------------------
# nvq verify against the f32 GGUF of the dense source (llama.cpp's converter)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(salient_llama, tiny_gguf):
    return tiny_gguf(salient_llama, "f32")


def _failing(result) -> list[str]:
    return [w.name for w in result.weights if not w.ok] + [t.name for t in result.taps if not t.ok]


@pytest.mark.llamacpp
def test_act_order_g_idx_is_read_so_a_genuine_act_order_checkpoint_passes(made, oracle, tmp_path):
    # regression: g_idx was never read (g = k // G assumed), so act-order checkpoints failed
    ckpt = made("ao-gptq-True", fmt="gptq", sym=True)
    paths = tmp_path / "cert.json", tmp_path / "cert.md"
    result = CliRunner().invoke(app, ["verify", str(ckpt), "--oracle", str(oracle), "--json", str(paths[0]),
                                      "--markdown", str(paths[1])])
    assert result.exit_code == 0, result.output
    cert = json.loads(paths[0].read_text())
    assert cert["verdict"] == "pass"
    assert [(f["check"], f["serious"]) for f in cert["client_findings"]] == [("act-order-refused", False)]
    assert "## Clients" in paths[1].read_text() and "vLLM 0.33 (note)" in paths[1].read_text()
    # read with k // G, the same files would fail: the groups matter on this model
    wrong = load_candidate(ckpt)
    m = gptq.unpack({k: torch.from_numpy(v) for k, v in _modules(ckpt)[O_PROJ].items()})
    assert (m.weight(g_idx=m.trivial_g_idx()) - wrong.tensors[O_PROJ_CANONICAL]).norm() > 0.3 * wrong.tensors[O_PROJ_CANONICAL].norm()


@pytest.mark.llamacpp
def test_g_idx_shifted_by_one_fails_naming_the_tensor(made, oracle, tmp_path):
    src = made("ao-gptq-True", fmt="gptq", sym=True)
    bad = edit_tensors(src, tmp_path / "rolled", {f"{O_PROJ}.g_idx": lambda g: torch.roll(g, 1)})
    result = verify(bad, oracle, device="cpu")
    assert not result.passed and O_PROJ_CANONICAL in _failing(result)
    assert result.first_divergence["tensor"] == O_PROJ_CANONICAL


@pytest.mark.llamacpp
def test_sym_qzeros_shifted_by_one_nibble_fail_naming_the_tensor_with_the_vllm_finding(made, oracle, tmp_path):
    src = made("sym", desc_act=False)
    plain = verify(src, oracle, device="cpu")
    assert plain.passed and not plain.candidate.client_findings

    def shift(words):  # every zero nibble 7 → 8 (v1: zero point 9), as a v2 file mislabelled v1
        w = (words.long() & 0xFFFFFFFF) + 0x11111111
        return torch.where(w >= 2**31, w - 2**32, w).int()

    bad = edit_tensors(src, tmp_path / "qz", {f"{O_PROJ}.qzeros": shift})
    result = verify(bad, oracle, device="cpu")
    findings = [f for f in result.candidate.client_findings if f.serious]
    assert [(f.tensor, f.client, f.check) for f in findings] == [(O_PROJ_CANONICAL, "vLLM 0.33", "sym-qzeros")]
    assert findings[0].rel_l2 > 0.2 and not result.passed
    # the decoded weight moved by one step per group: further from the oracle than the clean one
    err = {w.name: w.rel_l2 for w in result.weights}
    clean = {w.name: w.rel_l2 for w in plain.weights}
    assert err[O_PROJ_CANONICAL] > 3 * clean[O_PROJ_CANONICAL]
    assert all(err[n] == clean[n] for n in clean if n != O_PROJ_CANONICAL)
    junit = tmp_path / "cert.xml"
    cli = CliRunner().invoke(app, ["verify", str(bad), "--oracle", str(oracle), "--junit", str(junit)])
    assert cli.exit_code == 1, cli.output
    assert f'name="vLLM 0.33: {O_PROJ_CANONICAL}"' in junit.read_text()


@pytest.mark.llamacpp
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_asym_act_order_round_trips_in_v1_and_v2(made, oracle, fmt):
    ckpt = made(f"ao-{fmt}-False", fmt=fmt, sym=False)
    result = verify(ckpt, oracle, device="cpu")
    assert result.passed, _failing(result)
    assert {f.check for f in result.candidate.client_findings} == {"act-order-refused", "asym-refused"}
    other = load_candidate(made(f"ao-{'gptq_v2' if fmt == 'gptq' else 'gptq'}-False",
                                fmt="gptq_v2" if fmt == "gptq" else "gptq", sym=False))
    assert all(torch.equal(result.candidate.tensors[n], other.tensors[n]) for n in other.tensors)


@pytest.mark.llamacpp
@pytest.mark.parametrize("fmt, sym", [("gptq", True), ("gptq_v2", False)])
def test_llamacpp_converter_reads_act_order_checkpoints_to_nvqs_weights(made, fmt, sym, tmp_path):
    # llama.cpp's converter (its dequant_gptq, after GPTQModel) as the client: g_idx and qzeros read
    from nvq.verify.oracle import load_oracle
    from tests.support.llamacpp import convert_to_gguf

    ckpt = made(f"ao-{fmt}-{sym}", fmt=fmt, sym=sym)
    cand = load_candidate(ckpt)
    orc = load_oracle(convert_to_gguf(ckpt, tmp_path / "model.gguf", outtype="f32"), cand)
    assert len(cand.quantized) == 14
    for name in cand.quantized:
        assert torch.equal(orc.tensors[name], cand.tensors[name]), name
