"""Refusals before anything is written: OUT must not be, hold, or sit inside an input, and
--force replaces only a directory that looks like a checkpoint nvq writes."""

from __future__ import annotations

from pathlib import Path

from nvq.errors import OutputExistsError
from nvq.io.hf import CONFIG_NAME, SIDE_FILES
from nvq.io.safetensors import INDEX_NAME

REPLACE_ANY_FLAG = "--force-replace-any"

# Names nvq writes into an output; a directory holding anything else is someone's data.
OUTPUT_NAMES = frozenset(SIDE_FILES) | {CONFIG_NAME, INDEX_NAME, "quantize_config.json"}
OUTPUT_SUFFIXES = (".safetensors",)

# How OUT relates to an input, keyed by (OUT == input, OUT above input, OUT below input).
_OVERLAP_WORDS = {(True, False, False): "is", (False, True, False): "contains",
                  (False, False, True): "is inside"}


def _overlap(out: Path, source: Path) -> str | None:
    o, s = out.resolve(), source.resolve()
    return _OVERLAP_WORDS.get((o == s, o in s.parents, s in o.parents))


def refuse_overlap(out: Path, inputs: list[Path], what: str = "OUT") -> None:
    """OUT equal to, containing, or inside an input would let replacing OUT destroy that input."""
    for source in inputs:
        word = _overlap(out, source)
        if word:
            raise OutputExistsError(
                f"{what} {out} {word} the input {source}; choose an output path outside the inputs."
            )


def refuse_dot_names(out: Path) -> None:
    if out.name in ("", ".", ".."):
        raise OutputExistsError(
            f"{out} names an existing directory ('.', '..' or the root), not a new output; "
            f"give OUT a directory name of its own."
        )


def foreign_entry(out: Path) -> str | None:
    """The first entry of OUT that nvq would not have written, or None."""
    for entry in sorted(out.iterdir()):
        ours = entry.name in OUTPUT_NAMES or entry.name.endswith(OUTPUT_SUFFIXES)
        if not ours or entry.is_symlink() or not entry.is_file():
            return entry.name
    return None


def refuse_foreign_replace(out: Path) -> None:
    """--force replaces a previous nvq output; anything else needs --force-replace-any."""
    stranger = foreign_entry(out)
    if stranger is not None:
        raise OutputExistsError(
            f"{out} does not look like a checkpoint nvq wrote (it holds '{stranger}'); pass "
            f"{REPLACE_ANY_FLAG} to replace it anyway, or choose another output path."
        )
