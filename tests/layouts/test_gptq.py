"""GPTQ v1 tensors written by nvq, decoded by an independent reader written from formats.md §4.1
(numpy, no nvq code): equal to nvq's dequantization, symmetric qzeros 0x77777777, trivial g_idx,
and the config fields vLLM and transformers read (§4.2). Reading follows GPTQModel and llama.cpp:
qzeros are read for symmetric checkpoints too, g_idx is validated, a v1 zero point 0 is seen."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nvq.formats import int4
from nvq.layouts import gptq
from nvq.quant.pipeline import convert
from nvq.verify.candidate import load_candidate
from tests.support.gptq_writer import decode_spec, quantize_module

SYM_QZEROS_WORD = 0x77777777  # = 2004318071 as int32


def spec_decode(qweight, qzeros, scales, g_idx):
    return decode_spec(qweight, qzeros, scales, g_idx, "gptq")


def _names(out_dir) -> set[str]:
    names = set()
    for f in out_dir.glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            names |= set(fh.keys())
    return names


def _modules(out_dir) -> dict[str, dict[str, np.ndarray]]:
    mods: dict[str, dict[str, np.ndarray]] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                stem, suffix = name.rsplit(".", 1)
                if suffix in gptq.SUFFIXES:
                    mods.setdefault(stem, {})[suffix] = fh.get_tensor(name).numpy()
    return mods


@pytest.fixture(scope="module", params=["llama", "gemma4_moe"])
def rtn_checkpoint(request, tiny_llama, tiny_gemma4_moe, tmp_path_factory):
    src = {"llama": tiny_llama, "gemma4_moe": tiny_gemma4_moe}[request.param]
    out = tmp_path_factory.mktemp(f"gptq-{request.param}") / "out"
    from nvq.quant.gptq_write import GPTQSettings

    convert(src, out, "gptq", device="cpu", gptq=GPTQSettings(method="rtn", group_size=32))
    return src, out


def test_independent_decoder_equals_nvq_dequantization(rtn_checkpoint):
    src, out = rtn_checkpoint
    mods = _modules(out)
    assert mods, "no GPTQ modules written"
    cand = load_candidate(out)  # nvq's own reading of the same files
    from nvq.io.hf import Checkpoint

    ckpt = Checkpoint.open(out)
    for stem, parts in mods.items():
        assert set(parts) == set(gptq.SUFFIXES), stem
        ours = spec_decode(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"])
        nvq_w = gptq.dequantize({k: torch.from_numpy(v) for k, v in parts.items()}).numpy()
        np.testing.assert_array_equal(ours, nvq_w, err_msg=stem)
        assert ckpt.tensors[f"{stem}.qweight"].dtype == "I32"
    assert any(s.name == "gptq" for s in cand.schemes.values())


def test_symmetric_qzeros_words_and_trivial_g_idx(rtn_checkpoint):
    _, out = rtn_checkpoint
    for stem, parts in _modules(out).items():
        assert (parts["qzeros"].view(np.uint32) == SYM_QZEROS_WORD).all(), stem
        k = parts["qweight"].shape[0] * 8
        np.testing.assert_array_equal(parts["g_idx"], np.arange(k) // 32)
        assert parts["scales"].dtype == np.float16 and parts["g_idx"].dtype == np.int32


def test_quantization_config_fields(rtn_checkpoint):
    _, out = rtn_checkpoint
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["desc_act"] is False and qc["sym"] is True
    assert qc["format"] == qc["checkpoint_format"] == "gptq" and qc["lm_head"] is False
    assert json.loads((out / "quantize_config.json").read_text()) == qc


def test_routers_embeddings_norms_and_scalars_stay_dense(tiny_gemma4_moe, tmp_path):
    from nvq.quant.gptq_write import GPTQSettings

    out = tmp_path / "out"
    convert(tiny_gemma4_moe, out, "gptq", device="cpu", gptq=GPTQSettings(method="rtn", group_size=32))
    names = _names(out)
    dense = [n for n in names if n.endswith(("router.proj.weight", "router.scale", "router.per_expert_scale",
                                              "layer_scalar", "embed_tokens.weight", "norm.weight"))]
    assert any("router.proj.weight" in n for n in dense) and any("per_expert_scale" in n for n in dense)
    assert not any(n.startswith(tuple(d.rsplit(".", 1)[0] + ".q" for d in dense if "router.proj" in d)) for n in names)
    experts = [n for n in names if ".experts." in n and n.endswith(".qweight")]
    assert experts and all(".gate_proj." in n or ".up_proj." in n or ".down_proj." in n for n in experts)


def test_pack_roundtrip_and_v1_cannot_store_zero_point_zero():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q = int4.quantize(w, 32)
    assert torch.equal(gptq.dequantize(gptq.pack(q)), int4.dequantize(q))
    asym = int4.Int4Quantized(q.codes, q.scale, torch.zeros_like(q.zero), 32)
    with pytest.raises(ValueError, match="zero point of 0"):
        gptq.pack(asym)


def test_v2_and_act_order_g_idx_decode():
    # a v2 asymmetric checkpoint with a permuted g_idx, as GPTQModel writes with desc_act
    torch.manual_seed(1)
    n, k, g = 8, 64, 32
    codes = torch.randint(0, 16, (k, n))
    zeros = torch.randint(1, 16, (k // g, n))
    scales = torch.rand(k // g, n).half()
    g_idx = torch.randperm(k) % (k // g)

    words = _words
    tensors = {"qweight": words(codes.t()).t().contiguous(), "qzeros": words(zeros), "scales": scales, "g_idx": g_idx.int()}
    expect = (scales.float()[g_idx] * (codes - zeros[g_idx]).float()).t()
    assert torch.equal(gptq.dequantize(tensors, "gptq_v2"), expect)
    assert torch.equal(gptq.dequantize(tensors, "gptq"), (scales.float()[g_idx] * (codes - zeros[g_idx] - 1).float()).t())


def test_transformers_gptq_config_reads_the_fields(rtn_checkpoint, monkeypatch):
    # transformers 5.23 parses the quantization_config with GPTQConfig (loading the weights
    # needs gptqmodel + optimum, which vLLM does not; formats.md §4.2). With
    # modules_in_block_to_quantize set it asks optimum's version, as its GPTQ loader does anyway:
    # this venv has no optimum, so it is given the least version that takes the field.
    import importlib.metadata

    from transformers import GPTQConfig

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "1.15.0" if d == "optimum" else real_version(d))
    _, out = rtn_checkpoint
    cfg = GPTQConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.format) == (4, 32, True, False, "gptq")
    assert cfg.modules_in_block_to_quantize and all(isinstance(x, list) for x in cfg.modules_in_block_to_quantize)


def _words(x: torch.Tensor) -> torch.Tensor:
    """[R, 8·C] values 0..15 → [R, C] int32, nibble i = column 8c+i (qzeros packing)."""
    x = x.reshape(x.shape[0], -1, 8).long()
    w = sum(x[..., i] << (4 * i) for i in range(8))
    return torch.where(w >= 2**31, w - 2**32, w).int()


def test_symmetric_qzeros_are_read_not_assumed_to_be_eight():
    # regression: sym checkpoints decoded with the implicit zero 8 whatever qzeros held, while
    # GPTQModel and llama.cpp read qzeros
    torch.manual_seed(2)
    q = int4.quantize(torch.randn(16, 64), 32)
    t = gptq.pack(q)
    assert torch.equal(gptq.dequantize(t), int4.dequantize(q))
    shifted = dict(t, qzeros=_words(torch.full((2, 16), 8)))  # v1 nibble 8: zero point 9
    scale = q.scale.float().repeat_interleave(32, dim=1)
    torch.testing.assert_close(gptq.dequantize(shifted), int4.dequantize(q) - scale, rtol=0, atol=1e-6)
    assert gptq.unpack(t).trivial and (gptq.unpack(shifted).zero == 9).all()


def test_g_idx_out_of_range_or_of_the_wrong_length_is_refused():
    t = gptq.pack(int4.quantize(torch.randn(8, 64), 32))
    with pytest.raises(ValueError, match=r"g_idx\[5\] = 2 is outside \[0, 2\)"):
        gptq.unpack(dict(t, g_idx=torch.where(torch.arange(64) == 5, 2, 0).int()))
    with pytest.raises(ValueError, match="must hold 64 integer group indices"):
        gptq.unpack(dict(t, g_idx=torch.zeros(63, dtype=torch.int32)))


def test_missing_g_idx_means_consecutive_groups():
    q = int4.quantize(torch.randn(8, 64), 16)
    t = {k: v for k, v in gptq.pack(q).items() if k != "g_idx"}
    m = gptq.unpack(t)
    assert m.trivial and m.group_size == 16 and torch.equal(m.weight(), int4.dequantize(q))


def test_act_order_writer_decodes_like_the_spec_and_like_rtn_with_its_groups():
    # the test writer (formats.md §4.3 steps 4, 8, 9) against nvq's reader and nvq's RTN given g_idx
    torch.manual_seed(3)
    w = torch.randn(16, 128) * 2.0 ** torch.randint(-2, 3, (128,))
    for fmt, sym in (("gptq", True), ("gptq_v2", True), ("gptq", False), ("gptq_v2", False)):
        parts = quantize_module(w.numpy(), 32, sym, True, fmt)
        tensors = {k: torch.from_numpy(v) for k, v in parts.items()}
        m = gptq.unpack(tensors, fmt)
        assert not m.trivial and torch.equal(m.g_idx, tensors["g_idx"].long())
        np.testing.assert_array_equal(m.weight().numpy(), decode_spec(*(parts[k] for k in gptq.SUFFIXES), fmt))
        rtn = int4.quantize(w, 32, sym=sym, g_idx=m.g_idx)
        assert torch.equal(rtn.scale.t(), m.scales), (fmt, sym)
        # the writer picks codes with fp32 scales, nvq with the fp16 ones: ties near a step may differ
        same = (rtn.codes.t().long() == m.codes).float().mean()
        assert same > 0.98 and torch.equal(rtn.g_idx, m.g_idx), (fmt, sym, same)


def test_v1_zero_point_zero_is_read_per_nibble_and_flagged_with_gptqmodels_carry():
    # GPTQModel writes v1 by subtracting 0x11111111 per word: a zero point 0 borrows from the next
    # nibble. llama.cpp (and nvq) read nibble + 1 = 16; GPTQModel adds the word back and carries.
    w = torch.randn(8, 32)
    w[0] = w[0].abs()  # row 0 has no negative value: asymmetric zero point 0
    parts = quantize_module(w.numpy(), 32, False, False, "gptq")
    m = gptq.unpack({k: torch.from_numpy(v) for k, v in parts.items()}, "gptq")
    assert m.gptqmodel_zero is not None and int(m.zero[0, 0]) == 16 and int(m.gptqmodel_zero[0, 0]) == 0
    v2 = quantize_module(w.numpy(), 32, False, False, "gptq_v2")
    exact = gptq.unpack({k: torch.from_numpy(v) for k, v in v2.items()}, "gptq_v2")
    assert torch.equal(m.gptqmodel_zero, exact.zero) and exact.gptqmodel_zero is None


def test_int4_rtn_with_a_g_idx_groups_columns_by_it():
    torch.manual_seed(4)
    w = torch.randn(8, 64)
    for sym in (True, False):
        plain = int4.quantize(w, 16, sym=sym)
        indexed = int4.quantize(w, 16, sym=sym, g_idx=torch.arange(64) // 16)
        assert torch.equal(int4.dequantize(plain), int4.dequantize(indexed))
    perm = torch.randperm(64)
    g_idx = torch.empty(64, dtype=torch.long)
    g_idx[perm] = torch.arange(64) // 16  # act-order: group j is permuted columns 16j..16j+15
    indexed = int4.quantize(w, 16, g_idx=g_idx)
    assert torch.equal(int4.dequantize(indexed)[:, perm], int4.dequantize(int4.quantize(w[:, perm], 16)))
    assert torch.equal(gptq.dequantize(gptq.pack(indexed)), int4.dequantize(indexed))
    with pytest.raises(ValueError, match="outside"):
        int4.quantize(w, 16, g_idx=g_idx + 1)
