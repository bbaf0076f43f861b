"""Hugging Face model directories: config.json, the safetensors index, lazy per-tensor reads.

Opening a checkpoint reads headers only; tensors are read one at a time (or by rows) on demand.
Hub ids resolve through the local Hugging Face cache only: nvq never downloads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvq.errors import CheckpointError, ConfigError
from nvq.io.safetensors import INDEX_NAME, TensorInfo, read_header, read_rows, read_tensor

CONFIG_NAME = "config.json"

# Files a converted checkpoint carries over verbatim: tokenizer, generation and processor
# settings, chat templates. config.json is rewritten by the converter, weights are re-encoded.
SIDE_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)

# org/name, as the Hub spells repo ids (letters, digits, '-', '_', '.'; no leading '.' or '-').
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

_MISSING = object()


# config.json and the safetensors index are kilobytes to a few megabytes.
MAX_JSON_BYTES = 64 << 20


def _load_json(path: Path, error: type[Exception]) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; it cannot be a configuration file.")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text.") from None
    except OSError as e:
        raise error(f"{path} cannot be read: {e.strerror or e}.") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}."
        ) from None
    except RecursionError:
        raise error(f"{path} nests JSON too deeply to be a configuration file.") from None
    except ValueError as e:  # an integer literal longer than Python converts (4300 digits)
        raise error(f"{path} cannot be parsed: {e}.") from None


@dataclass
class HFConfig:
    """config.json as read. Fields are looked up in text_config first, then at the top level,
    so multimodal configs (Gemma-4 keeps num_attention_heads only in text_config) just work."""

    path: Path
    raw: dict

    @property
    def text(self) -> dict:
        sub = self.raw.get("text_config")
        return sub if isinstance(sub, dict) else self.raw

    def get(self, key: str, default: Any = None) -> Any:
        value = self.text.get(key, _MISSING)
        if value is _MISSING:
            value = self.raw.get(key, default)
        return value

    def __contains__(self, key: str) -> bool:
        return key in self.text or key in self.raw

    def require(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            where = "top level and in text_config" if self.text is not self.raw else "top level"
            raise ConfigError(f"{self.path}: field '{key}' is missing (looked at {where}).")
        return value

    @property
    def model_type(self) -> str:
        return self.raw["model_type"]

    @property
    def text_model_type(self) -> str:
        """text_config's model_type ("gemma4_text"), else the top-level one."""
        sub = self.text.get("model_type")
        return sub if isinstance(sub, str) else self.model_type

    @property
    def architectures(self) -> list[str]:
        archs = self.raw.get("architectures") or []
        return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def load_config(model_dir: str | Path) -> HFConfig:
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"{model_dir} has no {CONFIG_NAME}; nvq reads Hugging Face model directories, "
            f"which carry one."
        )
    raw = _load_json(path, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a JSON {type(raw).__name__}; it must be an object.")
    if not isinstance(raw.get("model_type"), str) or not raw["model_type"]:
        raise ConfigError(
            f"{path} has no 'model_type' string; nvq needs it to choose the architecture."
        )
    return HFConfig(path, raw)


def _resolve(src: str | Path) -> Path:
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{src} is not a directory; nvq reads a Hugging Face model directory "
                f"(config.json plus *.safetensors) or a Hub id from the local cache."
            )
        return path
    text = str(src)
    if not _HUB_ID.fullmatch(text) or ".." in text:
        raise CheckpointError(
            f"{src} is not a directory (nothing exists at that path) and does not look like a "
            f"Hub id of the form org/name."
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"{src} is not a local directory, and resolving it as a Hub id needs "
            f"huggingface_hub (pip install 'nvq[hub]')."
        ) from None
    try:
        # local_files_only: the cache is consulted, the network never is.
        return Path(snapshot_download(text, local_files_only=True))
    except (OSError, ValueError):
        raise ConfigError(
            f"{src} is neither a local directory nor in the local Hugging Face cache, and nvq "
            f"never downloads; fetch it first (hf download {src}) or pass a directory."
        ) from None


def _link_root(root: Path) -> Path:
    """Where links may point: the checkpoint itself or, for a Hub cache snapshot, the model's
    cache folder, since snapshots link every file to ../../blobs."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def _refuse_outside_link(root: Path, path: Path) -> None:
    """A file linked out of the checkpoint could carry a private file into a shared output."""
    base, target = _link_root(root), path.resolve()
    if target != base and base not in target.parents:
        raise CheckpointError(
            f"{path} links to {target}, outside the checkpoint directory {base}; nvq does not "
            f"follow links out of a checkpoint, copy the file in instead."
        )


def copy_keeping_mode(src: Path, dst: Path) -> None:
    """Copy bytes into a new file whose mode is no wider than the source's (a 0600 file stays
    private); the umask can only narrow it further."""
    mode = os.stat(src).st_mode & 0o666
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _shards_from_index(root: Path, index_path: Path) -> list[tuple[Path, set[str] | None]]:
    """(file, tensors the index places there) for every file the index names."""
    index = _load_json(index_path, CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_path} has no 'weight_map' object mapping tensor names to file names."
        )
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    out = []
    for file in sorted(by_file):
        path = root / file
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise CheckpointError(
                f"{index_path} names shard '{file}', which lies outside the checkpoint directory."
            )
        if not path.is_file():
            first = sorted(by_file[file])[0]
            raise CheckpointError(
                f"{index_path} names shard '{file}' (for tensor '{first}' and "
                f"{len(by_file[file]) - 1} more) but that file is missing."
            )
        out.append((path, by_file[file]))
    return out


@dataclass
class Checkpoint:
    """A lazy view of a Hugging Face model directory: config plus tensor headers, no data.

    With model.safetensors.index.json, the files it names are read and each must hold the
    tensors it places there; a tensor in such a file that the index omits is kept, since engines
    load whole shards. Without an index, every *.safetensors file is read. A tensor stored in
    two files is an error either way.
    """

    path: Path
    config: HFConfig
    tensors: dict[str, TensorInfo]
    file_metadata: dict[Path, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def open(cls, src: str | Path) -> Checkpoint:
        root = _resolve(src)
        for name in (CONFIG_NAME, INDEX_NAME):
            if (root / name).exists():
                _refuse_outside_link(root, root / name)
        config = load_config(root)
        index_path = root / INDEX_NAME
        if index_path.is_file():
            shards = _shards_from_index(root, index_path)
        else:
            files = sorted(
                p for p in root.glob("*.safetensors") if p.is_file() and not p.name.startswith(".")
            )
            shards = [(p, None) for p in files]
        if not shards:
            bins = sorted(p.name for p in root.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: nvq does not read pickle weights)" if bins else ""
            raise CheckpointError(f"{root} holds no *.safetensors weights{hint}.")

        tensors: dict[str, TensorInfo] = {}
        file_metadata: dict[Path, dict[str, str]] = {}
        for path, _ in shards:
            _refuse_outside_link(root, path)
        for path, expected in shards:
            infos, meta = read_header(path)
            file_metadata[path] = meta
            for name in sorted(expected or ()):
                if name not in infos:
                    raise CheckpointError(
                        f"{index_path} places tensor '{name}' in {path.name}, but that file "
                        f"has no such tensor."
                    )
            for name, info in infos.items():
                if name in tensors:
                    raise CheckpointError(
                        f"{root}: tensor '{name}' is stored twice, in "
                        f"{tensors[name].path.name} and in {path.name}."
                    )
                tensors[name] = info
        return cls(root, config, tensors, file_metadata)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor named '{name}'.") from None

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.info(name))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows of the tensor's 2-D view; see nvq.io.safetensors.read_rows."""
        return read_rows(self.info(name), start, stop)

    def side_files(self) -> list[Path]:
        """The SIDE_FILES present here, to copy verbatim into a converted output; a link out of
        the checkpoint is refused."""
        files = [self.path / n for n in SIDE_FILES if (self.path / n).is_file()]
        for f in files:
            _refuse_outside_link(self.path, f)
        return files

    def copy_side_files(self, dst_dir: Path) -> None:
        for f in self.side_files():
            copy_keeping_mode(f, dst_dir / f.name)

    def input_paths(self) -> list[Path]:
        """Every path this checkpoint reads, which an output must never replace or contain."""
        shards = {info.path for info in self.tensors.values()}
        return [self.path, *sorted(shards), *self.side_files()]
