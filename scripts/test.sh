#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite (this is what CI runs).
# Extra arguments go to pytest, e.g. scripts/test.sh -k nvfp4
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$("$root/scripts/setup.sh" test | tail -n 1)"
# The HTML report is checked in headless Chromium: Debian's package where apt can install it.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq chromium; } >/dev/null 2>&1 || echo "chromium could not be installed" >&2
fi
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
