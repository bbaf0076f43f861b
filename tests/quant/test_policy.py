"""The per-tensor plan: what is quantized, kept, split, fused or dropped, and what is refused."""

from __future__ import annotations

import json

import pytest

from nvq.errors import RecipeError, TensorError
from nvq.io.hf import Checkpoint
from nvq.models.base import Role
from nvq.quant.policy import build_plan
from nvq.quant.recipe import load_recipe, parse_recipe


def plan_of(path, scheme="nvfp4", recipe=None):
    return build_plan(Checkpoint.open(path), scheme, recipe or load_recipe(None))


def by_canonical(plan):
    return {u.canonical: u for u in plan.units}


def test_llama_quantizes_linears_and_keeps_the_rest(tiny_llama):
    plan = plan_of(tiny_llama)
    units = by_canonical(plan)
    for i in range(2):
        for stem in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert units[f"blk.{i}.{stem}.weight"].scheme == "nvfp4"
        for stem in ("attn_norm", "ffn_norm"):
            assert units[f"blk.{i}.{stem}.weight"].scheme is None
    assert units["token_embd.weight"].scheme is None
    assert units["output_norm.weight"].scheme is None
    assert plan.ignore_list() == ["lm_head"]


def test_llama_fusion_groups_are_qkv_and_gate_up(tiny_llama):
    units = by_canonical(plan_of(tiny_llama))
    qkv = {units[f"blk.1.attn_{x}.weight"].group for x in "qkv"}
    assert qkv == {"model.layers.1.self_attn:qkv"}
    assert units["blk.1.ffn_gate.weight"].group == units["blk.1.ffn_up.weight"].group == "model.layers.1.mlp:gate_up"
    assert units["blk.1.attn_output.weight"].group is None
    assert units["blk.1.ffn_down.weight"].group is None


def test_untied_lm_head_is_kept_dense(tiny_llama_untied):
    units = by_canonical(plan_of(tiny_llama_untied))
    assert units["output.weight"].scheme is None
    assert units["output.weight"].role is Role.LM_HEAD


def test_gemma4_moe_splits_experts_and_keeps_router_scalars_norms(tiny_gemma4_moe):
    plan = plan_of(tiny_gemma4_moe)
    units = by_canonical(plan)
    cfg = json.loads((tiny_gemma4_moe / "config.json").read_text())["text_config"]
    n_exp, ie, h = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    for e in range(n_exp):
        gate, up = units[f"blk.0.ffn_gate_exps.weight[{e}]"], units[f"blk.0.ffn_up_exps.weight[{e}]"]
        down = units[f"blk.0.ffn_down_exps.weight[{e}]"]
        assert gate.out == f"model.language_model.layers.0.experts.{e}.gate_proj"
        assert up.out == f"model.language_model.layers.0.experts.{e}.up_proj"
        assert down.out == f"model.language_model.layers.0.experts.{e}.down_proj"
        assert gate.rows == (e * 2 * ie, e * 2 * ie + ie) and up.rows == (e * 2 * ie + ie, (e + 1) * 2 * ie)
        assert down.rows == (e * h, (e + 1) * h)
        assert gate.shape == up.shape == (ie, h) and down.shape == (h, ie)
        assert gate.group == up.group and down.group is None
        assert gate.scheme == up.scheme == down.scheme == "nvfp4"
    for dense in ("ffn_gate_inp.weight", "ffn_gate_inp.scale", "ffn_down_exps.scale", "layer_output_scale.weight",
                  "pre_ffw_norm_2.weight", "post_ffw_norm_1.weight", "post_ffw_norm_2.weight", "ffn_norm.weight",
                  "post_ffw_norm.weight", "post_attention_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight"):
        assert units[f"blk.0.{dense}"].scheme is None, dense
    assert units["token_embd.weight"].scheme is None
    routers = [f"model.language_model.layers.{i}.router.proj" for i in range(cfg["num_hidden_layers"])]
    assert set(routers) <= set(plan.ignore_list())


def test_gemma4_k_eq_v_full_layer_has_no_v_proj_and_shares_qk_scale(tiny_gemma4_moe):
    units = by_canonical(plan_of(tiny_gemma4_moe))
    full = 5  # layer_types: 5 sliding then 1 full
    assert f"blk.{full}.attn_v.weight" not in units
    assert units[f"blk.{full}.attn_q.weight"].group == units[f"blk.{full}.attn_k.weight"].group
    assert "blk.0.attn_v.weight" in units


def test_gemma4_kv_shared_layers_drop_vestigial_kv(tiny_gemma4_ple, tmp_path):
    # Google's E2B/E4B files may carry unused k/v/k_norm on KV-shared layers (gemma4.md §3.1):
    # add them to a copy and check they are dropped on purpose, not quantized.
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "ple"
    shutil.copytree(tiny_gemma4_ple, src)
    tensors = load_file(src / "model.safetensors")
    p = "model.language_model.layers.9.self_attn"
    assert f"{p}.k_proj.weight" not in tensors
    tensors[f"{p}.k_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
    tensors[f"{p}.v_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
    tensors[f"{p}.k_norm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    plan = plan_of(src)
    dropped = {m.source for m in plan.dropped}
    assert dropped == {f"{p}.k_proj.weight", f"{p}.v_proj.weight", f"{p}.k_norm.weight"}
    assert all("shares KV" in m.dropped for m in plan.dropped)


def test_gemma4_ple_tables_kept_and_projections_quantized(tiny_gemma4_ple):
    units = by_canonical(plan_of(tiny_gemma4_ple))
    assert units["per_layer_token_embd.weight"].scheme is None
    assert units["per_layer_proj_norm.weight"].scheme is None
    assert units["per_layer_model_proj.weight"].scheme == "nvfp4"
    assert units["blk.0.inp_gate.weight"].scheme == units["blk.0.proj.weight"].scheme == "nvfp4"
    assert units["blk.0.post_norm.weight"].scheme is None


def test_recipe_rule_keeps_matching_tensors(tiny_llama):
    recipe = parse_recipe("rules:\n  - match: 'blk\\.0\\..*'\n    scheme: null\n", "t")
    units = by_canonical(plan_of(tiny_llama, recipe=recipe))
    assert units["blk.0.attn_q.weight"].scheme is None and units["blk.0.attn_q.weight"].rule == 1
    assert units["blk.1.attn_q.weight"].scheme == "nvfp4"
    plan = plan_of(tiny_llama, recipe=recipe)
    assert "model.layers.0.self_attn.q_proj" in plan.ignore_list()


def test_recipe_first_match_wins_and_matches_hf_names(tiny_llama):
    recipe = parse_recipe(
        "rules:\n"
        "  - match: 'model\\.layers\\.1\\.mlp\\.down_proj\\.weight'\n    scheme: nvfp4\n"
        "  - match: '.*ffn_down.*'\n    scheme: null\n",
        "t",
    )
    units = by_canonical(plan_of(tiny_llama, recipe=recipe))
    assert units["blk.1.ffn_down.weight"].scheme == "nvfp4" and units["blk.1.ffn_down.weight"].rule == 1
    assert units["blk.0.ffn_down.weight"].scheme is None and units["blk.0.ffn_down.weight"].rule == 2


def test_recipe_splitting_a_fusion_group_is_refused(tiny_llama):
    recipe = parse_recipe("rules:\n  - match: 'blk\\.0\\.attn_q\\.weight'\n    scheme: null\n", "t")
    with pytest.raises(RecipeError, match="fusion group model.layers.0.self_attn:qkv"):
        plan_of(tiny_llama, recipe=recipe)


def test_recipe_other_scheme_is_refused(tiny_llama):
    recipe = parse_recipe("rules:\n  - match: '.*'\n    scheme: mxfp4\n", "t")
    with pytest.raises(RecipeError, match="one checkpoint holds one scheme"):
        plan_of(tiny_llama, recipe=recipe)


def test_recipe_rule_matching_nothing_quantizable_warns(tiny_llama):
    recipe = parse_recipe("rules:\n  - match: '.*attn_norm.*'\n    scheme: null\n", "t")
    plan = plan_of(tiny_llama, recipe=recipe)
    assert plan.warnings and "rule 1" in plan.warnings[0]
    assert by_canonical(plan)["blk.0.attn_norm.weight"].scheme is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("rules: 3", "'rules' must be a list"),
        ("rules:\n  - match: 'x'\n", "a rule is a mapping"),
        ("rules:\n  - match: '('\n    scheme: null\n", "not a valid regex"),
        ("rules:\n  - match: 'x'\n    scheme: int3\n", "is not one of null"),
        ("rules:\n  - match: 'x'\n    scheme: null\n    bits: 4\n", "unknown key"),
        ("rules: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_problem(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "bad.yaml")


def test_presets_load():
    assert load_recipe("attention-dense").rules
    with pytest.raises(RecipeError, match="neither a file nor a preset"):
        load_recipe("no-such-preset")


def test_input_dim_not_multiple_of_group_is_refused(tmp_path, tiny_llama):
    import shutil

    from tests.support.checkpoints import with_mlp_width

    src = with_mlp_width(shutil.copytree(tiny_llama, tmp_path / "odd"), 120)
    with pytest.raises(TensorError, match=r"model.layers.0.mlp.down_proj.weight: input dimension 120.*group size 16"):
        plan_of(src)
    assert plan_of(src, "mxfp4", parse_recipe("rules:\n  - match: '.*ffn_down.*'\n    scheme: null\n", "t"))


def test_unmapped_tensor_is_an_error_naming_it(tiny_llama, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from nvq.errors import UnmappedTensorError

    src = tmp_path / "extra"
    shutil.copytree(tiny_llama, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mystery.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnmappedTensorError, match=r"model\.layers\.0\.mystery\.weight"):
        plan_of(src)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma4_moe", "tiny_gemma4_ple", "tiny_gemma4_dense"])
def test_every_source_tensor_is_planned(model, request):
    src = request.getfixturevalue(model)
    ckpt = Checkpoint.open(src)
    plan = plan_of(src)
    planned = {u.source for u in plan.units} | {m.source for m in plan.dropped}
    assert planned == set(ckpt.tensors)
