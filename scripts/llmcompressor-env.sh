#!/usr/bin/env bash
# Create (once) and print the path of a virtual environment holding llm-compressor 0.14 on CPU,
# the peer whose W4A4 NVFP4 output (`NVFP4` preset) nvq's `--activations nvfp4` is checked
# against (tests/quant/test_act_scales_llmcompressor.py). Cached under $NVQ_CACHE_DIR. Every
# package is pinned (llmcompressor-env.lock): llm-compressor 0.14 needs transformers <= 5.17 and
# compressed-tensors 0.19, older than nvq's own test extras. The venv's name carries the lock's
# hash, so a changed lock builds a new one. It is built in a temporary sibling and renamed last,
# so an interrupted install leaves nothing. torch 2.13.0 is the CPU wheel (~200 MB): about a
# minute on an idle 2-core machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lock="$here/llmcompressor-env.lock"
LLMC_VERSION="$(sed -n 's/^llmcompressor==//p' "$lock")"
cache="${NVQ_CACHE_DIR:-$HOME/.cache/nvq}"
final="$cache/llmcompressor-$LLMC_VERSION-$(sha256sum "$lock" | cut -c1-12)"
if [ -x "$final/bin/python" ]; then
  echo "$final"
  exit 0
fi
mkdir -p "$cache"
# After the rename only bin/python is used: the scripts in bin/ keep the temporary path.
tmp="$(mktemp -d "$cache/.llmcompressor-$LLMC_VERSION-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp"
py="$tmp/bin/python"
"$py" -m pip install -q --upgrade pip >&2
# torch first and pinned: an unpinned torch pulled in by a dependency would fetch a CUDA build
"$py" -m pip install -q torch==2.13.0 >&2
"$py" -m pip install -q -r "$lock" >&2
# -I: not the working directory on sys.path
"$py" -I -c "import torch, transformers, compressed_tensors, llmcompressor" >&2
# -T: never move into a venv that a concurrent run finished first (then keep that one)
mv -T "$tmp" "$final" 2>/dev/null || rm -rf "$tmp"
trap - EXIT
echo "$final"
