#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite (this is what CI runs).
# Extra arguments go to pytest, e.g. scripts/test.sh -k nvfp4
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$("$root/scripts/setup.sh" test | tail -n 1)"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
