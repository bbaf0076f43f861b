"""CUDA kernels from `kernels/`, with the reference codecs (`nvq.formats`) as fallback.

Every op below means exactly what its reference means (the reference is the spec of record). On
CUDA tensors it runs the kernel library, which nvcc builds on first use for the GPU present and
caches under `$NVQ_CACHE_DIR/kernels` (default `~/.cache/nvq/kernels`); CPU tensors take the native
CPU codec (`nvq.ops_cpu`, same contract); otherwise, or when nothing can be built, it runs the
reference on the tensors where they are. `backend(op)` says which ran. Nothing is compiled at
import time.

The library's C ABI (`kernels/*.cu`): `extern "C"` launchers taking raw device pointers, sizes, a
dtype code and a `cudaStream_t` as `void*`; each launches asynchronously and returns 0 or the
cudaError_t of the launch. They are bound with ctypes, so the kernels need no torch headers.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from nvq import ops_cpu
from nvq.errors import KernelBuildError
from nvq.formats import e2m1, mxfp4, nvfp4
from nvq.formats._blocks import WEIGHT_DTYPES, check_dtype, check_weight
from nvq.formats.constants import MXFP4_BLOCK, NVFP4_BLOCK

__all__ = [
    "OPS",
    "Arch",
    "KernelLibrary",
    "KernelStatus",
    "tensor_amax",
    "nvfp4_global_scale",
    "nvfp4_quantize_packed",
    "mxfp4_quantize_packed",
    "nvfp4_dequantize_packed",
    "mxfp4_dequantize_packed",
    "expert_amax",
    "nvfp4_quantize_experts",
    "mxfp4_quantize_experts",
    "nvfp4_quantize",
    "backend",
    "kernels_available",
    "parse_arch_list",
    "target_archs",
    "nvcc_command",
    "find_nvcc",
    "kernel_dir",
    "kernel_sources",
    "cache_dir",
    "cache_key",
    "plan_build",
    "build_library",
    "kernel_status",
]

CUDA = "cuda"
CPU = "cpu"  # the native CPU codec, nvq/ops_cpu.py
REFERENCE = "reference"
OPS = (
    "tensor_amax",
    "nvfp4_global_scale",
    "nvfp4_quantize_packed",
    "mxfp4_quantize_packed",
    "nvfp4_dequantize_packed",
    "mxfp4_dequantize_packed",
    "expert_amax",
    "nvfp4_quantize_experts",
    "mxfp4_quantize_experts",
    "nvfp4_quantize",
)

# --- building -------------------------------------------------------------------------------

KERNEL_PACKAGE = "nvq.kernels"
LIBRARY_STEM = "libnvq_kernels"
# No --use_fast_math: IEEE division and rounding are part of the bit-exactness contract.
BASE_FLAGS = ("-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC,-Wall,-Wextra", "-Werror", "all-warnings")
# Compute capabilities (major·10 + minor) that have an arch-specific target (sm_90a, sm_100a, ...).
ARCH_SPECIFIC = frozenset({"90", "100", "101", "103", "110", "120", "121"})
# Names TORCH_CUDA_ARCH_LIST accepts besides numbers (torch.utils.cpp_extension's table).
NAMED_ARCHES = {
    "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7",
    "Ampere": "8.0;8.6+PTX",
    "Ada": "8.9+PTX",
    "Hopper": "9.0+PTX",
    "Blackwell+Tegra": "11.0",
    "Blackwell": "10.0;10.3;12.0;12.1+PTX",
}
_ARCH_PATTERN = re.compile(r"^(\d+)\.(\d)a?(\+PTX)?$")
# The key is computed from the command with this in place of the (temporary) output path.
_OUT_PLACEHOLDER = "{out}"


@dataclass(frozen=True, order=True)
class Arch:
    """One build target: a compute capability, plus portable PTX for later GPUs when `ptx`."""

    major: int
    minor: int
    ptx: bool = False

    @classmethod
    def parse(cls, text: str) -> Arch:
        """'9.0', '9.0a' or '8.6+PTX' -> Arch; ValueError otherwise."""
        match = _ARCH_PATTERN.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not a compute capability like 9.0 or 8.6+PTX")
        return cls(int(match[1]), int(match[2]), ptx=bool(match[3]))

    @property
    def number(self) -> str:
        return f"{self.major}{self.minor}"

    @property
    def real(self) -> str:
        """The machine-code target: the `a` variant where one exists (sm_90a), else plain."""
        return f"{self.number}a" if self.number in ARCH_SPECIFIC else self.number

    def gencode_flags(self) -> list[str]:
        flags = [f"-gencode=arch=compute_{self.real},code=sm_{self.real}"]
        if self.ptx:
            # Plain (not `a`) PTX: only that can be JIT-compiled for later GPUs.
            flags.append(f"-gencode=arch=compute_{self.number},code=compute_{self.number}")
        return flags

    def runs_on(self, capability: tuple[int, int]) -> bool:
        """Whether this target's code can run on a GPU of `capability`."""
        if self.ptx and (self.major, self.minor) <= capability:
            return True
        if self.number in ARCH_SPECIFIC:  # sm_XYa runs on exactly XY
            return (self.major, self.minor) == capability
        return self.major == capability[0] and self.minor <= capability[1]

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + ("+PTX" if self.ptx else "")


def parse_arch_list(text: str) -> list[Arch]:
    """A TORCH_CUDA_ARCH_LIST-style string ('8.0;9.0+PTX', spaces also separate) -> Archs."""
    entries = [e for e in re.split(r"[;\s]+", text) if e]
    expanded = [part for e in entries for part in NAMED_ARCHES.get(e, e).split(";")]
    return [Arch.parse(e) for e in expanded]


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def nvcc_command(
    sources: Sequence[str | Path], out: str | Path, archs: Sequence[str | Arch], nvcc: str | Path = "nvcc"
) -> list[str]:
    """The nvcc command line that builds `sources` into the shared library `out` for `archs`."""
    targets = _unique(a if isinstance(a, Arch) else Arch.parse(a) for a in archs)
    if not targets:
        raise ValueError("nvcc_command needs at least one target architecture")
    gencodes = _unique(flag for arch in targets for flag in arch.gencode_flags())
    return [str(nvcc), *BASE_FLAGS, *gencodes, *map(str, sources), "-o", str(out)]


def present_capabilities() -> list[tuple[int, int]]:
    """Compute capabilities of the visible GPUs (none on a CPU machine)."""
    if not torch.cuda.is_available():
        return []
    return _unique(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def target_archs(archs: Sequence[str | Arch] | None = None) -> list[Arch]:
    """What to build for: `archs` if given, else TORCH_CUDA_ARCH_LIST (read, never changed), else
    exactly the visible GPUs."""
    if archs:
        try:
            return _unique(a if isinstance(a, Arch) else Arch.parse(a) for a in archs)
        except ValueError as e:
            raise KernelBuildError(f"{e}.") from None
    from_env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if from_env and from_env != "native":  # "native" means the visible GPUs, as in torch
        try:
            return _unique(parse_arch_list(from_env))
        except ValueError as e:
            raise KernelBuildError(f"TORCH_CUDA_ARCH_LIST={from_env!r}: {e}.") from None
    capabilities = present_capabilities()
    if not capabilities:
        raise KernelBuildError(
            "no CUDA GPU is visible and no target was named; pass --arch 9.0 (repeatable) or set "
            "TORCH_CUDA_ARCH_LIST."
        )
    return [Arch(*c) for c in capabilities]


def find_nvcc() -> Path | None:
    """nvcc from $CUDA_HOME/bin, else PATH, else /usr/local/cuda/bin."""
    candidates = []
    if cuda_home := os.environ.get("CUDA_HOME"):
        candidates.append(Path(cuda_home) / "bin" / "nvcc")
    if on_path := shutil.which("nvcc"):
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


@lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    """The full `nvcc --version` text (part of the cache key)."""
    try:
        result = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"{nvcc} --version failed: {e}.") from None
    if result.returncode != 0:
        raise KernelBuildError(f"{nvcc} --version exited with {result.returncode}.")
    return result.stdout


def nvcc_release(version_text: str) -> str:
    """The 'release 13.0, V13.0.88' part of `nvcc --version`."""
    match = re.search(r"release [^\n]*", version_text)
    return match[0] if match else version_text.strip().splitlines()[-1]


def kernel_dir() -> Path:
    """The installed `nvq.kernels` package directory, or `kernels/` beside `nvq/` in a checkout."""
    try:
        return Path(str(importlib.resources.files(KERNEL_PACKAGE)))
    except ModuleNotFoundError:
        # A source checkout on PYTHONPATH (not installed): kernels/ is a sibling of nvq/.
        return Path(__file__).resolve().parent.parent / "kernels"


def kernel_sources(directory: Path) -> tuple[list[Path], list[Path]]:
    """(every *.cu, every *.cuh) in `directory`, sorted by name."""
    directory = Path(directory)
    return sorted(directory.glob("*.cu")), sorted(directory.glob("*.cuh"))


def cache_dir() -> Path:
    root = os.environ.get("NVQ_CACHE_DIR") or Path.home() / ".cache" / "nvq"
    return Path(root) / "kernels"


def cache_key(files: Sequence[Path], command: Sequence[str], archs: Sequence[Arch], nvcc_version_text: str) -> str:
    """sha256 over the sources and headers, the nvcc command line, the targets, torch's version and
    CUDA version, and `nvcc --version`."""
    digest = hashlib.sha256()

    def feed(chunk: bytes) -> None:
        # Length-prefixed, so that no two different inputs concatenate to the same bytes.
        digest.update(len(chunk).to_bytes(8, "little") + chunk)

    for path in sorted(files, key=lambda p: p.name):
        feed(path.name.encode())
        feed(path.read_bytes())
    feed("\0".join(command).encode())
    feed(";".join(map(str, archs)).encode())
    feed(f"{torch.__version__}|{torch.version.cuda}".encode())
    feed(nvcc_version_text.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class BuildPlan:
    nvcc: Path
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    archs: tuple[Arch, ...]
    key: str
    library: Path  # where the built library is cached

    def command(self, out: str | Path) -> list[str]:
        return nvcc_command(self.sources, out, self.archs, nvcc=self.nvcc)


def plan_build(
    archs: Sequence[str | Arch] | None = None, directory: str | Path | None = None, nvcc: str | Path | None = None
) -> BuildPlan:
    """Everything about a build except running it: nvcc, sources, targets, cache key and path."""
    nvcc_path = Path(nvcc) if nvcc else find_nvcc()
    if nvcc_path is None:
        raise KernelBuildError("nvcc was not found in $CUDA_HOME/bin, on PATH or in /usr/local/cuda/bin.")
    directory = Path(directory) if directory else kernel_dir()
    sources, headers = kernel_sources(directory)
    if not sources:
        raise KernelBuildError(f"no kernel sources (*.cu) in {directory}.")
    targets = tuple(target_archs(archs))
    template = nvcc_command(sources, _OUT_PLACEHOLDER, targets, nvcc=nvcc_path)
    key = cache_key(sources + headers, template, targets, nvcc_version(str(nvcc_path)))
    library = cache_dir() / f"{LIBRARY_STEM}-{key[:16]}.so"
    return BuildPlan(nvcc_path, tuple(sources), tuple(headers), targets, key, library)


def build_library(
    archs: Sequence[str | Arch] | None = None,
    directory: str | Path | None = None,
    nvcc: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Compile the kernels unless the cache holds them already; returns the library's path."""
    return _ensure_built(plan_build(archs, directory, nvcc), force)


def _ensure_built(plan: BuildPlan, force: bool = False) -> Path:
    if force or not plan.library.is_file():
        _compile(plan)
    return plan.library


def _compile(plan: BuildPlan) -> None:
    plan.library.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary sibling and rename: a reader never sees a half-written library.
    fd, tmp_name = tempfile.mkstemp(prefix=f"{plan.library.stem}.", suffix=".tmp", dir=plan.library.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        command = plan.command(tmp)
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            raise KernelBuildError(f"could not run {plan.nvcc}: {e}.") from None
        if result.returncode != 0:
            log = plan.library.with_suffix(".log")
            log.write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr, encoding="utf-8")
            raise KernelBuildError(f"nvcc failed with exit code {result.returncode}; its output is in {log}.")
        os.replace(tmp, plan.library)
    finally:
        tmp.unlink(missing_ok=True)


# --- loading --------------------------------------------------------------------------------

_PTR, _I64, _INT = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
# Every launcher of the C ABI with its argument types; each returns int (0 or a cudaError_t).
C_SIGNATURES = {
    # x, experts, n_elements (each), dtype, amax [experts] (max-accumulated), stream
    "nvq_amax": (_PTR, _I64, _I64, _INT, _PTR, _PTR),
    # amax [n], n, dtype, global_scale [n], stream
    "nvq_nvfp4_global_scale": (_PTR, _I64, _INT, _PTR, _PTR),
    # x, experts, rows, k (each expert [rows, k]), dtype, global_scale [experts], cutoff-table scratch
    # [experts, NVFP4_TABLE_WORDS], packed, block_scale, stream
    "nvq_nvfp4_quantize": (_PTR, _I64, _I64, _I64, _INT, _PTR, _PTR, _PTR, _PTR, _PTR),
    # x, experts, rows, k, dtype, amax [experts] or NULL (then computed), amax scratch [experts],
    # global_scale out [experts], cutoff-table scratch, packed, block_scale, stream
    "nvq_nvfp4_quantize_auto": (_PTR, _I64, _I64, _I64, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR),
    # x, rows, k, dtype, packed, scale, stream
    "nvq_mxfp4_quantize": (_PTR, _I64, _I64, _INT, _PTR, _PTR, _PTR),
    # packed, block_scale, global_scale, rows, k, dtype, out, stream
    "nvq_nvfp4_dequantize": (_PTR, _PTR, _PTR, _I64, _I64, _INT, _PTR, _PTR),
    # packed, scale, rows, k, dtype, out, stream
    "nvq_mxfp4_dequantize": (_PTR, _PTR, _I64, _I64, _INT, _PTR, _PTR),
}
# Words of the NVFP4 cutoff table per expert: 127 finite non-negative E4M3 bytes × 8 cutoffs.
NVFP4_TABLE_WORDS = 127 * 8
# Experts per launch (the grid's y dimension).
MAX_EXPERTS = 65535
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CUDA_ERROR_NAMES = {
    1: "cudaErrorInvalidValue",
    2: "cudaErrorMemoryAllocation",
    3: "cudaErrorInitializationError",
    9: "cudaErrorInvalidConfiguration",
    35: "cudaErrorInsufficientDriver",
    98: "cudaErrorInvalidDeviceFunction",
    100: "cudaErrorNoDevice",
    101: "cudaErrorInvalidDevice",
    209: "cudaErrorNoKernelImageForDevice",
    222: "cudaErrorUnsupportedPtxVersion",
    400: "cudaErrorInvalidResourceHandle",
    700: "cudaErrorIllegalAddress",
    701: "cudaErrorLaunchOutOfResources",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    719: "cudaErrorLaunchFailure",
}


class KernelLibrary:
    """The loaded shared library, with argtypes and restype set for every launcher."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise KernelBuildError(f"could not load {self.path}: {e}.") from None
        self.functions = {}
        for name, argtypes in C_SIGNATURES.items():
            try:
                function = getattr(self._lib, name)
            except AttributeError:
                raise KernelBuildError(f"{self.path} has no function {name}.") from None
            function.argtypes = argtypes
            function.restype = ctypes.c_int
            self.functions[name] = function

    def call(self, name: str, *args) -> None:
        """Call one launcher; a nonzero return becomes a RuntimeError naming it and the error."""
        code = self.functions[name](*args)
        if code != 0:
            error = CUDA_ERROR_NAMES.get(code, "see cudaError_t in driver_types.h")
            raise RuntimeError(f"{name} failed with CUDA error {code} ({error})")


class _Loader:
    """Builds and loads the library once per process, on the first call with CUDA tensors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decided = False
        self.library: KernelLibrary | None = None
        self.reason = ""  # why `library` is None

    def load(self) -> KernelLibrary | None:
        with self._lock:
            if not self.decided:
                self.decided = True
                try:
                    plan = plan_build()
                    _check_covers_gpus(plan.archs)
                    self.library = KernelLibrary(_ensure_built(plan))
                except (KernelBuildError, OSError) as e:
                    self.library = None
                    self.reason = " ".join(str(e).split()).rstrip(".")
                    print(
                        f"nvq: CUDA kernels unavailable ({self.reason}); using the reference codecs on the GPU.",
                        file=sys.stderr,
                    )
        return self.library


def _check_covers_gpus(archs: Sequence[Arch]) -> None:
    # Only an explicit TORCH_CUDA_ARCH_LIST can leave a visible GPU without code.
    missing = [c for c in present_capabilities() if not any(a.runs_on(c) for a in archs)]
    if missing:
        names = ", ".join(f"{major}.{minor}" for major, minor in missing)
        built = ";".join(map(str, archs))
        raise KernelBuildError(f"TORCH_CUDA_ARCH_LIST={built} has no code for compute capability {names}.")


_LOADER = _Loader()
_last_backend: dict[str, str] = {}


def kernels_available() -> bool:
    """Whether a GPU is visible and the kernel library builds and loads (it is built on the first
    call on a GPU machine; the answer is computed once per process)."""
    return torch.cuda.is_available() and _LOADER.load() is not None


def backend(op: str) -> str:
    """'cuda', 'cpu' or 'reference': what the last call of `op` ran on, else what a call with CUDA tensors
    would run on (which builds the kernels on a GPU machine)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if op in _last_backend:
        return _last_backend[op]
    return CUDA if kernels_available() else REFERENCE


def _kernels_for(op: str, *tensors: Tensor) -> KernelLibrary | None:
    """The kernel library when the tensors are on CUDA and it loads; records the backend used."""
    devices = _unique(t.device for t in tensors)
    if len(devices) > 1:
        raise ValueError(f"{op} takes tensors on one device, got {', '.join(map(str, devices))}")
    library = _LOADER.load() if devices[0].type == "cuda" else None
    _last_backend[op] = CUDA if library else REFERENCE
    return library


def _on_cpu(op: str, *args):
    """`op` on the native CPU codec (nvq.ops_cpu) for CPU tensors, else None; records the backend."""
    result = ops_cpu.run(op, *args)
    if result is not None:
        _last_backend[op] = CPU
    return result


def _launch(library: KernelLibrary, name: str, device: torch.device, *args) -> None:
    # The launcher uses the current device and is handed torch's current stream on it.
    with torch.cuda.device(device):
        library.call(name, *args, torch.cuda.current_stream(device).cuda_stream)


# --- validation -----------------------------------------------------------------------------


def _check_float_tensor(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{what} must be bfloat16, float16 or float32, got {x.dtype}")


def _check_scalar(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() != 1:
        raise ValueError(f"{what} must be a 1-element float tensor, got {x!r}")


def _check_packed(packed: Tensor, scale: Tensor, block: int, scale_dtype: torch.dtype, fmt: str) -> int:
    """Check [N, K/2] uint8 codes and their [N, K/block] scales; returns K."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"{fmt} packed codes must be a 2-D uint8 tensor [N, K/2], got {_describe(packed)}")
    n_rows, k = packed.shape[0], 2 * packed.shape[1]
    if k % block:
        raise ValueError(f"{fmt} needs K % {block} == 0, got K={k} from packed shape {tuple(packed.shape)}")
    if not isinstance(scale, Tensor) or scale.dtype != scale_dtype or tuple(scale.shape) != (n_rows, k // block):
        raise ValueError(
            f"{fmt} scales must be {scale_dtype} of shape {(n_rows, k // block)} for packed shape "
            f"{tuple(packed.shape)}, got {_describe(scale)}"
        )
    return k


def _kernel_ready(x: Tensor) -> Tensor:
    """Contiguous with a 16-byte-aligned start, as the kernels' vector loads need (a view into a
    larger tensor may start anywhere; it is copied then)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} of shape {tuple(x.shape)}"
    return type(x).__name__


# --- ops ------------------------------------------------------------------------------------


def tensor_amax(w: Tensor) -> Tensor:
    """0-d max |w| in w.dtype after the NaN/Inf policy, like `nvfp4.tensor_amax`."""
    _check_float_tensor(w, "tensor_amax input")
    x = _kernel_ready(w)
    library = _kernels_for("tensor_amax", x)
    if library is None:
        native = _on_cpu("tensor_amax", x)
        return nvfp4.tensor_amax(x) if native is None else native
    amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    if x.numel():
        _launch(library, "nvq_amax", x.device, x.data_ptr(), 1, x.numel(), DTYPE_CODES[x.dtype], amax.data_ptr())
    # The amax is one of w's values, so the cast back to w.dtype is exact.
    return amax.to(w.dtype).reshape(())


def nvfp4_global_scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """The compressed-tensors divisor g for a tensor or fusion-group amax, float32 [1], like
    `nvfp4.global_scale(amax, dtype)` (CT profile)."""
    _check_scalar(amax, "amax")
    check_dtype(dtype, "nvfp4_global_scale dtype")
    library = _kernels_for("nvfp4_global_scale", amax)
    if library is None:
        native = _on_cpu("nvfp4_global_scale", amax, dtype)
        return nvfp4.global_scale(amax, dtype) if native is None else native
    # The reference first rounds amax to dtype; fp32 holds that value exactly.
    a = amax.reshape(1).to(dtype).float().contiguous()
    g = torch.empty(1, dtype=torch.float32, device=a.device)
    _launch(library, "nvq_nvfp4_global_scale", a.device, a.data_ptr(), 1, DTYPE_CODES[dtype], g.data_ptr())
    return g


def nvfp4_quantize_packed(w: Tensor, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(packed uint8 [N, K/2], block_scale float8_e4m3fn [N, K/16]) of `nvfp4.quantize(w,
    global_scale=g)`, codes packed as `e2m1.pack_pairs`.

    The kernel path does not check that g is finite and > 0 (that would synchronize the device);
    `nvfp4_global_scale` never returns anything else.
    """
    check_weight(w, NVFP4_BLOCK, "NVFP4")
    _check_scalar(global_scale, "global_scale")
    x = _kernel_ready(w)
    library = _kernels_for("nvfp4_quantize_packed", x, global_scale)
    if library is None and (native := _on_cpu("nvfp4_quantize_packed", x, global_scale)) is not None:
        return native
    if library is None:
        q = nvfp4.quantize(x, global_scale=global_scale)
        return e2m1.pack_pairs(q.codes), q.block_scale
    g = global_scale.reshape(1).float().contiguous()
    rows, k = x.shape
    packed = torch.empty((rows, k // 2), dtype=torch.uint8, device=x.device)
    block_scale = torch.empty((rows, k // NVFP4_BLOCK), dtype=torch.uint8, device=x.device)
    if x.numel():
        table = torch.empty(NVFP4_TABLE_WORDS, dtype=torch.int32, device=x.device)
        _launch(
            library, "nvq_nvfp4_quantize", x.device,
            x.data_ptr(), 1, rows, k, DTYPE_CODES[x.dtype], g.data_ptr(), table.data_ptr(), packed.data_ptr(),
            block_scale.data_ptr(),
        )
    return packed, block_scale.view(torch.float8_e4m3fn)


def mxfp4_quantize_packed(w: Tensor) -> tuple[Tensor, Tensor]:
    """(packed uint8 [N, K/2], E8M0 scale uint8 [N, K/32]) of `mxfp4.quantize(w)` (CT profile)."""
    check_weight(w, MXFP4_BLOCK, "MXFP4")
    x = _kernel_ready(w)
    library = _kernels_for("mxfp4_quantize_packed", x)
    if library is None and (native := _on_cpu("mxfp4_quantize_packed", x)) is not None:
        return native
    if library is None:
        q = mxfp4.quantize(x)
        return e2m1.pack_pairs(q.codes), q.scale
    rows, k = x.shape
    packed = torch.empty((rows, k // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((rows, k // MXFP4_BLOCK), dtype=torch.uint8, device=x.device)
    if x.numel():
        _launch(
            library, "nvq_mxfp4_quantize", x.device,
            x.data_ptr(), rows, k, DTYPE_CODES[x.dtype], packed.data_ptr(), scale.data_ptr(),
        )
    return packed, scale


def nvfp4_dequantize_packed(
    packed: Tensor, block_scale: Tensor, global_scale: Tensor, dtype: torch.dtype
) -> Tensor:
    """[N, K] weight in `dtype` from packed codes, E4M3 block scales and the divisor g, like
    `nvfp4.dequantize` (compressed-tensors order: fp32(s / g) · code, one rounding)."""
    k = _check_packed(packed, block_scale, NVFP4_BLOCK, torch.float8_e4m3fn, "NVFP4")
    _check_scalar(global_scale, "global_scale")
    check_dtype(dtype, "nvfp4_dequantize_packed dtype")
    codes, scales = _kernel_ready(packed), block_scale.contiguous()
    library = _kernels_for("nvfp4_dequantize_packed", codes, scales, global_scale)
    g = global_scale.reshape(1).float().contiguous()
    if library is None and (native := _on_cpu("nvfp4_dequantize_packed", codes, scales, g, dtype)) is not None:
        return native
    if library is None:
        return nvfp4.dequantize(nvfp4.NVFP4Quantized(e2m1.unpack_pairs(codes), scales, g), dtype)
    scales = scales.view(torch.uint8)
    rows = codes.shape[0]
    out = torch.empty((rows, k), dtype=dtype, device=codes.device)
    if out.numel():
        _launch(
            library, "nvq_nvfp4_dequantize", codes.device,
            codes.data_ptr(), scales.data_ptr(), g.data_ptr(), rows, k, DTYPE_CODES[dtype], out.data_ptr(),
        )
    return out


def mxfp4_dequantize_packed(packed: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, K] weight in `dtype` from packed codes and E8M0 scale bytes, like `mxfp4.dequantize`."""
    k = _check_packed(packed, scale, MXFP4_BLOCK, torch.uint8, "MXFP4")
    check_dtype(dtype, "mxfp4_dequantize_packed dtype")
    codes, scales = _kernel_ready(packed), scale.contiguous()
    library = _kernels_for("mxfp4_dequantize_packed", codes, scales)
    if library is None and (native := _on_cpu("mxfp4_dequantize_packed", codes, scales, dtype)) is not None:
        return native
    if library is None:
        return mxfp4.dequantize(mxfp4.MXFP4Quantized(e2m1.unpack_pairs(codes), scales), dtype)
    rows = codes.shape[0]
    out = torch.empty((rows, k), dtype=dtype, device=codes.device)
    if out.numel():
        _launch(
            library, "nvq_mxfp4_dequantize", codes.device,
            codes.data_ptr(), scales.data_ptr(), rows, k, DTYPE_CODES[dtype], out.data_ptr(),
        )
    return out


# --- MoE expert stacks -----------------------------------------------------------------------
# A stack [E, N, K] of E experts, each its own tensor: one launch per step for the whole stack
# instead of one per expert (each `nvq.ops` call costs launches and small torch ops on the host).


def _check_experts(w: Tensor, block: int, fmt: str) -> None:
    _check_float_tensor(w, f"{fmt} expert stack")
    if w.ndim != 3:
        raise ValueError(f"{fmt} expert stack must be 3-D [experts, N, K], got shape {tuple(w.shape)}")
    if w.shape[2] % block:
        raise ValueError(f"{fmt} needs K % {block} == 0, got K={w.shape[2]}")
    if w.shape[0] > MAX_EXPERTS:
        raise ValueError(f"{fmt} expert stack has {w.shape[0]} experts; at most {MAX_EXPERTS} per call")


def _reference_expert_amax(x: Tensor) -> Tensor:
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=x.dtype, device=x.device)
    return torch.stack([nvfp4.tensor_amax(e) for e in x])


def expert_amax(w: Tensor) -> Tensor:
    """[E] max |w[e]| in w.dtype for a stack [E, ...], each like `nvfp4.tensor_amax(w[e])`: one launch.

    For a fusion group of stacks (an expert's gate and up share one global scale), take the
    elementwise max of their expert_amax and pass it to `nvfp4_quantize_experts(..., amax=)`.
    """
    _check_float_tensor(w, "expert_amax input")
    if w.ndim < 1:
        raise ValueError("expert_amax takes a stack [E, ...], got a 0-d tensor")
    x = _kernel_ready(w)
    experts = x.shape[0]
    per_expert = x.numel() // experts if experts else 0
    aligned = experts <= 1 or per_expert % 8 == 0  # every expert starts 16-byte aligned
    library = _kernels_for("expert_amax", x) if aligned and experts <= MAX_EXPERTS else None
    if library is None:
        _last_backend["expert_amax"] = REFERENCE
        return _reference_expert_amax(x)
    amax = torch.zeros(experts, dtype=torch.float32, device=x.device)
    if per_expert:
        _launch(library, "nvq_amax", x.device, x.data_ptr(), experts, per_expert, DTYPE_CODES[x.dtype], amax.data_ptr())
    return amax.to(w.dtype)


def nvfp4_quantize_experts(w: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(packed uint8 [E, N, K/2], block_scale float8_e4m3fn [E, N, K/16], global_scale float32 [E]) for
    a stack [E, N, K]: expert e is `nvfp4.quantize(w[e], global_scale=g[e])` with its own
    g[e] = `nvfp4.global_scale(amax[e], w.dtype)`, codes packed as `e2m1.pack_pairs`.

    `amax` [E] defaults to each expert's own (`expert_amax`); pass a fusion group's elementwise max
    to share scales across stacks. On CUDA the whole stack takes 4 launches (amax, global scales,
    cutoff tables, quantize), whatever E is.
    """
    _check_experts(w, NVFP4_BLOCK, "NVFP4")
    experts, rows, k = w.shape
    if amax is not None:
        if not isinstance(amax, Tensor) or not amax.is_floating_point() or amax.numel() != experts:
            raise ValueError(f"amax must be a float tensor of {experts} elements (one per expert), got {_describe(amax)}")
    x = _kernel_ready(w)
    tensors = (x,) if amax is None else (x, amax)
    library = _kernels_for("nvfp4_quantize_experts", *tensors)
    if library is None:
        a = expert_amax(x) if amax is None else amax.reshape(experts)
        _last_backend["nvfp4_quantize_experts"] = REFERENCE
        packed, scales, gs = [], [], []
        for e in range(experts):
            g = nvfp4.global_scale(a[e], w.dtype)
            q = nvfp4.quantize(x[e], global_scale=g)
            packed.append(e2m1.pack_pairs(q.codes))
            scales.append(q.block_scale)
            gs.append(g)
        if not experts:
            return (torch.empty((0, rows, k // 2), dtype=torch.uint8, device=x.device),
                    torch.empty((0, rows, k // NVFP4_BLOCK), dtype=torch.float8_e4m3fn, device=x.device),
                    torch.empty(0, dtype=torch.float32, device=x.device))
        return torch.stack(packed), torch.stack(scales), torch.cat(gs)
    # One launcher call: amax (unless given), global scales, cutoff tables, codes.
    a = None if amax is None else amax.reshape(experts).to(x.dtype).float().contiguous()  # as nvfp4.global_scale
    scratch = torch.empty(experts * (NVFP4_TABLE_WORDS + 1), dtype=torch.int32, device=x.device)
    g = torch.empty(experts, dtype=torch.float32, device=x.device)
    packed = torch.empty((experts, rows, k // 2), dtype=torch.uint8, device=x.device)
    block_scale = torch.empty((experts, rows, k // NVFP4_BLOCK), dtype=torch.uint8, device=x.device)
    if experts:
        table = scratch.data_ptr()
        _launch(
            library, "nvq_nvfp4_quantize_auto", x.device,
            x.data_ptr(), experts, rows, k, DTYPE_CODES[x.dtype], None if a is None else a.data_ptr(),
            table + experts * NVFP4_TABLE_WORDS * 4, g.data_ptr(), table, packed.data_ptr(), block_scale.data_ptr(),
        )
    return packed, block_scale.view(torch.float8_e4m3fn), g


def nvfp4_quantize(w: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(packed uint8 [N, K/2], block_scale float8_e4m3fn [N, K/16], global_scale float32 [1]) of a 2-D
    weight in one call: `nvfp4_quantize_experts` on a stack of one. Equal to `tensor_amax` ->
    `nvfp4_global_scale` -> `nvfp4_quantize_packed` (with `amax`, a fusion group's, if given)."""
    check_weight(w, NVFP4_BLOCK, "NVFP4")
    if amax is not None:
        _check_scalar(amax, "amax")
    packed, block_scale, g = nvfp4_quantize_experts(w.unsqueeze(0), None if amax is None else amax.reshape(1))
    _last_backend["nvfp4_quantize"] = _last_backend["nvfp4_quantize_experts"]
    return packed[0], block_scale[0], g


def mxfp4_quantize_experts(w: Tensor) -> tuple[Tensor, Tensor]:
    """(packed uint8 [E, N, K/2], E8M0 scale uint8 [E, N, K/32]) for a stack [E, N, K]: expert e is
    `mxfp4.quantize(w[e])`. MXFP4 has no tensor scale, so the stack is one [E·N, K] launch."""
    _check_experts(w, MXFP4_BLOCK, "MXFP4")
    experts, rows, k = w.shape
    packed, scale = mxfp4_quantize_packed(w.reshape(experts * rows, k))
    _last_backend["mxfp4_quantize_experts"] = _last_backend.get("mxfp4_quantize_packed", REFERENCE)
    return packed.reshape(experts, rows, k // 2), scale.reshape(experts, rows, k // MXFP4_BLOCK)


# --- status ---------------------------------------------------------------------------------


@dataclass
class KernelStatus:
    nvcc: str | None
    nvcc_release: str | None  # 'release 13.0, V13.0.88'
    gpus: list[str]
    kernel_dir: str
    sources: list[str]
    cache_dir: str
    library: str | None  # the cached library for this machine's targets, if built
    problem: str | None  # why no library can be built here, if so
    backends: dict[str, str] = field(default_factory=dict)  # op -> backend, with why when not cuda
    cpu: str = ""  # what ops on CPU tensors run on: the native codec or the reference, and why


def kernel_status() -> KernelStatus:
    """What `nvq kernels status` shows. Compiles nothing."""
    nvcc = find_nvcc()
    directory = kernel_dir()
    sources, headers = kernel_sources(directory)
    gpus = [
        f"{torch.cuda.get_device_name(i)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    ]
    library, problem = None, None
    try:
        plan = plan_build()
        library = plan.library if plan.library.is_file() else None
    except KernelBuildError as e:
        problem = str(e)
    return KernelStatus(
        nvcc=str(nvcc) if nvcc else None,
        nvcc_release=nvcc_release(nvcc_version(str(nvcc))) if nvcc else None,
        gpus=gpus,
        kernel_dir=str(directory),
        sources=[p.name for p in sources + headers],
        cache_dir=str(cache_dir()),
        library=str(library) if library else None,
        problem=problem,
        backends={op: _predicted_backend(op, bool(gpus), library, problem) for op in OPS},
        cpu=ops_cpu.status(),
    )


def _predicted_backend(op: str, has_gpu: bool, library: Path | None, problem: str | None) -> str:
    if op in _last_backend:
        return f"{_last_backend[op]} (last call)"
    if _LOADER.decided:
        return CUDA if _LOADER.library else f"{REFERENCE} ({_LOADER.reason})"
    if not has_gpu:
        return f"{REFERENCE} (no CUDA device)"
    if problem:
        return f"{REFERENCE} ({problem})"
    return CUDA if library else f"{CUDA} (compiled on first use)"
