"""Load GPTQ checkpoints with transformers + optimum + gptqmodel on CPU and report what they
generate. Runs INSIDE the gptqmodel venv (scripts/gptqmodel-env.sh), as
`python gptqmodel_runner.py REQUEST.json`, started by tests/support/gptqmodel_client.py; it imports
only what that venv holds.

REQUEST: {"requests": [{"checkpoint": dir, "prompts": [[token ids], ...]}, ...],
"max_new_tokens": n, "dtype": "bfloat16" | "float16" | "float32" | "auto", "top": k}.
For each checkpoint, in order, one stdout line "NVQ-GPTQMODEL-RESULT {json}" with
checkpoint, ok, error (the full traceback), warnings (WARNING/ERROR log records and Python
warnings of transformers, optimum and gptqmodel), loading (transformers' missing / unexpected /
mismatched keys), config (the quantization config as transformers parsed it, and the
modules_in_block_to_quantize that optimum applied), kernels ({QuantLinear class: count}),
dense_linears (nn.Linear modules left unquantized), dtype (of the loaded model), and per prompt
tokens (greedy, `generate(do_sample=False)`, the prompts in one left-padded batch), logprobs[i] (of generated token i) and top[i]
(its top-k {id: logprob}), seconds.

The model is loaded the way a user would: `AutoModelForCausalLM.from_pretrained(dir,
device_map="cpu", dtype=...)`; transformers hands the quantization_config to optimum's
GPTQQuantizer, which replaces the Linears of the decoder blocks by gptqmodel's QuantLinear
(backend "auto": on a CPU without AVX512-BF16, the torch dequantizing kernel).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

RESULT_PREFIX = "NVQ-GPTQMODEL-RESULT "
LOGGERS = ("transformers", "optimum", "gptqmodel")


class WarningLog:
    """WARNING and ERROR records of the three libraries' loggers, and Python warnings, while one
    checkpoint loads and runs. Hooks record creation, as vllm_runner.py does: gptqmodel's logger
    is its own (logbar) and may not propagate."""

    def __init__(self):
        self.lines: list[str] = []
        self._factory = logging.getLogRecordFactory()
        self._catch = warnings.catch_warnings(record=True)

    def __enter__(self):
        def make(*args, **kwargs):
            record = self._factory(*args, **kwargs)
            if record.levelno >= logging.WARNING and record.name.startswith(LOGGERS):
                self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")
            return record

        logging.setLogRecordFactory(make)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        self.lines += [f"{w.category.__name__}: {w.message}" for w in self._caught]
        logging.setLogRecordFactory(self._factory)


def _config_as_parsed(model) -> dict:
    """What transformers and optimum made of the checkpoint's quantization_config."""
    qc = model.config.quantization_config
    parsed = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    out = {"transformers": {k: parsed.get(k) for k in (
        "quant_method", "bits", "group_size", "sym", "desc_act", "format", "checkpoint_format",
        "backend", "modules_in_block_to_quantize", "dynamic", "meta")}}
    out["transformers"]["has_dynamic"] = "dynamic" in parsed
    quantizer = getattr(model, "hf_quantizer", None)
    optimum = getattr(quantizer, "optimum_quantizer", None)
    if optimum is not None:
        out["optimum"] = {
            "modules_in_block_to_quantize": optimum.modules_in_block_to_quantize,
            "block_name_to_quantize": optimum.block_name_to_quantize,
            "desc_act": optimum.desc_act,
            "format": optimum.format,
            "dynamic": getattr(optimum, "dynamic", None),
            "quant_linear": getattr(getattr(optimum, "quant_linear", None), "__name__", None),
        }
    return out


def run_one(req: dict, max_new_tokens: int, dtype: str, top_k: int) -> dict:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    out = {"checkpoint": req["checkpoint"], "ok": False, "error": None, "warnings": [],
           "results": []}
    with WarningLog() as log:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                req["checkpoint"], device_map="cpu", output_loading_info=True,
                dtype=dtype if dtype == "auto" else getattr(torch, dtype))
            model.eval()
            out["loading"] = {k: sorted(map(str, v)) for k, v in info.items()}
            out["config"] = _config_as_parsed(model)
            kernels: dict[str, int] = {}
            dense = []
            for name, m in model.named_modules():
                if type(m).__name__.endswith("QuantLinear") or hasattr(m, "qweight"):
                    kernels[type(m).__name__] = kernels.get(type(m).__name__, 0) + 1
                elif isinstance(m, torch.nn.Linear):
                    dense.append(name)
            out["kernels"], out["dense_linears"] = kernels, dense
            out["dtype"] = str(model.dtype).removeprefix("torch.")
            # one batch, left-padded: each decoding step runs every Linear once for all prompts
            prompts = req["prompts"]
            width = max(map(len, prompts))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=0)
            for b in range(len(prompts)):
                tokens = gen.sequences[b, width:].tolist()
                logprobs, tops = [], []
                for tok, logits in zip(tokens, gen.logits, strict=True):
                    lp = torch.log_softmax(logits[b].double(), -1)
                    logprobs.append(lp[tok].item())
                    v, i = lp.topk(top_k)
                    tops.append({str(t): p for t, p in zip(i.tolist(), v.tolist(), strict=True)})
                out["results"].append({"tokens": tokens, "logprobs": logprobs, "top": tops})
            out["ok"] = True
            del model
        except Exception:
            out["error"] = traceback.format_exc()
    out["warnings"] = log.lines
    out["seconds"] = time.perf_counter() - started
    gc.collect()
    return out


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    torch.manual_seed(0)
    for req in request["requests"]:
        result = run_one(req, request["max_new_tokens"], request.get("dtype", "auto"),
                         request.get("top", 5))
        print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
