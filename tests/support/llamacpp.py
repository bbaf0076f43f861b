"""llama.cpp's HF -> GGUF converter, taken from the llama-cpp-python 0.3.36 sdist.

The converter (``vendor/llama.cpp/convert_hf_to_gguf.py`` + ``conversion/``)
is pure Python and needs only torch, transformers, numpy (and sentencepiece /
protobuf for ``tokenizer.model`` inputs). It imports the gguf-py vendored next
to it, which is newer than PyPI gguf 0.19.0; that vendored copy is only ever
imported in child processes, so it never clashes with the installed ``gguf``.

Cache layout (``$NVQ_CACHE_DIR``, default ``~/.cache/nvq``)::

    llama_cpp_python-0.3.36.tar.gz            the sdist (pip download)
    llama_cpp_python-0.3.36-converter/        extracted once, atomically
        convert_hf_to_gguf.py, conversion/, gguf-py/, models/templates/, LICENSE

Gemma-3: the converter reads Gemma-3 vocabularies only from a SentencePiece
``tokenizer.model`` (a ``tokenizer.json``-only checkpoint goes to the GPT-2
path and fails the pre-tokenizer hash check). ``tiny_models.build_tiny_gemma3``
therefore writes a ``tokenizer.model``, so no converter patching is needed.

Run as a script (``python llamacpp.py _dump GGUF OUTDIR``) with the vendored
gguf-py first on ``PYTHONPATH``, this file is also the reader helper used by
:func:`read_gguf`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "LLAMA_CPP_PYTHON_VERSION",
    "GGUFContents",
    "cache_dir",
    "convert_many_to_gguf",
    "convert_to_gguf",
    "converter_dir",
    "read_gguf",
    "sdist_path",
]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_SDIST_ROOT = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# What the converter touches at run time, relative to vendor/llama.cpp/:
# the driver, its `conversion` package, the vendored gguf-py (put on sys.path
# by the driver), chat templates read by some model classes (Mistral, RWKV,
# DeepSeek, MiniMax, Kimi) and the licence.
_EXTRACT_FILES = ("convert_hf_to_gguf.py", "LICENSE")
_EXTRACT_DIRS = ("conversion/", "gguf-py/", "models/templates/")
_CONVERTER_DIR_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-converter"

_PIP_TIMEOUT_S = 600
_CONVERT_TIMEOUT_S = 300
_READ_TIMEOUT_S = 300


def cache_dir() -> Path:
    d = Path(os.environ.get("NVQ_CACHE_DIR") or "~/.cache/nvq").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def pypi_file(filename: str, requirement: str, *pip_args: str) -> Path:
    """`filename` from $NVQ_CACHE_DIR, else fetched once with `pip download --no-deps
    [pip_args] requirement` (PyPI is reachable in CI). It is downloaded into a private directory
    and renamed, so concurrent callers never see a partial file. RuntimeError if unobtainable."""
    cache = cache_dir()
    path = cache / filename
    if path.is_file():
        return path
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args, requirement, "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"pip download of {requirement} timed out after {e.timeout} s") from e
        got = tmp / filename
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(
                f"could not obtain {filename} (looked in {cache}; `{' '.join(cmd)}` "
                f"exited {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
            )
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def sdist_path() -> Path:
    """The llama-cpp-python 0.3.36 sdist, downloaded from PyPI if not cached."""
    return pypi_file(_SDIST_NAME, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "--no-binary", ":all:")


def _wanted(rel: str) -> bool:
    return rel in _EXTRACT_FILES or rel.startswith(_EXTRACT_DIRS)


def converter_dir() -> Path:
    """The extracted llama.cpp directory holding ``convert_hf_to_gguf.py``."""
    cache = cache_dir()
    final = cache / _CONVERTER_DIR_NAME
    if (final / "convert_hf_to_gguf.py").is_file():
        return final
    sdist = sdist_path()
    tmp = Path(tempfile.mkdtemp(prefix=".converter-", dir=cache))
    try:
        staged = tmp / "llama.cpp"
        staged.mkdir()
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                if not member.name.startswith(_SDIST_ROOT):
                    continue
                rel = member.name[len(_SDIST_ROOT) :]
                if not _wanted(rel) or not (member.isfile() or member.isdir()):
                    continue
                if ".." in Path(rel).parts or Path(rel).is_absolute():
                    raise RuntimeError(f"refusing to extract {member.name!r} from {sdist}")
                dest = staged / rel
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with src, open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"{sdist} has no {_SDIST_ROOT}convert_hf_to_gguf.py")
        try:
            os.rename(staged, final)
        except OSError:
            # Lost a race against another process: use its copy.
            if not (final / "convert_hf_to_gguf.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tail(text: str, n_lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n_lines:])


def _child_env(extra_pythonpath: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its vendored gguf-py
    env["HF_HUB_OFFLINE"] = "1"  # never download anything
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if extra_pythonpath is not None:
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(extra_pythonpath) + (os.pathsep + old if old else "")
    return env


def convert_to_gguf(
    hf_dir: str | Path,
    out_file: str | Path,
    outtype: str = "f32",
    extra_args: tuple[str, ...] | list[str] = (),
    timeout: float = _CONVERT_TIMEOUT_S,
) -> Path:
    """Run ``convert_hf_to_gguf.py HF_DIR --outfile OUT --outtype OUTTYPE *extra_args``.

    Raises RuntimeError with the tail of the converter's output on failure.
    """
    script = converter_dir() / "convert_hf_to_gguf.py"
    out = Path(out_file).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, str(script), str(Path(hf_dir).resolve()),
        "--outfile", str(out), "--outtype", outtype, *extra_args,
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout,
            env=_child_env(), cwd=str(out.parent),
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"convert_hf_to_gguf.py timed out after {timeout} s: {cmd}") from e
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"convert_hf_to_gguf.py failed (exit {proc.returncode}) on {hf_dir}:\n"
            f"{_tail(proc.stderr or proc.stdout)}"
        )
    return out


def convert_many_to_gguf(
    jobs: list[tuple[str | Path, str | Path]],
    outtype: str = "f32",
    timeout: float = _CONVERT_TIMEOUT_S,
    sentencepiece_vocab: bool = False,
) -> list[Path | RuntimeError]:
    """:func:`convert_to_gguf` of every ``(hf_dir, out_file)`` in one child process.

    The converter's imports (torch, transformers) cost more than converting a tiny model, so
    they are paid once. Returns, per job, the GGUF path or a RuntimeError with the converter's
    traceback; one failing job does not stop the others.

    ``sentencepiece_vocab``: model classes that inherit the converter's default vocabulary reader
    (GPT-2 BPE, which accepts only pre-tokenizers it knows by hash; e.g. Qwen3-MoE) read the
    checkpoint's ``tokenizer.model`` instead, as the dense Qwen classes already do. Only the
    vocabulary changes; tensors and hyper-parameters go through the converter untouched.
    """
    if not jobs:
        return []
    script = converter_dir() / "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory(prefix="nvq-convert-") as tmp:
        spec = [
            [str(Path(src).resolve()), str(Path(out).resolve()), outtype, sentencepiece_vocab] for src, out in jobs
        ]
        for _, out, _, _ in spec:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "jobs.json").write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "_convert_many", str(script), tmp]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout * len(jobs),
                env=_child_env(), cwd=tmp,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"batch conversion timed out after {e.timeout} s: {cmd}") from e
        results_path = Path(tmp) / "results.json"
        if proc.returncode != 0 or not results_path.is_file():
            raise RuntimeError(
                f"batch conversion failed (exit {proc.returncode}):\n{_tail(proc.stderr or proc.stdout)}"
            )
        errors = json.loads(results_path.read_text())
    results: list[Path | RuntimeError] = []
    for (src, out, _, _), error in zip(spec, errors, strict=True):
        if error is None and Path(out).is_file():
            results.append(Path(out))
        else:
            results.append(RuntimeError(f"convert_hf_to_gguf.py failed on {src}:\n{_tail(error or '')}"))
    return results


class GGUFContents(NamedTuple):
    """What :func:`read_gguf` returns; unpacks as ``(metadata, tensors, types)``."""

    metadata: dict[str, Any]
    """key -> value (str, int, float, bool or list); the reader's ``GGUF.*`` pseudo-keys excluded."""
    tensors: dict[str, np.ndarray]
    """name -> float32 array, dequantized, numpy/torch order (HF ``[out, in]``)."""
    types: dict[str, str]
    """name -> GGML type name as stored (``"F32"``, ``"BF16"``, ``"Q8_0"``, ``"NVFP4"``, ...)."""


def read_gguf(path: str | Path, timeout: float = _READ_TIMEOUT_S) -> GGUFContents:
    """Read every key and tensor of a GGUF with the *vendored* gguf-py.

    The vendored gguf-py (newer than PyPI gguf 0.19.0) runs in a child process
    (this file in ``_dump`` mode), which writes an ``.npz`` and a ``.json``.
    """
    gguf_py = converter_dir() / "gguf-py"
    with tempfile.TemporaryDirectory(prefix="nvq-gguf-") as tmp:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "_dump",
            str(Path(path).resolve()),
            tmp,
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout,
                env=_child_env(gguf_py), cwd=tmp,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"reading {path} timed out after {timeout} s") from e
        if proc.returncode != 0:
            raise RuntimeError(
                f"reading {path} failed (exit {proc.returncode}):\n{_tail(proc.stderr)}"
            )
        info = json.loads((Path(tmp) / "info.json").read_text())
        with np.load(Path(tmp) / "tensors.npz") as npz:
            names = info["tensor_names"]
            tensors = {name: npz[f"t{i}"] for i, name in enumerate(names)}
    return GGUFContents(info["metadata"], tensors, info["types"])


# --------------------------------------------------------------------------
# Child-process side (runs with the vendored gguf-py on sys.path)
# --------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", errors="replace")
    return v


def _dump(gguf_path: str, out_dir: str, vendored: str | None = None) -> None:
    import gguf  # the vendored copy: PYTHONPATH puts it before site-packages
    from gguf.quants import dequantize

    if vendored is not None and not Path(gguf.__file__).resolve().is_relative_to(
        Path(vendored).resolve()
    ):
        raise RuntimeError(f"expected the vendored gguf-py under {vendored}, got {gguf.__file__}")

    reader = gguf.GGUFReader(gguf_path, "r")
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            metadata[key] = _jsonable(field.contents())
    arrays: dict[str, np.ndarray] = {}
    tensor_types: dict[str, str] = {}
    names: list[str] = []
    for i, t in enumerate(reader.tensors):
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        arrays[f"t{i}"] = a
        tensor_types[t.name] = t.tensor_type.name
        names.append(t.name)
    np.savez(Path(out_dir) / "tensors.npz", **arrays)
    info = {
        "metadata": metadata,
        "types": tensor_types,
        "tensor_names": names,
    }
    (Path(out_dir) / "info.json").write_text(json.dumps(info))


def _convert_many(script: str, job_dir: str) -> None:
    """Run the converter's ``main()`` once per job listed in JOB_DIR/jobs.json."""
    import io
    import logging
    import traceback

    sys.path.insert(0, str(Path(script).parent))
    import convert_hf_to_gguf  # puts its vendored gguf-py on sys.path
    from conversion.base import TextModel

    default_vocab = TextModel.set_vocab
    errors: list[str | None] = []
    for src, out, outtype, sentencepiece in json.loads((Path(job_dir) / "jobs.json").read_text()):
        TextModel.set_vocab = TextModel._set_vocab_sentencepiece if sentencepiece else default_vocab
        sys.argv = [script, src, "--outfile", out, "--outtype", outtype]
        log = io.StringIO()  # this job's log, for its error message
        handler = logging.StreamHandler(log)
        logging.getLogger().addHandler(handler)
        try:
            convert_hf_to_gguf.main()
            errors.append(None)
        except SystemExit as e:  # the converter exits on unsupported models
            errors.append(None if e.code in (0, None) else f"{log.getvalue()}exit {e.code}")
        except Exception:
            errors.append(log.getvalue() + traceback.format_exc())
        finally:
            logging.getLogger().removeHandler(handler)
    (Path(job_dir) / "results.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_dump":
        _pp = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or None
        _dump(sys.argv[2], sys.argv[3], vendored=_pp)
    elif len(sys.argv) == 4 and sys.argv[1] == "_convert_many":
        _convert_many(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} _dump GGUF_FILE OUT_DIR | _convert_many SCRIPT JOB_DIR")
