"""Hostile recipe files: alias bombs, nesting bombs, backtracking regexes, binary files."""

from __future__ import annotations

import time

import pytest

from nvq.errors import RecipeError
from nvq.quant.safe_regex import compile_pattern
from tests.reliability.conftest import nvq, refused

ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)

RECIPES = {
    "alias_bomb": (ALIAS_BOMB, "anchors or aliases"),
    "nesting_bomb": ("rules: " + "[" * 100000 + "]" * 100000, "nests deeper"),
    "nested_quantifier": ("rules:\n  - match: '(.+)+X'\n    scheme: null\n", "exponential"),
    "alternation_in_repeat": ("rules:\n  - match: '(a|aa)*X'\n    scheme: null\n", "exponential"),
    "many_open_repeats": ("rules:\n  - match: '.*.*.*.*.*.*X'\n    scheme: null\n", "open-ended repeats"),
    "long_pattern": ("rules:\n  - match: '" + "a" * 5000 + "'\n    scheme: null\n", "characters long"),
    "match_not_a_string": ("rules:\n  - match: [1, 2]\n    scheme: null\n", "must be a string"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_hostile_recipe(llama_copy, tmp_path, case):
    text, match = RECIPES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    started = time.perf_counter()
    refused("convert", llama_copy, out, "--scheme", "nvfp4", "--recipe", recipe, out=out, match=match)
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("payload", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", b"a" * ((1 << 20) + 1)])
def test_binary_or_huge_recipe(llama_copy, tmp_path, payload):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(payload)
    refused("plan", llama_copy, "--scheme", "nvfp4", "--recipe", recipe, match="--recipe")


def test_recipe_fifo_is_not_read(llama_copy, tmp_path):
    import os

    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    # a FIFO is not a regular file, so it is not a recipe path at all
    refused("plan", llama_copy, "--scheme", "nvfp4", "--recipe", fifo, match="recipe")


def test_verify_recipe_alias_bomb(llama_copy, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ALIAS_BOMB)
    out = tmp_path / "cert.json"
    refused("verify", llama_copy, "--oracle", tmp_path / "x.gguf", "--recipe", recipe, "--json", out, out=out,
            match="aliases")


def test_shipped_presets_still_load():
    from nvq.quant.recipe import load_recipe, presets

    for name in presets():
        load_recipe(name)


# The regex rule refuses repeats whose iterations can split one name in several ways, and only those.
CATASTROPHIC = ["(.+)+X", "(a|a)*b", "(a*)*", "(a|aa)*X", r"(\w+\s?)+$", "((ab)+)+", "(a?a)+", "(x+x+)+y",
                "(a|b|ab)*c", "(?:a|)+", "(a{1,2})+", r"(.*a){5}"]
HARMLESS = ["(q|k)+", "(gate|up)_proj+", r"(\.\d+)+", r"(\w+\.)+", r"blk\.\d+\.(attn_(q|k|v)|ffn_(gate|up))\.weight",
            "((gate|up)_proj)+", "(ffn_(gate|up))+", "(a+b)+", "(ab|ac)*", "(a|ab)*", r"(\w+\s)+", "(a?b)+",
            "(a{3})+", r"(?i)(Q|K)+", r"model\.layers\.[0-9]+\..*"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_regex_refused(pattern):
    with pytest.raises(RecipeError, match="exponential time"):
        compile_pattern(pattern, "rule 1")


@pytest.mark.parametrize("pattern", HARMLESS)
def test_harmless_regex_accepted_and_fast(pattern):
    compiled = compile_pattern(pattern, "rule 1")
    started = time.perf_counter()
    for name in ("a" * 300 + "!", "ab" * 150 + "!", "a " * 150 + "!", ".1" * 150 + "!", "q" * 300 + "!"):
        compiled.search(name)
    assert time.perf_counter() - started < 1


def test_harmless_regex_through_convert_plan(llama_copy, tmp_path):
    # `(gate|up)_proj+` used to be refused as a nested repeat
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - match: '(gate|up)_proj+'\n    scheme: null\n  - match: '(q|k)+_proj'\n    scheme: null\n")
    result = nvq("plan", llama_copy, "--scheme", "nvfp4", "--recipe", recipe)
    assert result.exit_code == 0, result.output
