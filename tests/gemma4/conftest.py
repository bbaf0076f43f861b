"""Session-wide Gemma-4 miniatures and everything made from them, each made once and on demand:
originals (every variant × form × dialect), nvq's NVFP4/MXFP4/GPTQ outputs made with `nvq convert`,
llama.cpp's f32 GGUF of every original (the oracles) and of every NVFP4 output, and `nvq verify`
certificates. The llama.cpp conversions run as one batch each (see
tests/support/llamacpp.convert_many_to_gguf)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nvq.cli import app
from tests.support.checkpoints import as_llamacpp_convertible, as_modelopt_names
from tests.support.gemma4_variants import (
    GEMMA4_DIALECTS,
    GEMMA4_FORMS,
    GEMMA4_VARIANTS,
    VARIANTS,
    build_gemma4_variant,
)
from tests.support.llamacpp import convert_many_to_gguf

SCHEMES = ("nvfp4", "mxfp4")  # compressed-tensors schemes
ALL_SCHEMES = (*SCHEMES, "gptq")
# GPTQ calibration small enough for a 2-core CI machine; group 32 tiles every miniature weight
GPTQ_ARGS = ("--group-size", "32", "--calib-samples", "8", "--calib-seq-len", "128")
KV_SHARING_VARIANTS = ("e2b", "e4b")
runner = CliRunner()


@dataclass(frozen=True)
class Case:
    variant: str
    form: str
    dialect: str

    @property
    def id(self) -> str:
        return f"{self.variant}-{self.form}-{self.dialect}"

    @property
    def has_moe(self) -> bool:
        return bool(VARIANTS[self.variant].text.get("enable_moe_block"))


CASES = [Case(v, f, d) for v in GEMMA4_VARIANTS for f in GEMMA4_FORMS for d in GEMMA4_DIALECTS]
CASE_IDS = [c.id for c in CASES]
# The vestigial-KV copies start from this form and dialect of the KV-sharing variants.
VESTIGIAL_BASE = ("conditional", "global")
VESTIGIAL_SUFFIX = "-vestigial-kv"


def vestigial_key(variant: str) -> str:
    return variant + VESTIGIAL_SUFFIX


def _key(case: Case | str) -> str:
    return case if isinstance(case, str) else case.id


def nvq(*args) -> object:
    """`nvq ARGS` in this process; the result has exit_code and output."""
    return runner.invoke(app, [str(a) for a in args])


def add_vestigial_kv(src: Path, dst: Path) -> Path:
    """A copy of a KV-sharing miniature whose shared layers also hold k_proj, v_proj and k_norm, as
    Google's E2B/E4B files are reported to (gemma4.md §3.1, Appendix B.1)."""
    shutil.copytree(src, dst)
    text = json.loads((dst / "config.json").read_text())
    text = text.get("text_config") or text
    tensors = load_file(dst / "model.safetensors")
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in tensors) else "model."
    gen = torch.Generator().manual_seed(7)
    hidden, first_shared = text["hidden_size"], text["num_hidden_layers"] - text["num_kv_shared_layers"]
    for i in range(first_shared, text["num_hidden_layers"]):
        full = text["layer_types"][i] == "full_attention"
        hd = text["global_head_dim"] if full else text["head_dim"]
        rows = hd * text["num_key_value_heads"]
        p = f"{prefix}layers.{i}.self_attn"
        assert f"{p}.k_proj.weight" not in tensors
        tensors[f"{p}.k_proj.weight"] = (0.05 * torch.randn(rows, hidden, generator=gen)).bfloat16()
        tensors[f"{p}.v_proj.weight"] = (0.05 * torch.randn(rows, hidden, generator=gen)).bfloat16()
        tensors[f"{p}.k_norm.weight"] = (0.5 + torch.rand(hd, generator=gen)).bfloat16()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


class Minis:
    """Everything made from the miniatures, cached for the session."""

    def __init__(self, root: Path):
        self.root = root
        self._originals: dict[str, Path] = {}
        self._converted: dict[tuple[str, str], Path] = {}
        self._oracles: dict[str, Path | Exception] | None = None
        self._nvfp4_ggufs: dict[str, Path | Exception] | None = None
        self._certificates: dict[tuple[str, str], tuple[int, dict]] = {}

    # -- originals -------------------------------------------------------------------------
    def original(self, case: Case) -> Path:
        if case.id not in self._originals:
            out = self.root / "originals" / case.id
            self._originals[case.id] = build_gemma4_variant(out, case.variant, case.form, case.dialect)
        return self._originals[case.id]

    def vestigial(self, variant: str) -> Path:
        key = vestigial_key(variant)
        if key not in self._originals:
            src = self.original(Case(variant, *VESTIGIAL_BASE))
            self._originals[key] = add_vestigial_kv(src, self.root / "originals" / key)
        return self._originals[key]

    def source(self, case: Case | str) -> Path:
        """The original of a case, or the vestigial-KV copy for vestigial_key(variant)."""
        if isinstance(case, Case):
            return self.original(case)
        return self.vestigial(case.removesuffix(VESTIGIAL_SUFFIX))

    # -- nvq convert -----------------------------------------------------------------------
    def converted(self, case: Case | str, scheme: str) -> Path:
        key = _key(case)
        if (key, scheme) not in self._converted:
            out = self.root / "converted" / f"{key}-{scheme}"
            extra = GPTQ_ARGS if scheme == "gptq" else ()
            result = nvq("convert", self.source(case), out, "--scheme", scheme, "--device", "cpu", *extra)
            assert result.exit_code == 0, result.output
            self._converted[(key, scheme)] = out
        return self._converted[(key, scheme)]

    # -- llama.cpp's converter -------------------------------------------------------------
    def oracle(self, case: Case | str) -> Path:
        """llama.cpp's f32 GGUF of the case's source (see `source`)."""
        if self._oracles is None:
            sources = {c.id: self.original(c) for c in CASES}
            sources.update({vestigial_key(v): self.vestigial(v) for v in KV_SHARING_VARIANTS})
            self._oracles = self._gguf_batch("oracles", sources)
        return _unwrap(self._oracles[_key(case)])

    def nvfp4_gguf(self, case: Case) -> Path:
        """llama.cpp's f32 GGUF of nvq's NVFP4 output."""
        if self._nvfp4_ggufs is None:
            sources = {}
            for c in CASES:
                src = self.converted(c, "nvfp4")
                if c.has_moe:
                    # the converter's Gemma4Model.filter_tensors mangles compressed-tensors expert
                    # names; ModelOpt names of the same bytes convert (test_llamacpp_converter.py)
                    src = as_modelopt_names(src, self.root / "modelopt" / c.id)
                sources[c.id] = src
            self._nvfp4_ggufs = self._gguf_batch("nvfp4-ggufs", sources)
        return _unwrap(self._nvfp4_ggufs[case.id])

    def _gguf_batch(self, name: str, sources: dict[str, Path]) -> dict[str, Path | Exception]:
        staging, out = self.root / f"{name}-input", self.root / name
        jobs = [(as_llamacpp_convertible(src, staging / key), out / f"{key}.gguf") for key, src in sources.items()]
        return dict(zip(sources, convert_many_to_gguf(jobs, "f32"), strict=True))

    # -- nvq verify ------------------------------------------------------------------------
    def certificate(self, case: Case | str, scheme: str) -> tuple[int, dict]:
        """(exit code, certificate) of `nvq verify CONVERTED --oracle ORIGINAL.gguf`."""
        key = _key(case)
        if (key, scheme) not in self._certificates:
            cert_path = self.root / "certificates" / f"{key}-{scheme}.json"
            cert_path.parent.mkdir(parents=True, exist_ok=True)
            result = nvq("verify", self.converted(case, scheme), "--oracle", self.oracle(case),
                         "--json", cert_path, "--device", "cpu")  # fmt: skip
            assert result.exit_code in (0, 1), result.output
            self._certificates[(key, scheme)] = (result.exit_code, json.loads(cert_path.read_text()))
        return self._certificates[(key, scheme)]


def _unwrap(result: Path | Exception) -> Path:
    if isinstance(result, Exception):
        raise result
    return result


@pytest.fixture(scope="session")
def minis(tmp_path_factory) -> Minis:
    return Minis(tmp_path_factory.mktemp("gemma4-minis"))
