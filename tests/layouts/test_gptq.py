"""GPTQ v1 tensors written by nvq, decoded by an independent reader written from formats.md §4.1
(numpy, no nvq code): equal to nvq's dequantization, symmetric qzeros 0x77777777, trivial g_idx,
and the config fields vLLM and transformers read (§4.2)."""

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

SYM_QZEROS_WORD = 0x77777777  # = 2004318071 as int32


def spec_decode(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """formats.md §4.1: nibble i of qweight word (r, n) is q[8r+i, n]; nibble i of qzeros word
    (g, c) is the stored zero of (g, 8c+i); v1 stores z − 1; W[k, n] = scales[g(k), n]·(q − z)."""
    words = qweight.astype(np.int64) & 0xFFFFFFFF
    k8, n = words.shape
    q = np.zeros((k8 * 8, n), dtype=np.int64)
    for i in range(8):
        q[i::8, :] = (words >> (4 * i)) & 0xF
    zw = qzeros.astype(np.int64) & 0xFFFFFFFF
    groups, n8 = zw.shape
    z = np.zeros((groups, n8 * 8), dtype=np.int64)
    for i in range(8):
        z[:, i::8] = ((zw >> (4 * i)) & 0xF) + 1
    s = scales.astype(np.float32)
    w_kn = s[g_idx] * (q - z[g_idx]).astype(np.float32)
    return w_kn.T  # [N, K]


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

    def words(x):  # [R, 8·C] → [R, C] int32, nibble i = column 8c+i
        x = x.reshape(x.shape[0], -1, 8).long()
        w = sum(x[..., i] << (4 * i) for i in range(8))
        return torch.where(w >= 2**31, w - 2**32, w).int()

    tensors = {"qweight": words(codes.t()).t().contiguous(), "qzeros": words(zeros), "scales": scales, "g_idx": g_idx.int()}
    expect = (scales.float()[g_idx] * (codes - zeros[g_idx]).float()).t()
    assert torch.equal(gptq.dequantize(tensors, "gptq_v2"), expect)
    assert torch.equal(gptq.dequantize(tensors, "gptq"), (scales.float()[g_idx] * (codes - zeros[g_idx] - 1).float()).t())


def test_transformers_gptq_config_reads_the_fields(rtn_checkpoint):
    # transformers 5.23 parses the quantization_config with GPTQConfig (loading the weights
    # needs gptqmodel + optimum, which vLLM does not; formats.md §4.2)
    from transformers import GPTQConfig

    _, out = rtn_checkpoint
    cfg = GPTQConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.format) == (4, 32, True, False, "gptq")
