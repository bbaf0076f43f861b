#!/usr/bin/env bash
# Create (once) and print the path of a virtual environment holding transformers + optimum +
# gptqmodel on CPU, the client that tests/clients/test_gptqmodel_smollm2.py loads nvq's GPTQ
# output into. Cached under $NVQ_CACHE_DIR. Every package is pinned (gptqmodel-env.lock); the
# venv's name carries the lock's hash, so a changed lock builds a new one.
# It is built in a temporary sibling and renamed last, so an interrupted install leaves nothing.
#
# gptqmodel 7.7 needs torch >= 2.14.1; PyPI has only the CUDA build of 2.14.1 (it runs on CPU),
# so a cold build installs ~6 GB (torch + nvidia-* wheels): 3 min on an idle 2-core machine,
# 28 min on a heavily loaded one (measured).
# gptqmodel 7.7 ships no compiled extension (pure-Python wheel built from its sdist): its kernels
# are JIT-compiled on first use, and the CPU path used here (the torch dequantizing backend) needs none.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lock="$here/gptqmodel-env.lock"
GPTQMODEL_VERSION="$(sed -n 's/^gptqmodel==//p' "$lock")"  # README "transformers + gptqmodel" names it
cache="${NVQ_CACHE_DIR:-$HOME/.cache/nvq}"
final="$cache/gptqmodel-$GPTQMODEL_VERSION-$(sha256sum "$lock" | cut -c1-12)"
if [ -x "$final/bin/python" ]; then
  echo "$final"
  exit 0
fi
mkdir -p "$cache"
# After the rename only bin/python is used: the scripts in bin/ keep the temporary path.
tmp="$(mktemp -d "$cache/.gptqmodel-$GPTQMODEL_VERSION-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp"
py="$tmp/bin/python"
"$py" -m pip install -q --upgrade pip >&2
# the lock holds every package of the venv; BUILD_CUDA_EXT=0 keeps any older sdist's setup.py
# from compiling CUDA kernels (7.7's has none to build)
BUILD_CUDA_EXT=0 "$py" -m pip install -q -r "$lock" >&2
# -I: not the working directory on sys.path (the repository's kernels/ would shadow the package)
"$py" -I -c "import torch, transformers, optimum.gptq, gptqmodel" >&2
# -T: never move into a venv that a concurrent run finished first (then keep that one)
mv -T "$tmp" "$final" 2>/dev/null || rm -rf "$tmp"
trap - EXIT
echo "$final"
