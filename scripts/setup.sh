#!/usr/bin/env bash
# Create the virtual environment (.venv, or $NVQ_VENV) and install nvq into it, editable.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${NVQ_VENV:-$root/.venv}"
extras="${1:-}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# torch is pinned and installed first: an unpinned torch pulled in by a dependency would fetch
# the newest CUDA build (several GB); 2.13.0 resolves to the CPU build on CPU-only machines.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q torch==2.13.0
if [ -n "$extras" ]; then
  "$py" -m pip install -q -e "$root[$extras]"
else
  "$py" -m pip install -q -e "$root"
fi
echo "$venv"
