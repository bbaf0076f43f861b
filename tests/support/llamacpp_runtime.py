"""llama.cpp itself (llama-cpp-python 0.3.36, built from its sdist for CPU) as a runtime oracle.

:func:`run_llamacpp` evaluates token ids with a GGUF in one batch and returns the graph tensors
captured through the eval callback (oracle.md §3): by default every ``l_out-N`` (the residual stream
after layer N) and ``result_output`` (the logits), each shaped ``[T, features]`` like nvq's taps.
The context is configured as gemma4.md §5.3 requires for a float reference: flash attention off,
an F32 KV cache, one ubatch holding every token, logits for every position.

The runtime is built once per machine and cached under :func:`tests.support.llamacpp.cache_dir`::

    wheels/llama_cpp_python-0.3.36-<key>/*.whl     the wheel (CPU only, lean: no llama-common)
    wheels/llama_cpp_python-0.3.36-<key>.log       the build log
    llama_cpp_python-0.3.36-runtime-<key>/         the wheel + diskcache installed with --target

``<key>`` hashes the build recipe, so changing it rebuilds. A lock file serialises the build
across processes. llama.cpp runs in a child Python process with the runtime directory on
``PYTHONPATH``, so a crash in native code fails one call instead of the whole test session.

Run as a script (``python llamacpp_runtime.py _run REQUEST.json``), this file is the child.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_NAMES", "run_llamacpp", "runtime_dir"]

DEFAULT_NAMES = r"l_out-\d+|result_output"

# oracle.md §3. GGML_NATIVE=OFF keeps the cached wheel runnable on any x86-64-v3 host (AVX2/FMA/F16C
# stay on by default); LLAVA_BUILD=OFF skips mtmd, which the runtime never loads.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF "
    "-DGGML_OPENMP=ON"
)
# The wrapper forces the unused llama-common library on; turning it off halves the build and gives
# bit-identical captures (oracle.md §3, "Lean variant").
_COMMON_ON = 'set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)'
_COMMON_OFF = 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)'
# The only run-time dependency of `import llama_cpp` that nvq's environment does not already have.
_EXTRA_REQUIREMENTS = ("diskcache==5.6.3",)

_BUILD_TIMEOUT_S = 1800
_INSTALL_TIMEOUT_S = 300
_RUN_TIMEOUT_S = 300

# ggml_type values (ggml.h)
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1


def _recipe_key() -> str:
    from tests.support.llamacpp import LLAMA_CPP_PYTHON_VERSION

    recipe = json.dumps(
        [LLAMA_CPP_PYTHON_VERSION, CMAKE_ARGS, _COMMON_OFF, _EXTRA_REQUIREMENTS, platform.machine()]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _tail(text: str, n_lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n_lines:])


@contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def runtime_dir() -> Path:
    """The directory holding an importable ``llama_cpp`` (built and installed on first use)."""
    from tests.support.llamacpp import LLAMA_CPP_PYTHON_VERSION, cache_dir

    cache, key = cache_dir(), _recipe_key()
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-{key}"
    final = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-runtime-{key}"
    if _is_installed(final):
        return final
    with _locked(cache / f"{name}.lock"):
        if _is_installed(final):  # another process finished while we waited
            return final
        wheel = _wheel(cache / "wheels" / name)
        _install(wheel, final)
    return final


def _is_installed(d: Path) -> bool:
    return (d / "llama_cpp" / "llama_cpp.py").is_file() and any(
        (d / "llama_cpp" / "lib").glob("libllama*")
    )


def _wheel(wheel_dir: Path) -> Path:
    """The cached wheel, built from the sdist if absent (caller holds the lock)."""
    found = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    from tests.support.llamacpp import sdist_path

    sdist = sdist_path()
    wheel_dir.parent.mkdir(parents=True, exist_ok=True)
    log = wheel_dir.parent / f"{wheel_dir.name}.log"
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=wheel_dir.parent))
    try:
        src = _lean_source(sdist, tmp)
        out = tmp / "wheel"
        env = dict(
            os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2)
        )
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", str(src), "-w", str(out)]
        started = time.monotonic()
        try:
            with open(log, "w") as f:
                proc = subprocess.run(
                    cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=_BUILD_TIMEOUT_S
                )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(
                f"building llama-cpp-python timed out after {e.timeout} s; log: {log}"
            ) from e
        built = sorted(out.glob("llama_cpp_python-*.whl"))
        if proc.returncode != 0 or not built:
            raise RuntimeError(
                f"building llama-cpp-python from {sdist} failed (exit {proc.returncode}; needs a C/C++ "
                f"compiler, cmake >= 3.21 and PyPI access for scikit-build-core); full log: {log}\n"
                f"{_tail(log.read_text(errors='replace'))}"
            )
        with open(log, "a") as f:
            f.write(f"\nbuilt in {time.monotonic() - started:.0f} s\n")
        os.replace(out, wheel_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(wheel_dir.glob("llama_cpp_python-*.whl"))[0]


def _lean_source(sdist: Path, dest: Path) -> Path:
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise RuntimeError(f"cannot unpack {sdist} ({e}); delete it to download it again") from e
    (src,) = [p for p in dest.iterdir() if p.is_dir()]
    cml = src / "CMakeLists.txt"
    text = cml.read_text()
    if _COMMON_ON not in text:
        raise RuntimeError(
            f"{sdist}: CMakeLists.txt no longer forces llama-common on; update _COMMON_ON"
        )
    cml.write_text(text.replace(_COMMON_ON, _COMMON_OFF))
    return src


def _install(wheel: Path, final: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".runtime-", dir=final.parent))
    try:
        target = tmp / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
               str(wheel), *_EXTRA_REQUIREMENTS]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S)
        if proc.returncode != 0 or not _is_installed(target):
            raise RuntimeError(
                f"installing {wheel.name} into {target} failed (exit {proc.returncode}):\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_llamacpp(
    gguf_path: str | Path,
    token_ids,
    names_regex: str = DEFAULT_NAMES,
    n_threads: int | None = None,
    timeout: float = _RUN_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """Evaluate ``token_ids`` (positions 0..T−1, one sequence) with the GGUF in llama.cpp.

    Returns every graph tensor whose name ``names_regex`` fully matches, as float32
    ``[T, features]`` (the outermost ggml dimension becomes the rows), plus ``"logits"``
    (``llama_get_logits``, ``[T, n_vocab]``). A name given to several nodes keeps the last one.
    Raises RuntimeError, with llama.cpp's log, if the child fails or a name matched nothing.
    """
    ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
    if not ids:
        raise ValueError("token_ids is empty")
    runtime = runtime_dir()
    with tempfile.TemporaryDirectory(prefix="nvq-llamacpp-") as tmp:
        out = Path(tmp) / "captures.npz"
        request = {
            "gguf": str(Path(gguf_path).resolve()),
            "token_ids": ids,
            "names_regex": names_regex,
            "n_threads": n_threads or min(os.cpu_count() or 1, 8),
            "out": str(out),
        }
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps(request))
        env = dict(os.environ)
        env["PYTHONPATH"] = str(runtime) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        cmd = [sys.executable, str(Path(__file__).resolve()), "_run", str(req)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"llama.cpp on {gguf_path} timed out after {e.timeout} s") from e
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"llama.cpp failed on {gguf_path} (exit {proc.returncode}):\n{_tail(proc.stderr, 60)}"
            )
        with np.load(out) as npz:
            captured = {name: npz[name] for name in npz.files}
    if not any(re.fullmatch(names_regex, n) for n in captured):
        raise RuntimeError(
            f"llama.cpp produced no tensor named like {names_regex!r} for {gguf_path}"
        )
    return captured


# --------------------------------------------------------------------------
# Child-process side (runs with the runtime directory on PYTHONPATH)
# --------------------------------------------------------------------------


class _GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` of the vendored ggml.h (GGML_MAX_DIMS 4, MAX_OP_PARAMS 64, MAX_SRC 10,
    MAX_NAME 64); llama-cpp-python binds no accessor for its shape."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _capture_callback(ggml, wanted: re.Pattern[str], store: dict[str, np.ndarray]):
    """The scheduler asks about each node (ask=True), then hands over each node it was told yes
    to once computed (ask=False); buffers are reused, so the data is copied out right away."""

    def cb(t_ptr, ask, _user_data):
        t = _GGMLTensor.from_address(t_ptr)
        name = t.name.decode(errors="replace")
        if ask:
            return wanted.fullmatch(name) is not None
        if t.type in (GGML_TYPE_F32, GGML_TYPE_F16) and ggml.ggml_is_contiguous(t_ptr):
            buf = np.empty(ggml.ggml_nbytes(t_ptr), np.uint8)
            ggml.ggml_backend_tensor_get(t_ptr, buf.ctypes.data, 0, buf.nbytes)
            values = buf.view(np.float32 if t.type == GGML_TYPE_F32 else np.float16).astype(
                np.float32
            )
            n_dims = max(
                ggml.ggml_n_dims(t_ptr), 2
            )  # ne[0] is innermost: the last ggml dim is rows
            store[name] = values.reshape(int(t.ne[n_dims - 1]), -1)
        return True  # False would abort the graph

    return cb


def _bind_ggml(ggml) -> None:
    ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    ggml.ggml_nbytes.restype = ctypes.c_size_t
    ggml.ggml_n_dims.argtypes = [ctypes.c_void_p]
    ggml.ggml_n_dims.restype = ctypes.c_int
    ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    ggml.ggml_is_contiguous.restype = ctypes.c_bool
    ggml.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    ggml.ggml_backend_tensor_get.restype = None


def _run(request_path: str) -> None:
    import llama_cpp
    import llama_cpp._ggml
    from llama_cpp import llama_cpp as L

    req = json.loads(Path(request_path).read_text())
    ids = req["token_ids"]
    n = len(ids)

    # The default log callback decodes strictly and raises on split UTF-8 pieces (oracle.md §3).
    @L.llama_log_callback
    def log(_level, text, _user_data):
        sys.stderr.write(text.decode("utf-8", errors="replace"))

    L.llama_log_set(log, ctypes.c_void_p(0))
    L.llama_backend_init()
    ggml = llama_cpp._ggml.libggml
    _bind_ggml(ggml)
    store: dict[str, np.ndarray] = {}
    callback = L.ggml_backend_sched_eval_callback(
        _capture_callback(ggml, re.compile(req["names_regex"]), store)
    )

    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(req["gguf"].encode(), mp)
    if not model:
        sys.exit(f"llama_model_load_from_file failed for {req['gguf']}")
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(n, 64)  # one ubatch: every node is computed once
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = int(req["n_threads"])
    cp.flash_attn_type = 0  # off: -1 (auto) turns it on for CPU
    cp.type_k = cp.type_v = GGML_TYPE_F32
    cp.cb_eval = callback
    cp.cb_eval_user_data = None
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit("llama_init_from_model failed")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    batch = L.llama_batch_init(n, 0, 1)
    batch.n_tokens = n
    for i, tok in enumerate(ids):
        batch.token[i] = tok
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1  # every row: the last layer and the head only keep requested rows
    store.clear()
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        sys.exit(f"llama_decode returned {rc}")
    logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(n, n_vocab)).copy()
    np.savez(req["out"], logits=logits, **store)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_run":
        _run(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} _run REQUEST_JSON")
