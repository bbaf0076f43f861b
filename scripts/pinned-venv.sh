#!/usr/bin/env bash
# Create (once) and print the path of a cached virtual environment in which every package is pinned
# by a lock file: the peers' venvs (gptqmodel-env.sh, llmcompressor-env.sh).
# Usage: pinned-venv.sh NAME LOCK IMPORTS [FIRST]   e.g. pinned-venv.sh gptqmodel x.lock "torch, gptqmodel"
# The venv is $NVQ_CACHE_DIR/NAME-<NAME's version in LOCK>-<lock hash>, so a changed lock builds a
# new one. It is built in a temporary sibling and renamed last, so an interrupted install leaves
# nothing. FIRST, if given, is installed before the lock (torch, so no dependency picks its build).
set -euo pipefail
name="$1" lock="$2" imports="$3" first="${4:-}"
version="$(sed -n "s/^$name==//p" "$lock")"
cache="${NVQ_CACHE_DIR:-$HOME/.cache/nvq}"
final="$cache/$name-$version-$(sha256sum "$lock" | cut -c1-12)"
if [ -x "$final/bin/python" ]; then
  echo "$final"
  exit 0
fi
mkdir -p "$cache"
# After the rename only bin/python is used: the scripts in bin/ keep the temporary path.
tmp="$(mktemp -d "$cache/.$name-$version-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp"
py="$tmp/bin/python"
"$py" -m pip install -q --upgrade pip >&2
if [ -n "$first" ]; then "$py" -m pip install -q "$first" >&2; fi
"$py" -m pip install -q -r "$lock" >&2
# -I: not the working directory on sys.path (the repository's kernels/ would shadow a package)
"$py" -I -c "import $imports" >&2
# -T: never move into a venv that a concurrent run finished first (then keep that one)
mv -T "$tmp" "$final" 2>/dev/null || rm -rf "$tmp"
trap - EXIT
echo "$final"
