"""Recipes: ordered rules that override the architecture's default policy, tensor by tensor.

A recipe is a YAML (or JSON) file, or the name of a preset shipped in `recipes/`:

    rules:
      - match: 'blk\\.0\\..*'       # regex, full match against the canonical (GGUF) or the HF name
        scheme: null               # null = keep in high precision
      - match: '.*\\.ffn_down\\..*'
        scheme: nvfp4              # quantize with the run's scheme

The first matching rule wins. Rules only decide for quantizable tensors (Linear weights and expert
stacks); norms, embeddings, routers, scalars and towers always stay dense.

An optional `verify:` mapping holds `nvq verify`'s thresholds (factor, tap_floor, weight_floor,
kld_floor); nvq.verify.run reads and checks it, convert ignores it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from nvq import limits, schemes
from nvq.errors import ConfigError, RecipeError
from nvq.quant.safe_regex import compile_pattern

_RULE_KEYS = {"match", "scheme", "note"}
MAX_RECIPE_BYTES = 1 << 20  # recipes are a few dozen lines
MAX_RECIPE_DEPTH = 8  # rules → rule → value is three levels


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    scheme: str | None
    index: int  # 1-based position, for messages

    def matches(self, names: tuple[str, ...]) -> bool:
        return any(self.pattern.fullmatch(n) for n in names if n)


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def first_match(self, names: tuple[str, ...]) -> Rule | None:
        return next((r for r in self.rules if r.matches(names)), None)


def presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("nvq.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(spec: str | Path | None) -> Recipe:
    """A path to a recipe file, a preset name, or None for the architecture's defaults only."""
    if spec is None:
        return Recipe(name="default")
    path = Path(spec)
    if path.is_file():
        text = read_recipe_text(path)
        name = str(path)
    elif str(spec) in presets():
        text = resources.files("nvq.recipes").joinpath(f"{spec}.yaml").read_text(encoding="utf-8")
        name = str(spec)
    else:
        raise RecipeError(f"recipe '{spec}' is neither a file nor a preset; presets: {', '.join(presets())}.")
    return parse_recipe(text, name)


def read_recipe_text(path: Path) -> str:
    """A recipe file's text: regular, at most MAX_RECIPE_BYTES, UTF-8."""
    try:
        return limits.read_text_file(path, "--recipe", MAX_RECIPE_BYTES)
    except ConfigError as e:
        raise RecipeError(str(e)) from None


def safe_yaml(text: str, name: str) -> object:
    """yaml.safe_load, refusing anchors and aliases (a few hundred bytes of nested aliases expand
    to gigabytes) and nesting deeper than MAX_RECIPE_DEPTH (the composer recurses per level)."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise RecipeError(f"recipe {name} uses YAML anchors or aliases (&, *); write each value out.")
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_RECIPE_DEPTH:
                raise RecipeError(f"recipe {name} nests deeper than {MAX_RECIPE_DEPTH} levels.")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {name} is not valid YAML: {_one_line(e)}.") from None


def parse_recipe(text: str, name: str) -> Recipe:
    data = safe_yaml(text, name)
    if data is None:
        return Recipe(name=name)
    if not isinstance(data, dict) or set(data) - {"rules", "description", "verify"}:
        raise RecipeError(f"recipe {name} must be a mapping with a 'rules' list (and optional 'description', 'verify').")
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise RecipeError(f"recipe {name}: 'rules' must be a list of {{match, scheme}} mappings.")
    return Recipe(name=name, rules=tuple(_parse_rule(r, i, name) for i, r in enumerate(raw_rules, 1)))


def _parse_rule(raw: object, index: int, name: str) -> Rule:
    where = f"recipe {name}, rule {index}"
    if not isinstance(raw, dict) or "match" not in raw or "scheme" not in raw:
        raise RecipeError(f"{where}: a rule is a mapping with 'match' (regex) and 'scheme' (null or a scheme).")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}.")
    scheme = raw["scheme"]
    if scheme is not None and scheme not in schemes.quantized_names():
        raise RecipeError(f"{where}: scheme {scheme!r} is not one of null, {', '.join(schemes.quantized_names())}.")
    if not isinstance(raw["match"], str):
        raise RecipeError(f"{where}: match must be a string (a regex), not {type(raw['match']).__name__}.")
    pattern = compile_pattern(raw["match"], where)
    return Rule(pattern=pattern, scheme=scheme, index=index)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
