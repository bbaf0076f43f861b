"""The scheme registry: complete registrations only, lookups by name, the CLI's choices."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nvq import cli, schemes
from nvq.errors import RecipeError


@pytest.fixture
def registry(monkeypatch):
    """The registry with its built-in schemes, restored after the test."""
    schemes.names()  # load the built-in modules first
    monkeypatch.setattr(schemes, "_registry", dict(schemes._registry))
    return schemes


def _renamed(name: str, **changes) -> schemes.SchemeSpec:
    return replace(schemes.get("nvfp4"), name=name, storage_names=(name,), **changes)


@pytest.mark.parametrize("missing", schemes.QUANTIZED_FIELDS)
def test_registration_without_a_required_field_is_refused(registry, missing):
    empty = () if missing == "group_sizes" else ({} if missing == "decoders" else None)
    with pytest.raises(ValueError, match=f"lacks .*{missing}"):
        registry.register(_renamed("partial", **{missing: empty}))
    assert "partial" not in registry.names()


def test_registration_needs_exactly_one_way_to_quantize(registry):
    with pytest.raises(ValueError, match="stream or whole_model"):
        registry.register(_renamed("neither", stream=None))
    with pytest.raises(ValueError, match="stream or whole_model"):
        registry.register(_renamed("both", whole_model=lambda *a: None, settings=object))


def test_a_calibrated_scheme_must_name_its_settings(registry):
    with pytest.raises(ValueError, match="settings"):
        registry.register(_renamed("calibrated", stream=None, whole_model=lambda *a: None))


def test_a_dense_scheme_needs_only_what_storing_does(registry):
    spec = registry.register(
        schemes.SchemeSpec("f8dense", "test", expected=lambda w, s, g, gs: w, dense=True)
    )
    assert registry.get("f8dense") is spec and spec.storage_names == ("f8dense",)
    assert "f8dense" not in registry.quantized_names()


def test_names_and_storage_names_are_unique(registry):
    with pytest.raises(ValueError, match="already registered"):
        registry.register(_renamed("nvfp4"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(replace(_renamed("other"), storage_names=("other", "f32")))


def test_unknown_scheme_names_the_known_ones():
    with pytest.raises(RecipeError, match="choose one of nvfp4, mxfp4, gptq, bf16"):
        schemes.get("int3")
    with pytest.raises(
        RecipeError, match="cannot be written by convert yet; choose one of nvfp4, mxfp4, gptq"
    ):
        schemes.quantizing("bf16")


def test_each_builtin_module_registers_the_scheme_it_is_named_after():
    assert schemes.names() == list(schemes.BUILTIN)
    assert [s.name for s in schemes.all_schemes() if s.dense] == ["bf16"]


def test_cli_scheme_choices_are_the_registry():
    assert [s.value for s in cli.Scheme] == schemes.names()


def test_dense_dtypes_are_modelled_by_the_dense_scheme():
    for storage in ("f32", "bf16", "f16", "f64"):
        assert schemes.storing(storage) is schemes.dense()
    assert schemes.storing("nvfp4") is schemes.get("nvfp4")
    with pytest.raises(KeyError):
        schemes.storing("q4_0")


def test_a_fixed_group_size_refuses_another(registry):
    assert schemes.get("mxfp4").layout(None).group_size == 32
    assert schemes.get("mxfp4").layout(32).group_size == 32
    with pytest.raises(
        RecipeError, match="applies to --scheme gptq; mxfp4 has a fixed group size of 32"
    ):
        schemes.get("mxfp4").layout(16)


def test_a_scheme_module_is_found_by_its_file_name_without_being_imported(tmp_path, monkeypatch):
    # a new scheme is one module file: no list to edit (the CLI's choices come from file names)
    (tmp_path / "toyfmt.py").write_text("raise AssertionError('listing must not import schemes')\n")
    (tmp_path / "compressed_tensors.py").write_text("")
    monkeypatch.setattr(schemes, "__path__", [*schemes.__path__, str(tmp_path)])
    found = schemes._scheme_modules()
    assert found[: len(schemes.CLI_ORDER)] == schemes.CLI_ORDER
    assert found[len(schemes.CLI_ORDER):] == ("toyfmt",)
