"""What an engine computes from a checkpoint where it differs from the checkpoint's own arithmetic
(`nvq verify --serve-as`), so that a certificate describes what is served.

* GPTQ scales: vLLM creates the `scales` parameter in the model dtype, so a bf16 model serves
  its fp16 scales rounded to bf16 (vLLM 0.32 `auto_gptq.py`; 60 load warnings on SmolLM2).
* MXFP4 activations: on Blackwell (SM100+) vLLM serves compressed-tensors MXFP4 with
  `CompressedTensorsW4A4Mxfp4` (and its MoE twin) whatever `input_activations` says: each
  Linear's input is quantized to MXFP4 per token, blocks of 32, the EVEN scale rule (its
  emulation calls amd-quark's `qdq_mxfp4(x, "even")`, whose `even_round` is nvq's EVEN rule).
  Elsewhere it runs Marlin, weight-only.

The candidate and every expected-noise draw are served alike, so the band is the served one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from nvq import ops
from nvq.models.layers import InputQuantized


def mxfp4_inputs(x: torch.Tensor) -> torch.Tensor:
    """x quantized to MXFP4 per row (blocks of 32 along the last dim) and back, in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    packed, scale = ops.mxfp4_quantize_packed(rows.contiguous())
    return ops.mxfp4_dequantize_packed(packed, scale, torch.float32).to(x.dtype).reshape(x.shape)


class MXFP4Inputs(InputQuantized):
    quantize_input = staticmethod(mxfp4_inputs)


@dataclass(frozen=True)
class Serving:
    name: str
    what: str
    gptq_scales_in_model_dtype: bool = False
    # candidate scheme name -> the weight type whose inputs are quantized
    input_quantized: Mapping[str, type[InputQuantized]] = field(default_factory=dict)
    # whether the engine quantizes inputs where the checkpoint declares it (nvq.verify.act_inputs)
    declared_inputs: bool = False
    # canonical name -> its weight type (an expert stack: one per expert), from the declaration
    module_inputs: Mapping[str, object] = field(default_factory=dict)

    def needs_view(self, schemes: Mapping) -> bool:
        return bool(self.module_inputs) or any(s.name in self.input_quantized for s in schemes.values())


SERVINGS = {
    "checkpoint": Serving("checkpoint", "the checkpoint's own arithmetic (transformers, GPTQModel, llama.cpp)",
                          declared_inputs=True),
    "vllm": Serving("vllm", "vLLM on CPU, Ampere and Hopper: GPTQ scales in the model dtype, FP4 weight-only",
                    gptq_scales_in_model_dtype=True),
    "vllm-sm100": Serving("vllm-sm100", "vLLM on Blackwell (SM100+): as vllm, and MXFP4 Linears and experts "
                          "quantize their inputs to MXFP4", gptq_scales_in_model_dtype=True,
                          input_quantized={"mxfp4": MXFP4Inputs}, declared_inputs=True),
}
DEFAULT_SERVING = "checkpoint"


class ServedView(Mapping[str, torch.Tensor]):
    """A lane's weights as the engine serves them: tensors of the listed schemes typed so that
    their Linears quantize their inputs. Partial reads pass through, typed alike."""

    def __init__(self, source, schemes: Mapping, serving: Serving) -> None:
        self.source = source
        self.kinds = {n: serving.input_quantized[s.name] for n, s in schemes.items()
                      if s.name in serving.input_quantized}
        self.kinds.update(serving.module_inputs)

    def _typed(self, name: str, t: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        kind = self.kinds.get(name)
        if isinstance(kind, tuple):  # one type per expert: a whole stack stays untyped
            kind = kind[expert] if expert is not None else None
        return t.as_subclass(kind) if kind is not None else t

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._typed(name, self.source[name])

    def __contains__(self, name: object) -> bool:
        return name in self.source

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self.source.rows(name, ids)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.source.row_block(name, start, stop)

    def expert(self, name: str, e: int) -> torch.Tensor:
        return self._typed(name, self.source.expert(name, e), e)

