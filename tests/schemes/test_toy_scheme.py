"""A scheme added by registering one module's worth of facts, with no edit anywhere else: plan,
convert and the written config pick it up by name."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from nvq import schemes
from nvq.io.hf import Checkpoint
from nvq.io.safetensors import OutputTensor
from nvq.quant.pipeline import convert, plan_convert
from nvq.quant.policy import build_plan
from nvq.quant.recipe import parse_recipe

NAME = "int8g32"  # int8 codes, one fp32 absmax scale per 32 inputs
GROUP = 32


@dataclass(frozen=True)
class Int8Layout:
    group_size: int = GROUP

    def output_tensors(self, module, shape):
        n, k = shape
        return [
            OutputTensor(f"{module}.qweight", "I8", (n, k)),
            OutputTensor(f"{module}.qscale", "F32", (n, k // self.group_size)),
        ]

    def shape_problem(self, shape):
        return (
            None
            if shape[1] % self.group_size == 0
            else f"K {shape[1]} is not a multiple of {self.group_size}"
        )


def _quantize(x, global_scale=None):
    blocks = x.float().reshape(x.shape[0], -1, GROUP)
    scale = blocks.abs().amax(-1).clamp(min=1e-12) / 127
    return (blocks / scale[..., None]).round().to(torch.int8).reshape(x.shape), scale


def _decode(t):
    q, s = t["qweight"].float(), t["qscale"]
    return (q.reshape(q.shape[0], -1, GROUP) * s[..., None]).reshape(q.shape)


def _pack(codes, scale):
    return {"qweight": codes, "qscale": scale}


TOY = schemes.SchemeSpec(
    name=NAME,
    summary="int8 per group of 32 (test only)",
    expected=lambda w, storage, groups, g: _decode(_pack(*_quantize(w))),
    group_sizes=(GROUP,),
    layout=schemes.fixed_group(NAME, Int8Layout()),
    encode=lambda w, group_size: _pack(*_quantize(w)),
    stream=schemes.StreamOps(
        _quantize,
        lambda stack: (*_quantize(stack.flatten(0, 1)), None),
        _pack,
        "mxfp4_quantize_packed",
        "mxfp4_quantize_packed",
    ),
    decoders={
        "toy": schemes.Decoder("qweight", ("qweight", "qscale"), _decode, lambda s: s["qweight"])
    },
    scale_block=lambda storage, k: GROUP,
    quantization_config=lambda plan, settings: {
        "quant_method": "toy-int8",
        "ignore": plan.ignore_list(),
    },
)


@pytest.fixture
def toy(monkeypatch):
    schemes.names()
    monkeypatch.setattr(schemes, "_registry", dict(schemes._registry))
    return schemes.register(TOY)


def test_toy_scheme_is_planned_by_name(toy, tiny_llama):
    plan = plan_convert(tiny_llama, NAME)
    assert plan.quantized and {u.scheme for u in plan.quantized} == {NAME}
    assert plan.group_size == GROUP
    names = {t.name for t in plan.output_tensors()}
    assert {f"{u.out}.{s}" for u in plan.quantized for s in ("qweight", "qscale")} <= names
    # a recipe may name it, like any scheme
    recipe = parse_recipe(f"rules:\n  - match: '.*ffn_down.*'\n    scheme: {NAME}\n", "toy.yaml")
    assert build_plan(Checkpoint.open(tiny_llama), NAME, recipe).quantized


def test_toy_scheme_converts_and_writes_its_own_config(toy, tiny_llama, tmp_path):
    summary = convert(tiny_llama, tmp_path / "out", NAME, device="cpu")
    assert summary.quantized > 0 and summary.scheme == NAME
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "toy-int8"
    out = Checkpoint.open(tmp_path / "out")
    src = Checkpoint.open(tiny_llama)
    module = "model.layers.0.mlp.down_proj"
    got = _decode({p: out.read(f"{module}.{p}") for p in ("qweight", "qscale")})
    assert torch.equal(got, _decode(_pack(*_quantize(src.read(f"{module}.weight")))))


def test_unregistered_scheme_is_refused_with_the_known_ones(tiny_llama):
    from nvq.errors import RecipeError

    with pytest.raises(RecipeError, match="choose one of"):
        plan_convert(tiny_llama, NAME)
