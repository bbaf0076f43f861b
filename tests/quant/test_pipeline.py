"""Streaming convert: output bytes equal the reference codecs, nothing dropped, deterministic."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvq.errors import OutputExistsError, TensorError
from nvq.formats import e2m1, mxfp4, nvfp4
from nvq.quant import pipeline
from nvq.quant.pipeline import convert


def load_dir(path):
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors |= load_file(f)
    return tensors


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def llama_nvfp4(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "llama-nvfp4"
    summary = convert(tiny_llama, out, "nvfp4", device="cpu")
    return out, summary


def test_nvfp4_bytes_equal_reference_codec_with_shared_group_scale(tiny_llama, llama_nvfp4):
    out, _ = llama_nvfp4
    src, got = load_dir(tiny_llama), load_dir(out)
    for layer in range(2):
        p = f"model.layers.{layer}"
        groups = [
            [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"],
            [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"],
            [f"{p}.self_attn.o_proj"],
            [f"{p}.mlp.down_proj"],
        ]
        for group in groups:
            amax = torch.stack([nvfp4.tensor_amax(src[f"{m}.weight"]) for m in group]).max()
            g = nvfp4.global_scale(amax, torch.bfloat16)
            for m in group:
                q = nvfp4.quantize(src[f"{m}.weight"], global_scale=g)
                assert torch.equal(got[f"{m}.weight_packed"], e2m1.pack_pairs(q.codes)), m
                assert torch.equal(got[f"{m}.weight_scale"].view(torch.uint8), q.block_scale.view(torch.uint8)), m
                assert torch.equal(got[f"{m}.weight_global_scale"], g), m
                assert f"{m}.weight" not in got


def test_kept_tensors_and_side_files_are_copied_verbatim(tiny_llama, llama_nvfp4):
    out, _ = llama_nvfp4
    src, got = load_dir(tiny_llama), load_dir(out)
    kept = [n for n in src if "norm" in n or "embed" in n]
    assert kept
    for n in kept:
        assert got[n].dtype == src[n].dtype and torch.equal(got[n], src[n]), n
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (tiny_llama / f).read_bytes()


def test_config_keeps_original_keys_and_adds_quantization_config(tiny_llama, llama_nvfp4):
    out, _ = llama_nvfp4
    original = json.loads((tiny_llama / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    qc = written.pop("quantization_config")
    assert written == original
    assert qc["format"] == "nvfp4-pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["ignore"] == ["lm_head"]
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "tensor_group"


def test_summary_counts(llama_nvfp4):
    _, s = llama_nvfp4
    assert s.quantized == 14 and s.dropped == 0
    assert s.kept == 2 * 2 + 2  # per-layer norms, final norm, embedding
    assert s.bits_per_quantized_weight == pytest.approx(4.5, abs=0.01)  # 4 + 8/16, plus one fp32 per module
    assert 4.5 < s.bits_per_weight < 16


def test_same_inputs_give_same_bytes_and_chunking_does_not_change_them(tiny_llama, llama_nvfp4, tmp_path, monkeypatch):
    out, _ = llama_nvfp4
    again = tmp_path / "again"
    convert(tiny_llama, again, "nvfp4", device="cpu")
    assert digest(again) == digest(out)
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 100)  # many row chunks per tensor
    monkeypatch.setattr(pipeline, "GROUP_CACHE_BYTES", 0)  # two streaming passes per group
    chunked = tmp_path / "chunked"
    convert(tiny_llama, chunked, "nvfp4", device="cpu")
    assert digest(chunked) == digest(out)


def test_sharded_output_has_an_index_and_same_tensors(tiny_llama, llama_nvfp4, tmp_path):
    out, _ = llama_nvfp4
    sharded = tmp_path / "sharded"
    convert(tiny_llama, sharded, "nvfp4", device="cpu", max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2
    a, b = load_dir(out), load_dir(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    for name, file in index["weight_map"].items():
        with safe_open(sharded / file, "pt") as f:
            assert name in f.keys()


def test_mxfp4_bytes_equal_reference_codec(tiny_llama, tmp_path):
    out = tmp_path / "mx"
    convert(tiny_llama, out, "mxfp4", device="cpu")
    src, got = load_dir(tiny_llama), load_dir(out)
    m = "model.layers.1.mlp.down_proj"
    q = mxfp4.quantize(src[f"{m}.weight"])
    assert torch.equal(got[f"{m}.weight_packed"], e2m1.pack_pairs(q.codes))
    assert torch.equal(got[f"{m}.weight_scale"], q.scale)
    assert got[f"{m}.weight_scale"].shape == (64, 128 // 32)
    assert f"{m}.weight_global_scale" not in got
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mxfp4-pack-quantized"


def test_gemma4_moe_experts_written_per_expert_with_shared_gate_up_scale(tiny_gemma4_moe, tmp_path):
    out = tmp_path / "g4"
    convert(tiny_gemma4_moe, out, "nvfp4", device="cpu")
    src, got = load_dir(tiny_gemma4_moe), load_dir(out)
    p = "model.language_model.layers.2"
    gate_up, down = src[f"{p}.experts.gate_up_proj"], src[f"{p}.experts.down_proj"]
    ie = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        gate, up = gate_up[e, :ie], gate_up[e, ie:]
        g = nvfp4.global_scale(torch.maximum(nvfp4.tensor_amax(gate), nvfp4.tensor_amax(up)), torch.bfloat16)
        for name, w, scale in (("gate_proj", gate, g), ("up_proj", up, g), ("down_proj", down[e], None)):
            q = nvfp4.quantize(w.contiguous(), global_scale=scale)
            m = f"{p}.experts.{e}.{name}"
            assert torch.equal(got[f"{m}.weight_packed"], e2m1.pack_pairs(q.codes)), m
            assert torch.equal(got[f"{m}.weight_global_scale"], q.global_scale), m
    assert f"{p}.experts.gate_up_proj" not in got and f"{p}.experts.down_proj" not in got
    for dense in ("router.proj.weight", "router.scale", "router.per_expert_scale", "layer_scalar"):
        assert torch.equal(got[f"{p}.{dense}"], src[f"{p}.{dense}"]), dense
    original = json.loads((tiny_gemma4_moe / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    written.pop("quantization_config")
    assert written == original  # text_config written back verbatim


def test_existing_output_is_refused_without_force(tiny_llama, llama_nvfp4):
    out, _ = llama_nvfp4
    before = digest(out)
    with pytest.raises(OutputExistsError):
        convert(tiny_llama, out, "mxfp4", device="cpu")
    assert digest(out) == before


def test_force_replaces_existing_output(tiny_llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "model-00001-of-00009.safetensors").write_text("x")  # an earlier output's shard
    convert(tiny_llama, out, "mxfp4", device="cpu", force=True)
    assert not (out / "model-00001-of-00009.safetensors").exists() and (out / "config.json").exists()


def test_nan_weight_is_refused_and_nothing_is_written(tiny_llama, tmp_path):
    src = tmp_path / "nan"
    shutil.copytree(tiny_llama, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 17] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(TensorError, match=r"model.layers.1.mlp.up_proj.weight holds NaN at row 3, column 17"):
        convert(src, out, "nvfp4", device="cpu")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["nan"]  # no temporary sibling left behind


def test_fp16_group_with_small_amax_is_quantized_in_fp32(tiny_llama, tmp_path):
    # compressed-tensors' fp16 arithmetic overflows 2688/amax for amax < 0.041 and zeroes the
    # weight (formats.md §1.5); nvq quantizes such groups with fp32 arithmetic and says so.
    src = tmp_path / "fp16"
    shutil.copytree(tiny_llama, src)
    tensors = {k: v.to(torch.float16) for k, v in load_file(src / "model.safetensors").items()}
    tensors["model.layers.0.mlp.down_proj.weight"] *= 0.01
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    summary = convert(src, out, "nvfp4", device="cpu")
    assert summary.fp32_groups == ["model.layers.0.mlp.down_proj"]
    got = load_dir(out)
    q = nvfp4.quantize(tensors["model.layers.0.mlp.down_proj.weight"].float())
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight_packed"], e2m1.pack_pairs(q.codes))
    assert got["model.layers.0.mlp.down_proj.weight_packed"].any()
