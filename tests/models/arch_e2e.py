"""What every per-architecture test module (test_qwen3.py, test_qwen3_moe.py, test_mistral.py) runs
on its tiny random model, each artefact made once per module: fp32 and bf16 originals, nvq's
outputs (nvfp4, mxfp4, gptq by round-to-nearest and calibrated), llama.cpp's f32 GGUF of the fp32
original, and `nvq verify` certificates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from typer.testing import CliRunner

from nvq.cli import app
from tests.support.llamacpp import convert_many_to_gguf

GPTQ_ARGS = ("--scheme", "gptq", "--group-size", "32")
SCHEMES = {
    "nvfp4": ("--scheme", "nvfp4"),
    "mxfp4": ("--scheme", "mxfp4"),
    "rtn": (*GPTQ_ARGS, "--method", "rtn"),
    "gptq": (*GPTQ_ARGS, "--calib-samples", "4", "--calib-seq-len", "64"),
}
runner = CliRunner()


def nvq(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


class ArchSuite:
    def __init__(self, root: Path, build: Callable[..., Path], sentencepiece_vocab: bool = False):
        self.root, self.build, self.sentencepiece_vocab = root, build, sentencepiece_vocab
        self._made: dict[str, Path] = {}
        self._certs: dict[str, dict] = {}

    def _once(self, key: str, make: Callable[[Path], Path]) -> Path:
        if key not in self._made:
            self._made[key] = make(self.root / key)
        return self._made[key]

    def original(self, dtype: torch.dtype = torch.float32) -> Path:
        name = str(dtype).removeprefix("torch.")
        return self._once(f"original-{name}", lambda out: self.build(out, dtype=dtype))

    def converted(self, scheme: str, dtype: torch.dtype = torch.float32) -> Path:
        src = self.original(dtype)

        def make(out: Path) -> Path:
            result = nvq("convert", src, out, *SCHEMES[scheme], "--device", "cpu")
            assert result.exit_code == 0, result.output
            return out

        return self._once(f"{scheme}-{str(dtype).removeprefix('torch.')}", make)

    def oracle(self) -> Path:
        """llama.cpp's converter's f32 GGUF of the fp32 original."""
        def make(out: Path) -> Path:
            [got] = convert_many_to_gguf([(self.original(), out.with_suffix(".gguf"))], "f32",
                                         sentencepiece_vocab=self.sentencepiece_vocab)
            if isinstance(got, Exception):
                raise got
            return got

        return self._once("oracle", make)

    def certificate(self, candidate: Path, key: str | None = None) -> tuple[int, dict]:
        """(exit code, certificate) of `nvq verify CANDIDATE --oracle ORACLE.gguf`."""
        key = key or candidate.name
        if key not in self._certs:
            path = self.root / "certs" / f"{key}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            result = nvq("verify", candidate, "--oracle", self.oracle(), "--json", path, "--device", "cpu")
            assert result.exit_code in (0, 1), result.output
            self._certs[key] = (result.exit_code, json.loads(path.read_text()))
        return self._certs[key]


def worst_tap(cert: dict) -> float:
    return max(t["rel_l2"] for t in cert["taps"])


def transformers_logits(path: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """transformers' logits of a checkpoint (its own dtype), with no missing or unexpected keys."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def nvq_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """nvq's reference forward on the checkpoint as verify decodes it."""
    from nvq.verify.candidate import load_candidate

    c = load_candidate(path)
    return c.arch.module.forward(c.arch.config, c.tensors, ids)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def from_gguf(suite: ArchSuite) -> Path:
    """`nvq convert ORACLE.gguf OUT --scheme bf16`: the GGUF back as a dense HF checkpoint."""
    def make(out: Path) -> Path:
        result = nvq("convert", suite.oracle(), out, "--scheme", "bf16")
        assert result.exit_code == 0, result.output
        return out

    return suite._once("from-gguf", make)


def llamacpp_reads_output(suite: ArchSuite, scheme: str) -> float:
    """llama.cpp's converter turns nvq's output (bf16 original) into a GGUF. NVFP4 stays NVFP4 there:
    tests.support.gguf_checks compares every weight with nvq's dequantization (raises on a
    difference; returns 0). Other schemes are dequantized by the converter: the largest rel-L2
    between the GGUF's weights (conventions undone) and nvq's own decoding of the output."""
    from nvq.io.gguf_model import load_canonical
    from nvq.verify.candidate import load_candidate
    from tests.support.gguf_checks import check_gguf_against_nvq

    out = suite.converted(scheme, torch.bfloat16)
    [gguf] = convert_many_to_gguf([(out, suite.root / f"{out.name}.gguf")], "f32",
                                  sentencepiece_vocab=suite.sentencepiece_vocab)
    if isinstance(gguf, Exception):
        raise gguf
    if scheme == "nvfp4":
        assert check_gguf_against_nvq(suite.original(torch.bfloat16), out, gguf) > 0
        return 0.0
    _, _, theirs = load_canonical(gguf)
    ours = load_candidate(out).tensors
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    return max(rel_l2(theirs[n], ours[n]) for n in ours)
