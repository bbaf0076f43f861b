#!/usr/bin/env bash
# Set up .venv and run the embedded demo: build a SmolLM2-shaped checkpoint, plan it,
# convert it to NVFP4 and MXFP4, and print the summaries (outputs under out/quickstart/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$("$root/scripts/setup.sh" | tail -n 1)"
cd "$root"
exec "$venv/bin/python" examples/quickstart.py "$@"
