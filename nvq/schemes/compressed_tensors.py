"""What the compressed-tensors schemes (nvfp4, mxfp4) share: how their checkpoints decode and
their `quantization_config`, both from the scheme's CTLayout. Not a scheme itself."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from nvq.layouts import compressed_tensors as ct
from nvq.schemes import Decoder, pairs_shape


def decoder(layout: ct.CTLayout, decode: Callable[[dict[str, Tensor]], Tensor],
            optional: tuple[str, ...] = ()) -> Decoder:
    """The `ct` profile: what nvq writes, and any compressed-tensors checkpoint of this format;
    `optional` tensors are read when present (W4A4's input scales)."""
    parts = tuple(t.name.removeprefix(".") for t in layout.output_tensors("", (0, 0)))
    return Decoder(ct.PACKED, parts, decode, pairs_shape(ct.PACKED), optional=optional, format=layout.format)


def config(layout: ct.CTLayout) -> Callable[[object, object], dict]:
    """plan, settings -> the quantization_config (weight-only, every Linear not in the plan's ignore)."""
    return lambda plan, settings: ct.quantization_config(layout, plan.ignore_list())
