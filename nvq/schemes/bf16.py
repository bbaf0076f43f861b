"""The dense scheme: `nvq convert MODEL.gguf OUT --scheme bf16` writes a dense Hugging Face
checkpoint (GGUF -> HF only for now). Verify models every dense candidate dtype with it: storing
a value in a dtype rounds it to that dtype."""

from __future__ import annotations

import torch
from torch import Tensor

from nvq import schemes

NAME = "bf16"
# candidate storage name -> the dtype it rounds to
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16, "f64": torch.float64}


def expected(w: Tensor, storage, groups: Tensor | None, g: Tensor | None) -> Tensor:
    return w.to(DTYPES[storage.name]).float()


SPEC = schemes.register(
    schemes.SchemeSpec(
        name=NAME,
        summary="dense; a GGUF file to a Hugging Face checkpoint",
        expected=expected,
        dense=True,
        storage_names=tuple(DTYPES),
    )
)
