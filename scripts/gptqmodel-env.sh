#!/usr/bin/env bash
# Create (once) and print the path of a virtual environment holding transformers + optimum +
# gptqmodel on CPU, the client that tests/clients/test_gptqmodel_smollm2.py loads nvq's GPTQ
# output into. Cached under $NVQ_CACHE_DIR. Every package is pinned (gptqmodel-env.lock; README
# "transformers + gptqmodel" names the version).
#
# gptqmodel 7.7 needs torch >= 2.14.1; PyPI has only the CUDA build of 2.14.1 (it runs on CPU),
# so a cold build installs ~6 GB (torch + nvidia-* wheels): 3 min on an idle 2-core machine,
# 28 min on a heavily loaded one (measured).
# gptqmodel 7.7 ships no compiled extension (pure-Python wheel built from its sdist): its kernels
# are JIT-compiled on first use, and the CPU path used here (the torch dequantizing backend) needs none.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# BUILD_CUDA_EXT=0 keeps any older sdist's setup.py from compiling CUDA kernels (7.7's has none)
BUILD_CUDA_EXT=0 exec "$here/pinned-venv.sh" gptqmodel "$here/gptqmodel-env.lock" \
  "torch, transformers, optimum.gptq, gptqmodel"
