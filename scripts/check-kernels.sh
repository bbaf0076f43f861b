#!/usr/bin/env bash
# Compile every kernels/*.cu for sm_90a with every warning an error (nvcc's, ptxas' and the host
# compiler's). Compile only: CI has no GPU. The flags are nvq/ops.py's BASE_FLAGS minus --shared,
# plus -Werror for the host compiler. Skips (exit 0) only when nvcc is not installed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

nvcc=""
for candidate in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then nvcc="$candidate"; break; fi
done
if [ -z "$nvcc" ]; then
  echo "check-kernels: SKIPPED, nvcc not found (\$CUDA_HOME/bin, PATH, /usr/local/cuda/bin); kernels/*.cu were not compiled." >&2
  exit 0
fi

shopt -s nullglob
sources=("$root"/kernels/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check-kernels: no kernels/*.cu to compile." >&2
  exit 0
fi

objects="$(mktemp -d)"
trap 'rm -rf "$objects"' EXIT
for src in "${sources[@]}"; do
  "$nvcc" -c -O3 -std=c++17 -Xcompiler -fPIC,-Wall,-Wextra,-Werror -Werror all-warnings \
    -gencode=arch=compute_90a,code=sm_90a "$src" -o "$objects/$(basename "$src" .cu).o"
done
echo "check-kernels: ${#sources[@]} kernel sources compile warning-free for sm_90a ($("$nvcc" --version | grep -o 'release [^,]*'))."
