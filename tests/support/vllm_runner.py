"""Serve checkpoints with vLLM's CPU build and report what it generated. Runs INSIDE the vLLM
venv (scripts/vllm-env.sh), as `python vllm_runner.py REQUEST.json`, started by
tests/support/vllm_client.py; it imports only vLLM and what vLLM brings.

REQUEST: {"requests": [{"checkpoint": dir, "prompt": [token ids]}, ...], "max_tokens": n,
"logprobs": k}. For each checkpoint, in order, one stdout line "NVQ-VLLM-RESULT {json}" with
checkpoint, ok, error (the full traceback), warnings (vLLM's WARNING/ERROR log lines), tokens
(greedy), logprobs[i] (of generated token i), top[i] (its top-k {id: logprob}), prompt_logprobs[j]
(of prompt token j + 1 given the tokens before it) and seconds.

vLLM 0.32's CPU build has no kernel for compressed-tensors NVFP4 or MXFP4 (linear or MoE), and
its AVX2 library lacks the GPTQ one (cpu_gemm_wna16). Stand-ins replace only those kernels, and
dequantize what vLLM loaded with vLLM's own decoders: config parsing, scheme choice, parameter
creation, weight_loader, qkv/gate_up and w13/w2 shard fusion, and the schemes' own
process_weights_after_loading stay vLLM's, so a loading mistake shows up in the output.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: one log
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import torch  # noqa: E402

# One short sequence at a time: a small token budget keeps vLLM's start-up profiling run short.
ENGINE = dict(enforce_eager=True, max_model_len=128, max_num_batched_tokens=128, max_num_seqs=1,
              enable_prefix_caching=False)


class WarningLog:
    """Collects vLLM's WARNING and ERROR records while a checkpoint loads and runs. It hooks record
    creation, not a handler: the engine reconfigures vLLM's loggers (and drops handlers) as it starts."""

    def __init__(self):
        self.lines: list[str] = []
        self._factory = logging.getLogRecordFactory()

    def __enter__(self):
        def make(*args, **kwargs):
            record = self._factory(*args, **kwargs)
            if record.levelno >= logging.WARNING and record.name.startswith("vllm"):
                line = f"{record.levelname} {record.name}: {record.getMessage()}"
                if record.exc_info:  # logger.exception: the cause is in the exception
                    line += "\n" + "".join(traceback.format_exception(*record.exc_info))
                self.lines.append(line)
            return record

        logging.setLogRecordFactory(make)
        return self

    def __exit__(self, *exc):
        logging.setLogRecordFactory(self._factory)


# ---------------------------------------------------------------------------------------------
# Decoders: what a GPU kernel reads from the tensors vLLM loaded, as dense float32.
# ---------------------------------------------------------------------------------------------


def dequant_nvfp4(packed, block_scale, multiplier):
    """vLLM's own NVFP4 decoder (its emulation path): e2m1 · fp8 block scale · global multiplier
    (per expert for a [E, N, K/2] stack)."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        dequantize_to_dtype,
    )

    return dequantize_to_dtype(packed, block_scale, multiplier, torch.float32, swizzle=False)


def dequant_mxfp4(packed, e8m0):
    """e2m1 (vLLM's nibble decoder, low nibble first) · 2^(e8m0 − 127) per 32 elements."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import break_fp4_bytes

    lead = packed.shape[:-1]
    codes = break_fp4_bytes(packed.reshape(-1, packed.shape[-1]), torch.float32)
    scale = torch.exp2(e8m0.to(torch.float32) - 127.0).unsqueeze(-1)
    return (codes.reshape(*lead, -1, 32) * scale).reshape(*lead, -1)


def dequant_gptq(words, scales, packed_dim, group_dim):
    """Symmetric GPTQ int4 (uint4b8): (q − 8) · the scale of the value's group along group_dim."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        unpack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    wtype = scalar_types.uint4b8
    q = unpack_quantized_values_into_int32(words, wtype, packed_dim).float() - wtype.bias
    group = q.shape[group_dim] // scales.shape[group_dim]
    return q * scales.float().repeat_interleave(group, dim=group_dim)


def dequant_int4_bytes(packed, scales):
    """Symmetric int4 in bytes, two values each, low nibble first: (q − 8) · scale per group."""
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1).float() - 8
    group = q.shape[-1] // scales.shape[-1]
    return q * scales.float().repeat_interleave(group, dim=-1)


# ---------------------------------------------------------------------------------------------
# Linear stand-ins
# ---------------------------------------------------------------------------------------------


class StandInLinearKernel:
    """A weight-only FP4 linear kernel: the layer's tensors, as the scheme's own
    process_weights_after_loading left them, dequantized once, then a plain linear."""

    def __init__(self, decode):
        self._decode = decode

    def input_quant_key(self):
        return None

    def process_weights_after_loading(self, layer) -> None:
        layer.stand_in_weight = self._decode(layer)

    def apply_weights(self, layer, x, bias=None):
        if layer.stand_in_weight.dtype != x.dtype:
            layer.stand_in_weight = layer.stand_in_weight.to(x.dtype)
        return torch.nn.functional.linear(x, layer.stand_in_weight, bias)


def _nvfp4_weight(layer):
    # weight = packed e2m1, weight_scale = fp8 blocks, weight_global_scale = 1/max(divisors)
    return dequant_nvfp4(layer.weight, layer.weight_scale, layer.weight_global_scale)


def _mxfp4_weight(layer):
    return dequant_mxfp4(layer.weight, layer.weight_scale)


def cpu_wna16_apply(kernel, layer, x, bias=None):
    """CPUWNA16LinearKernel.apply_weights for CPUs whose vLLM library lacks cpu_gemm_wna16 (the
    AVX2 build has none): the kernel's repacked weight decoded on first use, then a linear."""
    if not hasattr(layer, "stand_in_weight"):
        w_q, w_s, w_zp = kernel._get_weight_params(layer)
        if w_zp is not None or kernel.config.weight_type.bias != 8:
            raise NotImplementedError("the stand-in decodes symmetric int4 GPTQ only")
        # undo the kernel's blocking: [N/16, K·2] words → [K, N/8], 8 output columns per word
        n, k = w_q.shape[0] * 16, w_q.shape[1] // 2
        words = w_q.view(n // 16, k, 2).permute(1, 0, 2).reshape(k, n // 8)
        layer.stand_in_weight = dequant_gptq(words, w_s, 1, 0).t().to(x.dtype)  # scales [K/G, N]
    return torch.nn.functional.linear(x, layer.stand_in_weight, bias)


# ---------------------------------------------------------------------------------------------
# MoE stand-in
# ---------------------------------------------------------------------------------------------


def _stand_in_experts(decode):
    """vLLM's portable CPU MoE experts (CPUUnquantizedExperts: its routing-weighted grouped GEMM,
    cpu_fused_moe) on expert stacks decoded on first use by `decode(w13, w2, experts)` from the
    tensors the MoE method hands its kernel and the scales in vLLM's quant config."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    class StandInExperts(CPUUnquantizedExperts):
        _dense = None

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key) -> bool:
            return activation_key is None  # weight-only: activations stay bf16

        def process_weights_after_loading(self, layer) -> None:
            pass  # the packed stacks stay as the MoE method left them

        def apply(self, output, hidden_states, w1, w2, *args, **kwargs):
            if self._dense is None:
                size = self.moe_config.intermediate_size_per_partition
                if self._padded_intermediate_size(self.moe_config) != size:
                    raise NotImplementedError(f"the stand-in does not pad intermediate size {size}")
                self._dense = [ops.cpu_prepack_moe_weight(w.to(hidden_states.dtype).contiguous(),
                                                          self.isa) for w in decode(w1, w2, self)]
            super().apply(output, hidden_states, *self._dense, *args, **kwargs)

    return StandInExperts


def _nvfp4_stacks(w13, w2, experts):
    # g1/g2_alphas: 1/global scale per expert (w13: the gate's for both halves, as vLLM keeps)
    return (dequant_nvfp4(w13, experts.w1_scale, experts.g1_alphas),
            dequant_nvfp4(w2, experts.w2_scale, experts.g2_alphas))


def _mxfp4_stacks(w13, w2, experts):
    return dequant_mxfp4(w13, experts.w1_scale), dequant_mxfp4(w2, experts.w2_scale)


def _gptq_stacks(w13, w2, experts):
    # AutoGPTQMoEMethod's canonical layout: [E, N, K/8] words packed along K, scales [E, N, K/G]
    return dequant_gptq(w13, experts.w1_scale, 2, 2), dequant_gptq(w2, experts.w2_scale, 2, 2)


def _wna16_bytes_stacks(w13, w2, experts):
    # MoeWNA16Method's layout (the path when Marlin MoE refuses the shape, e.g. hidden % 128):
    # [E, N, K/2] bytes, low nibble first, scales [E, N, K/G]
    return dequant_int4_bytes(w13, experts.w1_scale), dequant_int4_bytes(w2, experts.w2_scale)


def _unchanged_nvfp4_moe_format(nvfp4_backend, layer, w13, w13_scale, w13_scale_2, a13_scale, w2,
                                w2_scale, w2_scale_2, a2_scale, **_):
    return w13, w13_scale, w13_scale_2, a13_scale, w2, w2_scale, w2_scale_2, a2_scale


def _unchanged_wna16_moe_format(backend, layer, quant_config, input_dtype, w13, w2, w13_scale,
                                w2_scale, w13_qzeros=None, w2_qzeros=None, w13_bias=None,
                                w2_bias=None):
    return w13, w2, w13_scale, w2_scale, w13_qzeros, w2_qzeros, None, None, w13_bias, w2_bias


def _modular_kernel(moe_quant_config, moe_config, experts_cls, backend=None, routing_tables=None):
    """make_wna16_moe_kernel's construction, without its list of allowed GPU experts."""
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.all2all_utils import maybe_make_prepare_finalize

    prepare_finalize = maybe_make_prepare_finalize(
        moe=moe_config, quant_config=moe_quant_config, routing_tables=routing_tables,
        allow_new_interface=True, use_monolithic=False)
    return mk.FusedMoEKernel(prepare_finalize, experts_cls(moe_config=moe_config,
                                                           quant_config=moe_quant_config))


def install_stand_ins() -> None:
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend
    from vllm.model_executor.layers.quantization import auto_gptq, moe_wna16
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w4a4_mxfp4 as mx_moe,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w4a4_nvfp4 as nv_moe,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        compressed_tensors_w4a4_mxfp4 as mx,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        compressed_tensors_w4a4_nvfp4 as nv,
    )

    nv.init_nvfp4_linear_kernel = lambda use_a16=False: StandInLinearKernel(_nvfp4_weight)
    mx.init_mxfp4_linear_kernel = lambda activation_quant_key=None: StandInLinearKernel(_mxfp4_weight)
    # MoE: the weight-only GPU choices (Marlin, w4a16 quant configs) with the expert GEMMs
    # swapped; the methods' process_weights_after_loading (renames, global-scale choice, GPTQ's
    # N-first layout), quant configs and prepare/finalize stay vLLM's.
    nv_moe.select_nvfp4_moe_backend = lambda **_: (NvFp4MoeBackend.MARLIN,
                                                   _stand_in_experts(_nvfp4_stacks))
    nv_moe.convert_to_nvfp4_moe_kernel_format = _unchanged_nvfp4_moe_format
    mx_moe.MarlinExperts = _stand_in_experts(_mxfp4_stacks)
    mx_moe.prepare_moe_fp4_layer_for_marlin = lambda layer, *args, **kwargs: None
    auto_gptq.select_wna16_moe_backend = lambda *args, **kwargs: (WNA16MoEBackend.MARLIN,
                                                                  _stand_in_experts(_gptq_stacks))
    auto_gptq.convert_to_wna16_moe_kernel_format = _unchanged_wna16_moe_format
    auto_gptq.make_wna16_moe_kernel = _modular_kernel
    moe_wna16.select_wna16_moe_backend = lambda *args, **kwargs: (
        WNA16MoEBackend.TRITON, _stand_in_experts(_wna16_bytes_stacks))
    moe_wna16.convert_to_wna16_moe_kernel_format = _unchanged_wna16_moe_format
    moe_wna16.make_wna16_moe_kernel = _modular_kernel
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel

        CPUWNA16LinearKernel.apply_weights = cpu_wna16_apply


# ---------------------------------------------------------------------------------------------
# One checkpoint
# ---------------------------------------------------------------------------------------------


def _top(entry) -> dict[str, float]:
    return {str(t): float(lp.logprob) for t, lp in (entry or {}).items()}


def _generated(result, prompt: list[int]) -> dict:
    gen = result.outputs[0]
    return dict(
        tokens=list(gen.token_ids),
        logprobs=[float(step[t].logprob) for t, step in zip(gen.token_ids, gen.logprobs, strict=True)],
        top=[_top(step) for step in gen.logprobs],
        prompt_logprobs=[float(step[t].logprob) for t, step in zip(prompt[1:], result.prompt_logprobs[1:], strict=True)],
    )


def serve(checkpoint: str, prompt: list[int], max_tokens: int, k: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    out = {"checkpoint": checkpoint, "ok": False, "error": None}
    llm = None
    with WarningLog() as log:
        try:
            llm = LLM(model=checkpoint, dtype="bfloat16", seed=0, skip_tokenizer_init=True,
                      **ENGINE)
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=k,
                                    prompt_logprobs=k, detokenize=False, ignore_eos=True)
            (result,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            out.update(ok=True, **_generated(result, prompt))
        except Exception:
            out["error"] = traceback.format_exc()
    del llm  # the engine and its KV cache go before the next checkpoint's
    gc.collect()
    out["warnings"] = log.lines
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(request_path: str) -> None:
    request = json.loads(open(request_path).read())
    install_stand_ins()
    for r in request["requests"]:
        result = serve(r["checkpoint"], r["prompt"], request["max_tokens"], request["logprobs"])
        print("NVQ-VLLM-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
