"""`nvq plan --json` of every miniature shows exactly the dense/quantized split of issue 5 item 2:
router projection, router scale, per-expert scale, layer_scalar, every norm and both embedding
tables dense; every Linear quantized, experts split per expert; q/k/v, gate/up and each expert's
w1/w3 in one fusion group; towers kept. The expected split is written from the config alone, in
llama.cpp's tensor names (gemma4.md §4.2)."""

from __future__ import annotations

import json

import pytest

from tests.gemma4.conftest import CASES, nvq


def expected_split(text: dict) -> tuple[set[str], set[str]]:
    """(quantized, dense) canonical names of the decoder."""
    n, types = text["num_hidden_layers"], text["layer_types"]
    first_shared = n - text.get("num_kv_shared_layers", 0)
    ple, experts = text.get("hidden_size_per_layer_input") or 0, text.get("num_experts") or 0
    quantized = set()
    dense = {"token_embd.weight", "output_norm.weight"}
    if ple:
        dense |= {"per_layer_token_embd.weight", "per_layer_proj_norm.weight"}
        quantized.add("per_layer_model_proj.weight")
    for i in range(n):
        b = f"blk.{i}."
        quantized |= {b + s for s in ("attn_q.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")}
        dense |= {b + s for s in ("attn_norm.weight", "attn_q_norm.weight", "post_attention_norm.weight",
                                  "ffn_norm.weight", "post_ffw_norm.weight", "layer_output_scale.weight")}  # fmt: skip
        if i < first_shared:  # KV-shared layers own no K/V
            quantized.add(b + "attn_k.weight")
            dense.add(b + "attn_k_norm.weight")
            if not (text.get("attention_k_eq_v") and types[i] == "full_attention"):
                quantized.add(b + "attn_v.weight")
        if ple:
            quantized |= {b + "inp_gate.weight", b + "proj.weight"}
            dense.add(b + "post_norm.weight")
        if experts:
            dense |= {b + s for s in ("ffn_gate_inp.weight", "ffn_gate_inp.scale", "ffn_down_exps.scale",
                                      "pre_ffw_norm_2.weight", "post_ffw_norm_1.weight", "post_ffw_norm_2.weight")}  # fmt: skip
            quantized |= {f"{b}ffn_{p}_exps.weight[{e}]" for e in range(experts) for p in ("gate", "up", "down")}
    return quantized, dense


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_plan_shows_the_dense_quantized_split(case, minis):
    src = minis.original(case)
    result = nvq("plan", src, "--scheme", "nvfp4", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    raw = json.loads((src / "config.json").read_text())
    quantized, dense = expected_split(raw.get("text_config") or raw)
    rows = plan["tensors"]
    assert not [r for r in rows if r["action"] == "drop"]
    by_action = {"nvfp4": set(), "keep": set()}
    for r in rows:
        if r["role"] != "tower":
            by_action[r["action"]].add(r["canonical"])
    assert by_action == {"nvfp4": quantized, "keep": dense}
    towers = [r for r in rows if r["role"] == "tower"]
    assert all(r["action"] == "keep" and r["output"] == r["source"] for r in towers)
    assert bool(towers) == (case.form == "conditional")
    roles = {r["canonical"]: r["role"] for r in rows if r["canonical"]}
    assert all(roles[c] == "router" for c in dense if c.endswith("ffn_gate_inp.weight"))
    assert all(roles[c] == "scalar" for c in dense if c.endswith((".scale", "layer_output_scale.weight")))

    groups = {r["canonical"]: r["fusion_group"] for r in rows if r["action"] == "nvfp4"}
    for i in range(plan_layers(raw)):
        b = f"blk.{i}."
        qkv = {groups[c] for c in quantized if c.startswith(b) and c[len(b):] in ("attn_q.weight", "attn_k.weight", "attn_v.weight")}
        assert len(qkv) == 1 and None not in qkv
        assert groups[b + "ffn_gate.weight"] == groups[b + "ffn_up.weight"] is not None
        assert groups[b + "ffn_down.weight"] is None and groups[b + "attn_output.weight"] is None
        experts = (raw.get("text_config") or raw).get("num_experts") or 0
        for e in range(experts):
            gate, up = groups[f"{b}ffn_gate_exps.weight[{e}]"], groups[f"{b}ffn_up_exps.weight[{e}]"]
            assert gate == up is not None and groups[f"{b}ffn_down_exps.weight[{e}]"] is None
        assert len({groups[f"{b}ffn_gate_exps.weight[{e}]"] for e in range(experts)}) == experts
    routers = {r["source"].removesuffix(".weight") for r in rows if r["role"] == "router"}
    assert routers <= set(plan["ignore"]) and len(routers) == (6 if case.has_moe else 0)


def plan_layers(raw: dict) -> int:
    return (raw.get("text_config") or raw)["num_hidden_layers"]
