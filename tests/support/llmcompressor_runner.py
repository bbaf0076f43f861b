"""Quantize a checkpoint with llm-compressor's `NVFP4` preset (W4A4: NVFP4 weights, NVFP4
activations with a calibrated `input_global_scale`) and save it compressed. Runs INSIDE the
llm-compressor venv (scripts/llmcompressor-env.sh) as
`python llmcompressor_runner.py MODEL_DIR CALIB.json OUT_DIR`, started by
tests/support/llmcompressor_client.py; it imports only what that venv holds.

CALIB.json: {"sequences": [[token ids], ...]}: the very token windows nvq calibrates on, fed as
an in-memory dataset (nothing is downloaded). The model is loaded in its checkpoint dtype and
quantized the way llm-compressor's NVFP4 examples do: `oneshot(model, dataset,
QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]))`, then
`save_pretrained(save_compressed=True)`. On success the last stdout line is "NVQ-LLMC-DONE".
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

DONE = "NVQ-LLMC-DONE"


def main(model_dir: str, calib_path: str, out_dir: str) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    sequences = json.loads(open(calib_path, encoding="utf-8").read())["sequences"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map="cpu")
    data = Dataset.from_list([{"input_ids": s, "attention_mask": [1] * len(s)} for s in sequences])
    recipe = QuantizationModifier(
        targets="Linear", scheme="NVFP4", ignore=["lm_head", "re:.*mlp.gate$"]
    )
    with torch.no_grad():
        oneshot(
            model=model,
            dataset=data,
            recipe=recipe,
            num_calibration_samples=len(sequences),
            max_seq_length=max(len(s) for s in sequences),
            shuffle_calibration_samples=False,
        )
    model.save_pretrained(out_dir, save_compressed=True)
    print(DONE, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
