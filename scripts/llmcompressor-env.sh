#!/usr/bin/env bash
# Create (once) and print the path of a virtual environment holding llm-compressor 0.14 on CPU,
# the peer whose W4A4 NVFP4 output (`NVFP4` preset) nvq's `--activations nvfp4` is checked
# against (tests/quant/test_act_scales_llmcompressor.py). Cached under $NVQ_CACHE_DIR. Every
# package is pinned (llmcompressor-env.lock): llm-compressor 0.14 needs transformers <= 5.17 and
# compressed-tensors 0.19, older than nvq's own test extras. torch 2.13.0 goes first and pinned
# (an unpinned torch pulled in by a dependency would fetch a CUDA build): the CPU wheel, ~200 MB,
# about a minute on an idle 2-core machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/pinned-venv.sh" llmcompressor "$here/llmcompressor-env.lock" \
  "torch, transformers, compressed_tensors, llmcompressor" torch==2.13.0
