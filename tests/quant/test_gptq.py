"""GPTQ solver, sequential calibration capture, and the gptq scheme of convert."""

from __future__ import annotations

import json

import pytest
import torch

from nvq.formats import int4
from nvq.io.hf import Checkpoint
from nvq.models.layers import Taps
from nvq.models.load import load_hf
from nvq.quant import calibrate, gptq
from nvq.quant.gptq_write import GPTQSettings
from nvq.quant.pipeline import convert, plan_convert
from nvq.verify.candidate import load_candidate


def _correlated(n: int, k: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(rows, k, generator=g) @ mix + 0.1 * torch.randn(rows, k, generator=g)
    return w, x, 2 * x.t() @ x / rows


def test_gptq_output_error_is_below_round_to_nearest():
    w, _, h = _correlated(64, 256, 2048)
    rtn = gptq.output_error(w, int4.dequantize(int4.quantize(w, 64)), h)
    for act_order in (True, False):
        sol = gptq.solve(w, h, 64, act_order=act_order)
        assert sol.error < 0.75 * rtn, (act_order, sol.error, rtn)


def test_gptq_without_hessian_is_round_to_nearest_and_deterministic():
    w, _, h = _correlated(32, 128, 512)
    assert torch.equal(gptq.solve(w, None, 32).quantized.codes, int4.quantize(w, 32).codes)
    a, b = gptq.solve(w, h, 32), gptq.solve(w.clone(), h.clone(), 32)
    assert torch.equal(a.quantized.codes, b.quantized.codes) and torch.equal(a.quantized.scale, b.quantized.scale)


def test_act_order_keeps_static_groups_from_the_original_weight():
    w, _, h = _correlated(32, 128, 512, seed=3)
    sol = gptq.solve(w, h, 32, act_order=True)
    assert torch.equal(sol.quantized.scale, int4.quantize(w, 32).scale)  # scales fitted before any update


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_columns_give_the_eager_bits(monkeypatch):
    w, _, h = _correlated(96, 384, 1024, seed=5)
    w, h = w.cuda(), h.cuda()
    for act_order in (True, False):
        monkeypatch.setattr(gptq, "USE_GRAPHS", False)
        eager = gptq.solve(w, h, 32, act_order=act_order)
        monkeypatch.setattr(gptq, "USE_GRAPHS", True)
        graphed = gptq.solve(w, h, 32, act_order=act_order)
        assert gptq._graphs.get((96, 128, w.device)) is not None  # the graph did run
        for a, b in ((eager.quantized.codes, graphed.quantized.codes), (eager.quantized.scale, graphed.quantized.scale)):
            assert torch.equal(a, b)


def test_dead_inputs_are_zeroed_and_singular_hessian_raises_dampening():
    w, x, _ = _correlated(16, 64, 8)  # 8 rows: H has rank 8 of 64
    x[:, 5] = 0
    h = 2 * x.t() @ x / 8
    sol = gptq.solve(w, h, 32, damp=1e-12)
    assert sol.dead_inputs == 1
    assert (int4.dequantize(sol.quantized)[:, 5] == 0).all()
    assert sol.damp > 1e-12  # the Cholesky failed at 1e-12 and the dampening was raised


def _run(src, tmp_path, **kw):
    ckpt = Checkpoint.open(src)
    plan = plan_convert(src, "gptq", group_size=32)
    seqs = [torch.randint(0, 200, (24,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    solved, hessians, last = {}, {}, {}

    def emit(u, q):  # called right after the solve of that unit
        solved[u.out] = int4.dequantize(q)
        hessians[u.out] = last["h"]

    real_solve = gptq.solve

    def spy(w, h, *a, **k):
        last["h"] = h
        return real_solve(w, h, *a, **k)

    gptq.solve = spy
    try:
        report = calibrate.run_gptq(ckpt, plan, seqs, calibrate.GPTQOptions(32, **kw), torch.device("cpu"), emit)
    finally:
        gptq.solve = real_solve
    return plan, seqs, solved, report, hessians


def test_each_layer_is_calibrated_on_the_inputs_of_the_already_quantized_layers(tiny_llama, tmp_path):
    plan, seqs, solved, report, hessians = _run(tiny_llama, tmp_path)
    assert set(solved) == {u.out for u in plan.quantized}
    # Rebuild what blk.1.attn_q must have seen: the forward with layer 0 quantized, tapped at attn_norm-1.
    arch, tensors = load_hf(tiny_llama)
    tensors = {k: v.float() for k, v in tensors.items()}
    names = {u.out: u.canonical for u in plan.quantized}
    for out, w in solved.items():
        if names[out].startswith("blk.0."):
            tensors[names[out]] = w
    expected = torch.zeros(64, 64, dtype=torch.float64)
    rows = 0
    for ids in seqs:
        taps = Taps({"attn_norm-1"})
        arch.module.forward(arch.config, tensors, ids, taps=taps)
        a = taps["attn_norm-1"].double()
        expected += a.t() @ a
        rows += a.shape[0]
    expected = (2 * expected / rows).float()
    captured = hessians["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(captured, expected, rtol=1e-4, atol=1e-6)
    assert len(report.layers) == 2 and report.mean_error > 0


def test_experts_get_hessians_from_routed_tokens_and_rare_experts_fall_back(tiny_gemma4_moe, tmp_path):
    plan, _, solved, report, _ = _run(tiny_gemma4_moe, tmp_path, min_expert_tokens=10**6)
    assert set(solved) == {u.out for u in plan.quantized}
    # with an impossible minimum every expert uses the fallback, and says so
    n_experts = sum(1 for u in plan.quantized if u.out.endswith("down_proj") and ".experts." in u.out)
    assert len(report.fallback_experts) == n_experts
    _, _, _, normal, _ = _run(tiny_gemma4_moe, tmp_path, min_expert_tokens=1)
    assert len(normal.fallback_experts) < n_experts


def test_gptq_convert_verifies_and_beats_rtn(tiny_llama, tmp_path):
    from nvq.verify.run import run as verify
    from tests.support.llamacpp import convert_to_gguf

    gguf = convert_to_gguf(tiny_llama, tmp_path / "oracle.gguf")
    certs = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        s = convert(tiny_llama, out, "gptq", device="cpu",
                    gptq=GPTQSettings(method=method, group_size=32, samples=16, seq_len=128))
        assert s.gptq.method == method
        cand = load_candidate(out)
        assert {str(x) for x in cand.quantized.values()} == {"gptq-g32"}
        certs[method] = verify(str(out), gguf, tmp_path / f"{method}.json", None, None)
        assert certs[method]["verdict"] == "pass", certs[method]["first_divergence"]
    kld = {m: c["logits"]["mean_kld"] for m, c in certs.items()}
    assert kld["gptq"] < kld["rtn"], kld
    summary = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert summary["meta"]["method"] == "gptq"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scheme", "nvfp4", "--method", "rtn"], "apply to --scheme gptq only"),
        (["--scheme", "nvfp4", "--group-size", "32"], "--group-size, --calib-*) apply to --scheme gptq"),
        (["--scheme", "gptq", "--damp", "1.5"], "dampening fraction lies in (0, 1)"),
        (["--scheme", "gptq", "--group-size", "48"], "not a multiple of the group size 48"),
        (["--scheme", "gptq", "--calib-file", "SHORT"], "fewer than one sequence of 2048"),
        (["--scheme", "gptq", "--calib-file", "/nonexistent.txt"], "cannot be read as UTF-8 text"),
    ],
)
def test_gptq_bad_input_exits_2_and_writes_nothing(tiny_llama, tmp_path, args, message):
    from typer.testing import CliRunner

    from nvq.cli import app

    short = tmp_path / "short" / "calib.txt"
    short.parent.mkdir()
    short.write_text("Too short to calibrate on.")
    out = tmp_path / "out"
    args = [str(short) if a == "SHORT" else a for a in args]
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), str(out), *args])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))
