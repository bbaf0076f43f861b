"""Lazy tensor sources (nvq.io.gguf_model.GGUFSource, nvq.verify.sources.CandidateSource): every
tensor equals the eager loaders' bit for bit, partial reads equal slices of the whole tensor, the
forward reads through them unchanged, and a read touches only the bytes of what it reads."""

from __future__ import annotations

import json
import math
import shutil
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

import nvq.io.gguf as gguf_io
import nvq.io.safetensors as safetensors_io
from nvq.io.gguf import GGUFFile
from nvq.io.gguf_model import GGUFSource, load_canonical
from nvq.models import layers as L
from nvq.models import llama
from nvq.quant.gptq_write import GPTQSettings
from nvq.quant.pipeline import convert
from nvq.verify.candidate import load_candidate
from nvq.verify.sources import CandidateSource
from tests.support.tiny_models import build_tiny_gemma3

TOKENS = torch.randint(4, 325, (12,), generator=torch.Generator().manual_seed(1234))
IDS = torch.tensor([7, 3, 3, 200, 8, 9, 10, 324, 0])  # unsorted, repeated, runs, both ends


@pytest.fixture(scope="module")
def gemma3_bf16(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("src-gemma3"))


@pytest.fixture(scope="session")
def gptq_small(tmp_path_factory):
    """Factory: gptq_small(hf_dir) -> nvq's GPTQ output (group 32, small calibration), made once."""
    made = {}

    def make(src):
        if str(src) not in made:
            out = tmp_path_factory.mktemp("src-gptq") / "out"
            convert(src, out, "gptq", device="cpu", gptq=GPTQSettings(group_size=32, samples=8, seq_len=128))
            made[str(src)] = out
        return made[str(src)]

    return make


@pytest.fixture
def bytes_read(monkeypatch):
    """Every positional read of tensor data (safetensors and GGUF), as its byte count."""
    log: list[int] = []
    for module in (safetensors_io, gguf_io):
        real = module.pread_exact

        def counted(path, offset, nbytes, what, real=real):
            log.append(nbytes)
            return real(path, offset, nbytes, what)

        monkeypatch.setattr(module, "pread_exact", counted)
    return log


def assert_partial_reads_are_slices(source, name: str, full: torch.Tensor) -> None:
    if full.dim() == 1:
        n = full.shape[0]
        a, b = min(1, n), max(min(1, n), n - 1)
        assert torch.equal(source.row_block(name, a, b), full[a:b]), name
        return
    flat = full.reshape(-1, full.shape[-1])
    n = flat.shape[0]
    for a, b in ((0, n), (min(n, 3), min(n, 21)), (max(0, n - 5), n), (min(n, 2), min(n, 2))):  # 3..21 cuts heads of 16
        assert torch.equal(source.row_block(name, a, b), flat[a:b]), (name, a, b)
    if full.dim() == 2:
        ids = IDS[IDS < n]
        assert torch.equal(source.rows(name, ids), full[ids]), name
    else:
        for e in range(full.shape[0]):
            assert torch.equal(source.expert(name, e), full[e]), (name, e)


# ---------------------------------------------------------------------------------------------
# GGUF


GGUF_CASES = {
    "llama-f32": ("tiny_llama", "f32", False),  # Q/K un-permuted
    "llama-q8_0": ("tiny_llama", "q8_0", False),  # quantized rows are whole blocks
    "llama-fused-qkv": ("tiny_llama", "f32", True),  # q/k/v are row ranges of attn_qkv
    "gemma3-f32": ("gemma3_bf16", "f32", False),  # norms lose their +1
    "gemma4-moe-f32": ("tiny_gemma4_moe", "f32", False),  # expert stacks
    "gemma4-ple-f32": ("tiny_gemma4_ple", "f32", False),  # per-layer embedding rows
}


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_source_equals_load_canonical_and_slices(case, request, tiny_gguf):
    fixture, outtype, fused = GGUF_CASES[case]
    path = tiny_gguf(request.getfixturevalue(fixture), outtype, fuse_qkv=fused)
    arch, config, eager = load_canonical(path)
    source = GGUFSource.open(path)
    assert (source.arch_name, source.config) == (arch, config)
    assert list(source) == list(eager) and len(source) == len(eager)
    gf = GGUFFile.open(path)
    for name, want in eager.items():
        got = source[name]
        assert got.dtype == torch.float32 and torch.equal(got, want), name
        assert source.shape(name) == tuple(want.shape)
        assert_partial_reads_are_slices(source, name, want)
        assert source.storage(name) == gf.info(source.unit(name).source).type_name
    if outtype == "q8_0":
        assert source.storage("blk.0.attn_q.weight") == "Q8_0"
        assert source.storage("blk.0.attn_norm.weight") == "F32"
    assert "no-such.weight" not in source and "token_embd.weight" in source


@pytest.mark.llamacpp
def test_gguf_rows_read_only_the_rows_asked_for(tiny_llama, tiny_gguf, bytes_read):
    path = tiny_gguf(tiny_llama, "q8_0")
    source = GGUFSource.open(path)
    info = source.model.gguf.info("token_embd.weight")
    assert bytes_read == []  # opening reads headers only
    rows = source.rows("token_embd.weight", IDS)
    distinct_rows = len(set(IDS.tolist()))
    assert sum(bytes_read) == distinct_rows * info.row_bytes < info.nbytes // 10
    assert torch.equal(rows, load_canonical(path)[2]["token_embd.weight"][IDS])
    hidden = GGUFSource.open(path, exclude={"blk.1.attn_k.weight"})
    assert "blk.1.attn_k.weight" not in hidden and len(hidden) == len(source) - 1
    with pytest.raises(KeyError, match="blk.1.attn_k.weight"):
        hidden["blk.1.attn_k.weight"]


@pytest.mark.llamacpp
def test_forward_over_gguf_source_equals_forward_over_load_canonical(tiny_llama, tiny_gguf):
    from nvq.io.hf import HFConfig
    from nvq.models import for_config

    path = tiny_gguf(tiny_llama, "f32")
    _, config, eager = load_canonical(path)
    cfg = for_config(HFConfig(path, config)).config
    lazy_taps, eager_taps = L.Taps(), L.Taps()
    lazy = llama.forward(cfg, GGUFSource.open(path), TOKENS, taps=lazy_taps)
    assert torch.equal(lazy, llama.forward(cfg, eager, TOKENS, taps=eager_taps))
    assert all(torch.equal(lazy_taps[n], eager_taps[n]) for n in eager_taps.names())


# ---------------------------------------------------------------------------------------------
# Candidate directories


def _candidate(request, fixture: str, scheme: str):
    src = request.getfixturevalue(fixture)
    if scheme == "dense":
        return src
    if scheme == "gptq":
        return request.getfixturevalue("gptq_small")(src)
    return request.getfixturevalue("quantized")(src, scheme)


CANDIDATE_CASES = [
    pytest.param(fixture, scheme, id=f"{fixture}-{scheme}", marks=[pytest.mark.slow] if scheme == "gptq" else [])
    for fixture in ("tiny_llama", "tiny_gemma4_moe", "tiny_gemma4_ple")
    for scheme in ("nvfp4", "mxfp4", "gptq")  # gptq: a calibrated conversion, ~15 s each
] + [pytest.param("tiny_gemma4_moe", "dense", id="tiny_gemma4_moe-dense")]  # a dense stack stored fused


@pytest.mark.parametrize(("fixture", "scheme"), CANDIDATE_CASES)
def test_candidate_source_equals_load_candidate_and_slices(fixture, scheme, request):
    path = _candidate(request, fixture, scheme)
    eager = load_candidate(path)
    source = CandidateSource.open(path)
    assert source.format == eager.format and source.arch.name == eager.arch.name
    assert list(source) == list(eager.tensors) and source.schemes == eager.schemes
    for name, want in eager.tensors.items():
        got = source[name]
        assert got.dtype == torch.float32 and torch.equal(got, want), name
        assert source.storage(name) == eager.schemes[name]
        assert_partial_reads_are_slices(source, name, want)
    if scheme != "dense":
        assert any(s.quantized for s in source.schemes.values())


@pytest.mark.parametrize("tokens", [TOKENS, TOKENS[:1]], ids=["12-tokens", "1-token"])
def test_forward_over_candidate_source_reads_only_the_routed_experts(tiny_gemma4_moe, quantized, tokens):
    path = quantized(tiny_gemma4_moe, "nvfp4")
    eager = load_candidate(path)

    class Counting(CandidateSource):
        def expert(self, name, e):
            asked.setdefault(name, set()).add(e)
            return super().expert(name, e)

    asked: dict[str, set[int]] = {}
    source = Counting.open(path)
    cfg, module = eager.arch.config, eager.arch.module
    lazy_taps, eager_taps = L.Taps(), L.Taps()
    logits = module.forward(cfg, source, tokens, taps=lazy_taps)
    assert torch.equal(logits, module.forward(cfg, eager.tensors, tokens, taps=eager_taps))
    assert all(torch.equal(lazy_taps[n], eager_taps[n]) for n in eager_taps.names())
    for i in range(cfg.num_layers):
        routed = set(eager_taps[f"ffn_moe_topk-{i}"].flatten().tolist())
        assert tokens.numel() > 1 or len(routed) == cfg.top_k_experts < cfg.num_experts
        for stack in ("ffn_gate_up_exps", "ffn_down_exps"):
            assert asked[f"blk.{i}.{stack}.weight"] == routed


def test_candidate_expert_reads_only_that_experts_modules(tiny_gemma4_moe, quantized, bytes_read):
    path = quantized(tiny_gemma4_moe, "nvfp4")
    source = CandidateSource.open(path)
    infos = source.layout.ckpt.tensors
    experts = "model.language_model.layers.1.experts.2"
    source.expert("blk.1.ffn_gate_up_exps.weight", 2)
    want = sum(i.nbytes for n, i in infos.items() if n.startswith((f"{experts}.gate_proj.", f"{experts}.up_proj.")))
    assert sum(bytes_read) == want
    assert want < sum(i.nbytes for n, i in infos.items() if ".layers.1.experts." in n) // 3


@pytest.fixture(scope="module")
def big_embedding(tiny_llama, tmp_path_factory):
    """The tiny Llama with a 65536-row bf16 embedding (8 MiB): one tensor dwarfs the others."""
    out = tmp_path_factory.mktemp("big-embedding")
    shutil.copytree(tiny_llama, out, dirs_exist_ok=True)
    tensors = load_file(out / "model.safetensors")
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    tensors["model.embed_tokens.weight"] = torch.randn(65536, hidden, generator=torch.Generator().manual_seed(3)).bfloat16()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = 65536
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_reading_one_tensor_does_not_read_the_others(big_embedding, bytes_read):
    file_bytes = (big_embedding / "model.safetensors").stat().st_size
    source = CandidateSource.open(big_embedding)
    infos = source.layout.ckpt.tensors
    assert bytes_read == []  # opening reads headers only
    tracemalloc.start()
    try:
        q = source["blk.0.attn_q.weight"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(bytes_read) == infos["model.layers.0.self_attn.q_proj.weight"].nbytes == 2 * q.numel()
    assert peak < file_bytes // 20  # nothing near the 8 MiB embedding was allocated

    bytes_read.clear()
    ids = torch.tensor([65535, 5, 6, 7, 5, 40000])
    rows = source.rows("token_embd.weight", ids)
    embd = infos["model.embed_tokens.weight"]
    row_bytes = embd.nbytes // embd.shape[0]
    assert sum(bytes_read) == 5 * row_bytes  # five distinct rows
    assert torch.equal(rows, source["token_embd.weight"][ids])

    bytes_read.clear()
    block = source.row_block("token_embd.weight", 1000, 3048)
    assert sum(bytes_read) == 2048 * row_bytes and block.shape == (2048, embd.shape[1])
    assert math.prod(embd.shape) * 2 > 30 * sum(bytes_read)


def test_weights_rows_and_lm_head_rows_use_the_lazy_reads(big_embedding, bytes_read):
    source = CandidateSource.open(big_embedding)
    w = L.Weights(source, torch.float64, "cpu")
    got = w.rows("token_embd.weight", torch.tensor([9, 1]))
    assert got.dtype == torch.float64 and sum(bytes_read) == 2 * 64 * 2
    bytes_read.clear()
    assert w.lm_head_name == "token_embd.weight"  # tied
    head = w.lm_head_rows(100, 164)
    assert sum(bytes_read) == 64 * 64 * 2
    assert torch.equal(head, source["token_embd.weight"][100:164].double())
