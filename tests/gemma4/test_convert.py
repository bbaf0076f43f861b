"""`nvq convert` of every miniature to NVFP4 and MXFP4 writes what issue 5 item 2 and gemma4.md
§9.5 ask for. The expected output is derived from the source tensor names alone, not from nvq's
name table, so a wrong table row shows up here."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvq.formats import nvfp4
from tests.gemma4.conftest import (
    ALL_SCHEMES,
    CASES,
    KV_SHARING_VARIANTS,
    SCHEMES,
    Case,
    nvq,
    vestigial_key,
)

TOWERS = re.compile(r"model\.(vision_tower|audio_tower|embed_vision|embed_audio|vision_embedder)\.")
# kept dense: every norm, the multipliers, the router, both embedding tables
DENSE = re.compile(
    r".*(norm(_[12])?\.weight|\.layer_scalar|\.router\.proj\.weight|\.router\.scale|\.router\.per_expert_scale"
    r"|\.embed_tokens\.weight|\.embed_tokens_per_layer\.weight)"
)
LINEAR = re.compile(
    r"(?P<module>.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    r"|per_layer_input_gate|per_layer_projection|per_layer_model_projection))\.weight"
)
FUSED_EXPERTS = re.compile(r"(?P<experts>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)")
EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
QUANTIZED_SUFFIXES = {"nvfp4": ("weight_packed", "weight_scale", "weight_global_scale"),
                      "mxfp4": ("weight_packed", "weight_scale"),
                      "gptq": ("qweight", "qzeros", "scales", "g_idx")}  # fmt: skip
CODES = {"nvfp4": ("weight_packed", torch.uint8), "mxfp4": ("weight_packed", torch.uint8), "gptq": ("qweight", torch.int32)}
PARAMS = [pytest.param(c, s, id=f"{c.id}-{s}") for c in CASES for s in ALL_SCHEMES]
CT_PARAMS = [pytest.param(c, s, id=f"{c.id}-{s}") for c in CASES for s in SCHEMES]


def expected_output(source: dict[str, torch.Tensor], scheme: str) -> tuple[set[str], set[str]]:
    """(names copied unchanged, quantized module paths) that the output must hold, nothing else."""
    kept, modules = set(), set()
    for name, t in source.items():
        if TOWERS.match(name) or DENSE.fullmatch(name):
            kept.add(name)
        elif m := LINEAR.fullmatch(name):
            modules.add(m["module"])
        elif m := FUSED_EXPERTS.fullmatch(name):
            modules.update(f"{m['experts']}.{e}.{p}" for e in range(t.shape[0]) for p in EXPERT_PARTS[m["kind"]])
        else:
            raise AssertionError(f"source tensor {name} fits no rule of this test")
    return kept, modules


def raw(t: torch.Tensor) -> tuple[torch.dtype, tuple, bytes]:
    return t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("case, scheme", PARAMS)
def test_output_keeps_dense_quantizes_linears_and_splits_experts(case, scheme, minis):
    source = load_file(minis.original(case) / "model.safetensors")
    out = load_file(minis.converted(case, scheme) / "model.safetensors")
    kept, modules = expected_output(source, scheme)
    quantized = {f"{m}.{s}" for m in modules for s in QUANTIZED_SUFFIXES[scheme]}
    assert set(out) == kept | quantized
    for name in kept:  # towers, norms, scalars, router, embeddings: byte-identical
        assert raw(out[name]) == raw(source[name]), name
    suffix, dtype = CODES[scheme]
    for m in modules:
        assert out[f"{m}.{suffix}"].dtype == dtype
    if case.has_moe:
        assert any(".experts.7.down_proj" in m for m in modules)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fusion_groups_share_one_global_scale(case, minis):
    source = load_file(minis.original(case) / "model.safetensors")
    out = load_file(minis.converted(case, "nvfp4") / "model.safetensors")
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in source.items():
        if (m := LINEAR.fullmatch(name)) and re.search(r"\.(q|k|v|gate|up)_proj$", m["module"]):
            parent, member = m["module"].rsplit(".", 1)
            groups.setdefault(f"{parent}:{'qkv' if member[0] in 'qkv' else 'gate_up'}", []).append((m["module"], t))
        elif (m := FUSED_EXPERTS.fullmatch(name)) and m["kind"] == "gate_up_proj":
            ie = t.shape[1] // 2
            for e in range(t.shape[0]):  # w1 (gate) and w3 (up) of each expert
                groups[f"{m['experts']}.{e}"] = [(f"{m['experts']}.{e}.gate_proj", t[e, :ie]),
                                                 (f"{m['experts']}.{e}.up_proj", t[e, ie:])]  # fmt: skip
    assert groups
    shared_differs = 0
    for key, members in groups.items():
        scales = [out[f"{module}.weight_global_scale"] for module, _ in members]
        amax = max(float(w.abs().max()) for _, w in members)
        want = nvfp4.global_scale(torch.tensor(amax, dtype=members[0][1].dtype), members[0][1].dtype)
        assert all(torch.equal(s.reshape(()), want.reshape(()).to(s.dtype)) for s in scales), key
        own = nvfp4.global_scale(members[-1][1].abs().max(), members[-1][1].dtype)
        shared_differs += not torch.equal(own.reshape(()).to(scales[-1].dtype), scales[-1].reshape(()))
    assert shared_differs  # somewhere a member's own scale differs: the sharing is real


@pytest.mark.parametrize("case", [c for c in CASES if c.variant in ("12b-unified", "26b-a4b", "31b")],
                         ids=lambda c: c.id)
def test_k_eq_v_full_layers_have_no_v_proj(case, minis):
    text = json.loads((minis.original(case) / "config.json").read_text())
    text = text.get("text_config") or text
    out = load_file(minis.converted(case, "nvfp4") / "model.safetensors")
    for i, kind in enumerate(text["layer_types"]):
        attn = next(p for p in (f"model.language_model.layers.{i}.self_attn", f"model.layers.{i}.self_attn")
                    if f"{p}.q_proj.weight_packed" in out)
        has = {x for x in "qkvo" if f"{attn}.{x}_proj.weight_packed" in out}
        assert has == ({"q", "k", "o"} if kind == "full_attention" else {"q", "k", "v", "o"}), i


@pytest.mark.parametrize("case, scheme", CT_PARAMS)
def test_config_written_back_verbatim(case, scheme, minis):
    source = json.loads((minis.original(case) / "config.json").read_text())
    out = json.loads((minis.converted(case, scheme) / "config.json").read_text())
    qc = out.pop("quantization_config")
    assert out == source  # text_config included: both dialects' keys survive as they were
    ignore = qc["ignore"]
    assert "lm_head" in ignore
    routers = {n.removesuffix(".weight") for n in load_file(minis.original(case) / "model.safetensors")
               if n.endswith(".router.proj.weight")}
    assert routers <= set(ignore) and (len(routers) == 6) == case.has_moe
    patterns = [re.compile(p.removeprefix("re:")) for p in ignore if p.startswith("re:")]
    towers = {n.rsplit(".", 1)[0] for n in load_file(minis.original(case) / "model.safetensors") if TOWERS.match(n)}
    assert all(any(p.fullmatch(m) for p in patterns) for m in towers)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gptq_config_written_back_verbatim_and_skips_routers_and_towers(case, minis):
    source = json.loads((minis.original(case) / "config.json").read_text())
    out = json.loads((minis.converted(case, "gptq") / "config.json").read_text())
    qc = out.pop("quantization_config")
    assert out == source
    assert (qc["quant_method"], qc["bits"], qc["sym"], qc["desc_act"]) == ("gptq", 4, True, False)
    skips = [re.compile(k.removeprefix("-:")) for k in qc.get("dynamic", {}) if k.startswith("-:")]
    names = load_file(minis.original(case) / "model.safetensors")
    dense = {n.rsplit(".", 1)[0] for n in names if n.endswith(".router.proj.weight") or TOWERS.match(n)}
    assert all(any(p.match(m) for p in skips) for m in dense)
    quantized = {n.removesuffix(".qweight") for n in load_file(minis.converted(case, "gptq") / "model.safetensors")
                 if n.endswith(".qweight")}
    assert quantized and not any(p.match(m) for p in skips for m in quantized)


@pytest.mark.parametrize("variant", KV_SHARING_VARIANTS)
def test_vestigial_kv_of_shared_layers_tolerated_and_left_out(variant, minis):
    key = vestigial_key(variant)
    plan = nvq("plan", minis.vestigial(variant), "--scheme", "nvfp4", "--json")
    assert plan.exit_code == 0, plan.output
    drops = [r for r in json.loads(plan.output)["tensors"] if r["action"] == "drop"]
    shared = range(5 if variant == "e2b" else 6, 10 if variant == "e2b" else 12)
    want = {f"model.language_model.layers.{i}.self_attn.{t}.weight" for i in shared for t in ("k_proj", "v_proj", "k_norm")}
    assert {r["source"] for r in drops} == want
    assert all("shares KV" in r["reason"] for r in drops)
    # the output is exactly that of the same checkpoint without the vestigial tensors
    clean = minis.converted(Case(variant, "conditional", "global"), "nvfp4")
    got = load_file(minis.converted(key, "nvfp4") / "model.safetensors")
    assert (clean / "model.safetensors").read_bytes() == (minis.converted(key, "nvfp4") / "model.safetensors").read_bytes()
    assert not any(n.endswith(tuple(f"{i}.self_attn.k_proj.weight_packed" for i in shared)) for n in got)


def test_tower_clip_bounds_of_inf_pass_through(minis, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(minis.original(Case("e2b", "conditional", "global")), src)
    tensors = load_file(src / "model.safetensors")
    bounds = [n for n in tensors if n.startswith("model.audio_tower.") and n.endswith(("_min", "_max"))]
    assert bounds
    for n in bounds:  # what Gemma4ClippableLinear holds before a checkpoint sets its bounds
        tensors[n] = torch.full_like(tensors[n], float("-inf") if n.endswith("_min") else float("inf"))
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    result = nvq("convert", src, tmp_path / "out", "--scheme", "nvfp4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(raw(out[n]) == raw(tensors[n]) for n in bounds)
