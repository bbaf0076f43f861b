"""The architecture registry: registration checks every member of the protocol, and a module
that passes is found by config and by GGUF with no edit anywhere else."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

import nvq.models as models
from nvq.errors import ConfigError
from nvq.io.gguf_model import GGUFModel
from nvq.io.gguf_to_hf import hf_name_map
from nvq.io.hf import HFConfig
from nvq.models import llama
from nvq.models.protocol import MEMBERS, ArchModule, ProtocolError, check
from tests.test_gguf_convert import SMALL_LLAMA, write_small_gguf

REGISTRIES = ("ARCHITECTURES", "REGISTRY", "GGUF_READERS")


@pytest.fixture
def registry():
    """The registries as they are now, restored in place after the test (importers hold them)."""
    saved = {name: dict(getattr(models, name)) for name in REGISTRIES}
    yield
    for name, entries in saved.items():
        getattr(models, name).clear()
        getattr(models, name).update(entries)


def llama_like(name: str, **members) -> types.ModuleType:
    """A module with every protocol member of llama, then `members` (None deletes one)."""
    module = types.ModuleType(f"nvq.models.{name}")
    for m in MEMBERS:
        setattr(module, m.name, getattr(llama, m.name))
    module.MODEL_TYPES = (name,)
    module.GGUF_SPEC = None
    for key, value in members.items():
        if value is None:
            delattr(module, key)
        else:
            setattr(module, key, value)
    return module


@pytest.mark.parametrize("member", [m.name for m in MEMBERS])
def test_registration_names_the_module_and_the_missing_member(registry, member):
    with pytest.raises(ProtocolError, match=rf"nvq\.models\.broken has no member {member} "):
        models.register(llama_like("broken", **{member: None}))
    assert "broken" not in models.ARCHITECTURES and "broken" not in models.REGISTRY


def _forward_without_observer(config, tensors, token_ids, taps=None, dtype=None, device="cpu"):
    return llama.forward(config, tensors, token_ids, taps, dtype, device)


@pytest.mark.parametrize(
    ("member", "value"),
    [
        ("MODEL_TYPES", "broken"),  # a string, not a tuple of them
        ("MODEL_TYPES", ()),
        ("TABLE", llama.TABLE.rows),
        ("BLAME", (r"token_embd\..*", ("embd",))),
        ("GGUF_SPEC", {"architecture": "X"}),
        ("forward", _forward_without_observer),
        ("head", "not a function"),
    ],
)
def test_registration_refuses_a_member_of_the_wrong_kind(registry, member, value):
    with pytest.raises(ProtocolError, match=rf"nvq\.models\.broken: member {member} is not "):
        models.register(llama_like("broken", **{member: value}))


def test_registration_refuses_a_model_type_or_gguf_another_module_reads(registry):
    with pytest.raises(
        ProtocolError, match=r"claims model_type 'mistral', which nvq\.models\.mistral"
    ):
        models.register(llama_like("other", MODEL_TYPES=("other", "mistral")))
    with pytest.raises(ProtocolError, match=r"reads 'llama' GGUFs, which nvq\.models\.llama"):
        models.register(llama_like("other", GGUF_SPEC=llama.GGUF_SPEC))
    assert models.REGISTRY["mistral"] == "mistral" and "other" not in models.REGISTRY


def test_every_architecture_module_of_the_package_is_registered_and_satisfies_the_protocol():
    names = {m.name for m in pkgutil.iter_modules(models.__path__)} - models.SHARED_MODULES
    assert (
        names
        == set(models.ARCHITECTURES)
        >= {"llama", "mistral", "qwen3", "qwen3_moe", "gemma3", "gemma4"}
    )
    for name, module in models.ARCHITECTURES.items():
        assert check(module) is module
        assert {models.REGISTRY[t] for t in module.MODEL_TYPES} == {name}
        # the GGUF llama.cpp makes of it has a reader: itself, or the module it shares the GGUF with
        reader = models.GGUF_READERS[module.GGUF_ARCH]
        assert (
            reader == name
            if module.GGUF_SPEC is not None
            else models.ARCHITECTURES[reader].GGUF_SPEC is not None
        )
    assert (
        models.GGUF_READERS["llama"] == "llama"
        and models.ARCHITECTURES["mistral"].GGUF_SPEC is None
    )


def test_the_checked_members_are_the_protocol_s():
    assert [m.name for m in MEMBERS] == list(ArchModule.__annotations__)


def test_an_internal_module_name_is_no_model_type():
    for name in models.SHARED_MODULES | {"__init__"}:
        assert name not in models.REGISTRY


def test_a_new_architecture_module_is_found_by_config_and_by_gguf(registry, tmp_path):
    path = write_small_gguf(tmp_path / "toy.gguf", "toyllama", SMALL_LLAMA)
    with pytest.raises(ConfigError, match="'toyllama' GGUF; nvq reads"):
        GGUFModel.open(path)
    toy = models.register(importlib.import_module("tests.models.toy_arch"))

    model = GGUFModel.open(path)
    assert (model.arch_name, model.config["model_type"]) == ("toy_arch", "toyllama")
    arch = models.for_config(HFConfig(path, model.config))
    assert (arch.name, arch.module, arch.gguf_arch) == ("toy_arch", toy, "toyllama")
    assert arch.config.num_layers == 1 and arch.config.head_dim == 4
    alias = models.for_config(HFConfig(path, {**model.config, "model_type": "toyllama_text"}))
    assert alias.name == "toy_arch"
    targets, dropped = hf_name_map(model)
    assert dropped == {}
    assert {t.unit.canonical: t.hf for t in targets}[
        "blk.0.attn_q.weight"
    ] == "model.layers.0.self_attn.q_proj.weight"
    assert len(targets) == len(SMALL_LLAMA)
