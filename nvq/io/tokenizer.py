"""A checkpoint's `tokenizer.json`, loaded with the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from nvq.errors import ConfigError


def load_tokenizer(model_dir: Path, instead: str):
    """The tokenizer of `model_dir`; `instead` names what the user can do without one."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json; {instead}.")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("turning text into token ids needs the 'tokenizers' package (pip install tokenizers), "
                          f"or {instead}.") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError(f"{path} cannot be loaded by the tokenizers library ({e}).") from None
