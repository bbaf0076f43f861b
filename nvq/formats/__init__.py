"""Numeric formats nvq can write: one pure-torch reference codec per format, plus a table of
their storage costs. Byte layouts for containers (GGUF blocks, ...) live in `nvq.layouts`."""

from dataclasses import dataclass
from types import ModuleType

from nvq.formats import mxfp4, nvfp4
from nvq.formats.constants import MXFP4_BLOCK, NVFP4_BLOCK

__all__ = ["FormatInfo", "FORMATS", "get_format"]

_E2M1_BITS = 4
_FP8_SCALE_BITS = 8
_E8M0_SCALE_BITS = 8
_FP32_BITS = 32


@dataclass(frozen=True)
class FormatInfo:
    name: str
    block_size: int  # elements that share one block scale
    element_bits: int
    block_scale_bits: int
    tensor_scale_bits: int  # per-tensor scalar (NVFP4's fp32 global scale), 0 if none
    module: ModuleType  # has quantize(w, ...) and dequantize(q, dtype)

    @property
    def bits_per_weight(self) -> float:
        """Element plus amortised block scale; the per-tensor scalar is not included."""
        return self.element_bits + self.block_scale_bits / self.block_size

    def tensor_bits(self, n_elements: int) -> int:
        """Exact storage of one tensor of `n_elements` weights, per-tensor scalar included."""
        blocks = n_elements // self.block_size
        return (
            n_elements * self.element_bits + blocks * self.block_scale_bits + self.tensor_scale_bits
        )


FORMATS: dict[str, FormatInfo] = {
    "nvfp4": FormatInfo("nvfp4", NVFP4_BLOCK, _E2M1_BITS, _FP8_SCALE_BITS, _FP32_BITS, nvfp4),
    "mxfp4": FormatInfo("mxfp4", MXFP4_BLOCK, _E2M1_BITS, _E8M0_SCALE_BITS, 0, mxfp4),
}


def get_format(name: str) -> FormatInfo:
    """Look a format up by name; ValueError lists the known names."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None
