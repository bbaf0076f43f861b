"""The native CPU codec (`kernels/cpu/*.c`): `nvq.ops` on CPU tensors, byte for byte the reference.

The C source is compiled on first use with the system C compiler ($CC, else cc, gcc or clang) into
`$NVQ_CACHE_DIR/kernels` (beside the CUDA library), keyed by a hash of the sources, the command
line and `cc --version`, and loaded with ctypes. OpenMP spreads blocks over torch's thread count
when the compiler has it. No compiler, a failed build or NVQ_CPU_KERNELS=0 means the reference
codecs run instead; `status()` says which and why. Nothing is compiled at import time.

No -march=native (the cache may be shared between machines) and no -ffast-math: bit-exactness
with the reference is the contract.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from nvq.errors import KernelBuildError
from nvq.formats import nvfp4
from nvq.formats.constants import MXFP4_BLOCK, NVFP4_BLOCK

ENV_SWITCH = "NVQ_CPU_KERNELS"  # "0" forces the reference codecs on CPU
LIBRARY_STEM = "libnvq_cpu"
SOURCE_SUBDIR = "cpu"
# -ffp-contract=off: no fused multiply-add, which would round once where the reference rounds twice.
BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra")
OPENMP_FLAGS = ("-fopenmp",)
COMPILERS = ("cc", "gcc", "clang")

_PTR, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# Every function of the C ABI with its argument types; each returns 0, or 1 for bad arguments.
C_SIGNATURES = {
    # x, n_elements, dtype, threads, amax (float out)
    "nvq_cpu_amax": (_PTR, _I64, _INT, _INT, _PTR),
    # amax (already rounded to dtype), dtype, global_scale (float out)
    "nvq_cpu_nvfp4_global_scale": (_FLOAT, _INT, _PTR),
    # x, rows, k, dtype, global_scale, packed, block_scale, threads
    "nvq_cpu_nvfp4_quantize": (_PTR, _I64, _I64, _INT, _FLOAT, _PTR, _PTR, _INT),
    # x, rows, k, dtype, packed, scale, threads
    "nvq_cpu_mxfp4_quantize": (_PTR, _I64, _I64, _INT, _PTR, _PTR, _INT),
    # packed, block_scale, global_scale, rows, k, dtype, out, threads
    "nvq_cpu_nvfp4_dequantize": (_PTR, _PTR, _FLOAT, _I64, _I64, _INT, _PTR, _INT),
    # packed, scale, rows, k, dtype, out, threads
    "nvq_cpu_mxfp4_dequantize": (_PTR, _PTR, _I64, _I64, _INT, _PTR, _INT),
    # x, n_elements, dtype, threads, all_finite (int out)
    "nvq_cpu_all_finite": (_PTR, _I64, _INT, _INT, _PTR),
    # x, n, dtype, out: the dtype rounding alone (a test hook)
    "nvq_cpu_round": (_PTR, _I64, _INT, _PTR),
}
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# --- building -------------------------------------------------------------------------------


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def source_dir() -> Path:
    """kernels/cpu beside this package (a checkout) or inside it (installed as nvq.kernels); else
    wherever nvq.ops finds the kernels."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "kernels" / SOURCE_SUBDIR, here / "kernels" / SOURCE_SUBDIR):
        if candidate.is_dir():
            return candidate
    from nvq.ops import kernel_dir

    return kernel_dir() / SOURCE_SUBDIR


def sources(directory: Path | None = None) -> list[Path]:
    """Every *.c and *.h in `directory` (default kernels/cpu), sorted by name."""
    directory = Path(directory) if directory else source_dir()
    return sorted([*directory.glob("*.c"), *directory.glob("*.h")])


def find_cc() -> str | None:
    """$CC if set (a name or a path), else the first of cc, gcc, clang on PATH."""
    for name in filter(None, (os.environ.get("CC", "").strip(), *COMPILERS)):
        if found := shutil.which(name):
            return found
    return None


@lru_cache(maxsize=None)
def cc_version(cc: str) -> str:
    """`cc --version` (part of the cache key)."""
    try:
        result = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"{cc} --version failed: {e}.") from None
    if result.returncode != 0:
        raise KernelBuildError(f"{cc} --version exited with {result.returncode}.")
    return result.stdout


@dataclass(frozen=True)
class CpuBuild:
    cc: str
    sources: tuple[Path, ...]
    flags: tuple[str, ...]
    key: str
    library: Path  # where the built library is cached

    def command(self, out: str | Path) -> list[str]:
        c_files = [str(p) for p in self.sources if p.suffix == ".c"]
        return [self.cc, *self.flags, *c_files, "-o", str(out)]


def plan_build(openmp: bool = True, directory: Path | None = None, cc: str | None = None) -> CpuBuild:
    """Compiler, sources, flags, cache key and library path of one build; runs nothing but
    `cc --version`."""
    from nvq.ops import cache_dir

    cc = cc or find_cc()
    if cc is None:
        raise KernelBuildError("no C compiler was found ($CC, cc, gcc or clang)")
    files = tuple(sources(directory))
    if not any(p.suffix == ".c" for p in files):
        raise KernelBuildError(f"no CPU kernel sources (*.c) in {directory or source_dir()}")
    flags = BASE_FLAGS + (OPENMP_FLAGS if openmp else ())
    digest = hashlib.sha256()
    for chunk in (*(p.name.encode() + b"\0" + p.read_bytes() for p in files), "\0".join(flags).encode(),
                  cc_version(cc).encode()):
        digest.update(len(chunk).to_bytes(8, "little") + chunk)  # length-prefixed: no ambiguous joins
    key = digest.hexdigest()
    return CpuBuild(cc, files, flags, key, cache_dir() / f"{LIBRARY_STEM}-{key[:16]}.so")


def compile_library(build: CpuBuild) -> Path:
    """Compile unless the cache holds the library; the temporary-then-rename keeps readers safe."""
    if build.library.is_file():
        return build.library
    build.library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{build.library.stem}.", suffix=".tmp", dir=build.library.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        command = build.command(tmp)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelBuildError(f"could not run {build.cc}: {e}") from None
        if result.returncode != 0:
            log = build.library.with_suffix(".log")
            log.write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr, encoding="utf-8")
            raise KernelBuildError(f"{Path(build.cc).name} failed with exit code {result.returncode}; see {log}")
        os.replace(tmp, build.library)
    finally:
        tmp.unlink(missing_ok=True)
    return build.library


# --- loading --------------------------------------------------------------------------------


class CpuLibrary:
    """The loaded shared library, with argtypes and restype set for every function."""

    def __init__(self, path: str | Path, openmp: bool):
        self.path, self.openmp = Path(path), openmp
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise KernelBuildError(f"could not load {self.path}: {e}") from None
        self.functions = {}
        for name, argtypes in C_SIGNATURES.items():
            try:
                function = getattr(lib, name)
            except AttributeError:
                raise KernelBuildError(f"{self.path} has no function {name}") from None
            function.argtypes, function.restype = argtypes, ctypes.c_int
            self.functions[name] = function

    def call(self, name: str, *args) -> None:
        if self.functions[name](*args) != 0:
            raise RuntimeError(f"{name} rejected its arguments {args}")


class _Loader:
    """Builds and loads the library once per process, on the first op with CPU tensors: OpenMP
    first, then without it (a compiler without OpenMP), cached builds before new ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decided = False
        self.library: CpuLibrary | None = None
        self.reason = ""  # why `library` is None

    def load(self) -> CpuLibrary | None:
        with self._lock:
            if not self.decided:
                self.decided = True
                try:
                    self.library = _build_and_load()
                except (KernelBuildError, OSError) as e:
                    self.reason = " ".join(str(e).split()).rstrip(".")
        return self.library


def _build_and_load() -> CpuLibrary:
    builds = [plan_build(openmp=True), plan_build(openmp=False)]
    cached = [b for b in builds if b.library.is_file()]
    for build in cached or builds:
        try:
            return CpuLibrary(compile_library(build), openmp=build.flags == builds[0].flags)
        except KernelBuildError as e:
            error = e
    raise error


_LOADER = _Loader()


def library() -> CpuLibrary | None:
    """The loaded library, or None when switched off or it cannot be built (see `status`)."""
    return _LOADER.load() if enabled() else None


def status() -> str:
    """One line for `nvq kernels status`: what CPU tensors run on, and why. Compiles nothing."""
    if not enabled():
        return f"reference ({ENV_SWITCH}=0)"
    if _LOADER.decided:
        lib = _LOADER.library
        return f"cpu ({lib.path}{', OpenMP' if lib.openmp else ''})" if lib else f"reference ({_LOADER.reason})"
    try:
        builds = [plan_build(openmp=True), plan_build(openmp=False)]
    except KernelBuildError as e:
        return f"reference ({str(e).rstrip('.')})"
    built = next((b.library for b in builds if b.library.is_file()), None)
    return f"cpu ({built})" if built else "cpu (compiled on first use)"


# --- ops ------------------------------------------------------------------------------------
# Each takes tensors that nvq.ops has checked and made contiguous, and returns what the reference
# returns. `run` is the one entry point nvq.ops uses.


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _tensor_amax(lib: CpuLibrary, x: Tensor) -> Tensor:
    out = ctypes.c_float()
    lib.call("nvq_cpu_amax", x.data_ptr(), x.numel(), DTYPE_CODES[x.dtype], _threads(), ctypes.addressof(out))
    # The amax is one of x's values (or its dtype's max), so the cast back is exact.
    return torch.tensor(out.value, dtype=torch.float32).to(x.dtype)


def _nvfp4_global_scale(lib: CpuLibrary, amax: Tensor, dtype: torch.dtype) -> Tensor:
    # The reference first rounds amax to dtype (torch's cast); fp32 holds that value exactly.
    a = float(amax.reshape(()).to(dtype).float())
    out = ctypes.c_float()
    lib.call("nvq_cpu_nvfp4_global_scale", a, DTYPE_CODES[dtype], ctypes.addressof(out))
    return torch.tensor([out.value], dtype=torch.float32)


def _nvfp4_quantize_packed(lib: CpuLibrary, x: Tensor, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    g = float(nvfp4._checked_scalar(global_scale, "global_scale"))  # the reference's check and error
    rows, k = x.shape
    packed = torch.empty((rows, k // 2), dtype=torch.uint8)
    block_scale = torch.empty((rows, k // NVFP4_BLOCK), dtype=torch.uint8)
    lib.call("nvq_cpu_nvfp4_quantize", x.data_ptr(), rows, k, DTYPE_CODES[x.dtype], g, packed.data_ptr(),
             block_scale.data_ptr(), _threads())
    return packed, block_scale.view(torch.float8_e4m3fn)


def _mxfp4_quantize_packed(lib: CpuLibrary, x: Tensor) -> tuple[Tensor, Tensor]:
    rows, k = x.shape
    packed = torch.empty((rows, k // 2), dtype=torch.uint8)
    scale = torch.empty((rows, k // MXFP4_BLOCK), dtype=torch.uint8)
    lib.call("nvq_cpu_mxfp4_quantize", x.data_ptr(), rows, k, DTYPE_CODES[x.dtype], packed.data_ptr(),
             scale.data_ptr(), _threads())
    return packed, scale


def _nvfp4_dequantize_packed(lib: CpuLibrary, packed: Tensor, block_scale: Tensor, global_scale: Tensor,
                             dtype: torch.dtype) -> Tensor:
    g = float(global_scale.reshape(()).float())
    rows, k = packed.shape[0], 2 * packed.shape[1]
    out = torch.empty((rows, k), dtype=dtype)
    lib.call("nvq_cpu_nvfp4_dequantize", packed.data_ptr(), block_scale.contiguous().data_ptr(), g, rows, k,
             DTYPE_CODES[dtype], out.data_ptr(), _threads())
    return out


def _mxfp4_dequantize_packed(lib: CpuLibrary, packed: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    rows, k = packed.shape[0], 2 * packed.shape[1]
    out = torch.empty((rows, k), dtype=dtype)
    lib.call("nvq_cpu_mxfp4_dequantize", packed.data_ptr(), scale.contiguous().data_ptr(), rows, k,
             DTYPE_CODES[dtype], out.data_ptr(), _threads())
    return out


OPS = {
    "tensor_amax": _tensor_amax,
    "nvfp4_global_scale": _nvfp4_global_scale,
    "nvfp4_quantize_packed": _nvfp4_quantize_packed,
    "mxfp4_quantize_packed": _mxfp4_quantize_packed,
    "nvfp4_dequantize_packed": _nvfp4_dequantize_packed,
    "mxfp4_dequantize_packed": _mxfp4_dequantize_packed,
}


def run(op: str, *args):
    """`op` of nvq.ops on the native codec when every tensor argument is on the CPU and the library
    is available; None otherwise (the caller then runs the reference)."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if any(t.device.type != "cpu" for t in tensors):
        return None
    lib = library()
    return None if lib is None else OPS[op](lib, *args)


def all_finite(x: Tensor) -> bool | None:
    """Whether a CPU float tensor holds no NaN/Inf, in one pass without temporaries; None when the
    codec is unavailable or `x` is not a contiguous bf16/fp16/fp32 CPU tensor (use torch then)."""
    if x.device.type != "cpu" or x.dtype not in DTYPE_CODES or not x.is_contiguous():
        return None
    lib = library()
    if lib is None:
        return None
    out = ctypes.c_int()
    lib.call("nvq_cpu_all_finite", x.data_ptr(), x.numel(), DTYPE_CODES[x.dtype], _threads(), ctypes.addressof(out))
    return bool(out.value)


def round_to_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The C codec's fp32 -> dtype -> fp32 rounding of `x` (float32), for tests."""
    lib = library()
    if lib is None:
        raise KernelBuildError(f"the CPU codec is unavailable: {status()}")
    x = x.float().contiguous()
    out = torch.empty_like(x)
    lib.call("nvq_cpu_round", x.data_ptr(), x.numel(), DTYPE_CODES[dtype], out.data_ptr())
    return out
