"""GPTQ int4 (formats.md §4): symmetric v1 checkpoints with trivial g_idx, calibrated over the
whole model (nvq.quant.gptq_write) or rounded to nearest. Verify also reads v2 and act-order
g_idx, any group size (nvq.layouts.gptq)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from nvq import limits, schemes
from nvq.formats import int4
from nvq.formats.constants import GPTQ_DEFAULT_GROUP, GPTQ_PACK
from nvq.layouts import gptq as layout
from nvq.quant import gptq_write

NAME = "gptq"
GROUP_SIZES = (128, 64, 32)  # what Marlin serves (formats.md §4.4), largest first
# storage profile -> the dtype the serving engine holds the scales in (nvq.verify.serving)
SERVED_SCALES = {"bf16-scales": torch.bfloat16}
SERVING_NOTE = (
    "vLLM holds GPTQ's fp16 scales in the model dtype (bfloat16) and rounds them on load; "
    "`nvq verify --serve-as vllm` certifies what it serves."
)
# GPTQ moves weights to cancel output error: on SmolLM2 (group 64) its weight rel-L2 is 1.27× that
# of round-to-nearest at the median and 2.83× at worst (blk.11.ffn_down), so its weight band is
# widened to cover that; its output error, which the taps judge, is below round-to-nearest's.
WEIGHT_SLACK = 3.2  # with weight_factor 1.25: 4× round-to-nearest's error


def at_group_size(group_size: int | None) -> layout.GPTQLayout:
    limits.check_group_size(group_size)
    return layout.GPTQLayout(GPTQ_DEFAULT_GROUP if group_size is None else group_size)


def encode(w: Tensor, group_size: int = GPTQ_DEFAULT_GROUP) -> dict[str, Tensor]:
    return layout.pack(int4.quantize(w, group_size))


def expected(w: Tensor, storage, groups: Tensor | None, g: Tensor | None) -> Tensor:
    # Round-to-nearest with the candidate's own groups: GPTQ trades a weight error of about this
    # size for a smaller output error, so RTN is the expected band for both.
    q = int4.quantize(w, storage.group_size or -1, g_idx=groups)
    if storage.profile in SERVED_SCALES:
        q = replace(q, scale=q.scale.to(SERVED_SCALES[storage.profile]))
    return int4.dequantize(q, torch.float32)


def _decoder(checkpoint_format: str) -> schemes.Decoder:
    return schemes.Decoder(
        "qweight",
        ("qweight", "qzeros", "scales"),
        lambda t: layout.dequantize(t, checkpoint_format),
        lambda s: (s["qweight"][1], GPTQ_PACK * s["qweight"][0]),  # qweight [K/8, N]
        optional=("g_idx",),
        format=checkpoint_format,
    )


SPEC = schemes.register(
    schemes.SchemeSpec(
        name=NAME,
        summary="GPTQ v1 int4, symmetric: qweight, qzeros, fp16 scales, trivial g_idx",
        expected=expected,
        group_sizes=GROUP_SIZES,
        layout=at_group_size,
        encode=encode,
        whole_model=gptq_write.quantize_all,
        settings=gptq_write.GPTQSettings,
        decoders={fmt: _decoder(fmt) for fmt in layout.ZERO_OFFSET},  # v1 and v2
        # -1: one group per row
        scale_block=lambda storage, k: k if (storage.group_size or -1) <= 0 else storage.group_size,
        quantization_config=gptq_write.quantization_config,
        # AutoGPTQ-era loaders read quantize_config.json; vLLM prefers config.json (formats.md §4.2)
        config_copies=("quantize_config.json",),
        serving_notes=lambda model_dtype: [SERVING_NOTE] if model_dtype == "bfloat16" else [],
        weight_slack=WEIGHT_SLACK,
        # GPTQ solves each row against the layer's input statistics, so a row's weights may move far
        # where its inputs are small: SmolLM2's blk.11.ffn_down row 507 sits at 12.8× round-to-nearest's
        # error, past 3× its own energy or at zero, so GPTQ rows are not judged one by one.
        judge_rows=False,
        column_pack=(GPTQ_PACK, "qzeros packing"),
    )
)
