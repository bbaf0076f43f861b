"""A corpus of bugs, as data: each row writes a faulted copy of a candidate checkpoint (weights,
config or tokenizer) and says where `nvq verify` must localize it.

None of these kinds is in tests/verify/faults.py. Candidates are nvq's own outputs (compressed-
tensors NVFP4) or dense checkpoints; weight edits work on both:

* row swaps, zeroed rows, sign flips and whole-module swaps move the stored bytes (packed codes,
  block scales), so they are exact in NVFP4 too;
* other edits decode the module, change the dense weight, and re-encode it: dense in its dtype,
  NVFP4 with nvq's compressed-tensors codec under the module's stored global scale (under the
  edited tensor's own global scale when a block would otherwise saturate).

`apply(candidate, dst, original)` copies CANDIDATE to DST with the fault; ORIGINAL is the dense
checkpoint the candidate was made from (only the noise fault reads it). Architectures: "llama"
(build_tiny_llama), "gemma4_dense" (dense_keqv), "gemma4_moe" (moe).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nvq.formats import e2m1, nvfp4
from nvq.formats.constants import E2M1_MAX, FP8_E4M3_MAX

__all__ = ["ARCHS", "FAULTS", "Expect", "Fault", "Outcome", "faults_for", "judge"]

ARCHS = ("llama", "gemma4_dense", "gemma4_moe")
GEMMA4 = ("gemma4_dense", "gemma4_moe")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Expect:
    """Where the fault must be named. Any one of `tensors` (canonical GGUF names) or of `fields`
    (config field aliases) localizes it; `expert`, `rows` and `token` must be named as well."""

    layer: int | None = None
    tensors: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    expert: int | None = None
    rows: tuple[int, int] | None = None  # first and last output row hit (inclusive)
    token: int | None = None


@dataclass(frozen=True)
class Fault:
    name: str
    apply: Callable[[Path, Path, Path], Path]
    archs: tuple[str, ...]
    expect: Expect
    why: str  # the converter bug it stands for
    nvfp4_only: bool = False  # edits NVFP4 storage (block scales, re-quantization), not dense weights


# --------------------------------------------------------------------------------------------
# Copy-and-edit plumbing
# --------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(src: Path, dst: Path, fn: Callable[[Tensors, Callable[[str], str]], None]) -> Path:
    """Copy SRC and run fn(tensors, hf) on each safetensors file's tensors; hf(stem) turns a
    decoder-relative name ("layers.1.mlp.up_proj") into the file's full name."""
    _copy(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in tensors) else "model."
        fn(tensors, lambda stem, prefix=prefix: prefix + stem)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f, metadata={"format": "pt"})
    return dst


def _edit_json(src: Path, dst: Path, file: str, fn: Callable[[dict], None]) -> Path:
    _copy(src, dst)
    path = dst / file
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return dst


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def _edit_config(src: Path, dst: Path, fn: Callable[[dict], None]) -> Path:
    return _edit_json(src, dst, "config.json", lambda cfg: fn(_text_config(cfg)))


# --------------------------------------------------------------------------------------------
# Module access: dense `<m>.weight`, or compressed-tensors NVFP4 `<m>.weight_packed` + scales
# --------------------------------------------------------------------------------------------

_ROW_TENSORS = ("weight", "weight_packed", "weight_scale")  # suffixes whose rows are output rows


def _row_parts(t: Tensors, module: str) -> list[str]:
    names = [f"{module}.{s}" for s in _ROW_TENSORS if f"{module}.{s}" in t]
    if not names:
        raise KeyError(f"no tensors of module {module}")
    return names


def _raw(x: torch.Tensor) -> torch.Tensor:
    """FP8 block scales as their bytes (indexed assignment is not defined on float8)."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def _is_nvfp4(t: Tensors, module: str) -> bool:
    return f"{module}.weight_packed" in t and f"{module}.weight_global_scale" in t


def decode(t: Tensors, module: str) -> torch.Tensor:
    if _is_nvfp4(t, module):
        q = nvfp4.NVFP4Quantized(e2m1.unpack_pairs(t[f"{module}.weight_packed"]), t[f"{module}.weight_scale"],
                                 t[f"{module}.weight_global_scale"].float().reshape(1))
        return nvfp4.dequantize(q)
    return t[f"{module}.weight"].float()


def encode(t: Tensors, module: str, w: torch.Tensor) -> None:
    """Store dense `w` back into `module` in the module's own format (module docstring)."""
    if not _is_nvfp4(t, module):
        old = t[f"{module}.weight"]
        t[f"{module}.weight"] = w.to(old.dtype)
        return
    g = t[f"{module}.weight_global_scale"].float().reshape(1)
    if float(w.abs().amax()) * float(g) / E2M1_MAX > FP8_E4M3_MAX:
        g = nvfp4.global_scale(nvfp4.tensor_amax(w), torch.float32)
    q = nvfp4.quantize(w.float(), g)
    t[f"{module}.weight_packed"] = e2m1.pack_pairs(q.codes)
    t[f"{module}.weight_scale"] = q.block_scale
    t[f"{module}.weight_global_scale"] = q.global_scale.reshape(t[f"{module}.weight_global_scale"].shape)


def edit_weight(module: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    def edit(t: Tensors, hf):
        encode(t, hf(module), fn(decode(t, hf(module)).clone()))
    return edit


def swap_rows(module_a: str, rows_a: slice, module_b: str, rows_b: slice):
    """Exchange output rows between two modules (or within one) in every row-indexed tensor."""
    def edit(t: Tensors, hf):
        for part_a, part_b in zip(_row_parts(t, hf(module_a)), _row_parts(t, hf(module_b)), strict=True):
            x, y = _raw(t[part_a]), _raw(t[part_b])
            a, b = x[rows_a].clone(), y[rows_b].clone()
            x[rows_a], y[rows_b] = b, a
    return edit


def zero_rows(module: str, rows: slice):
    def edit(t: Tensors, hf):
        name = hf(module)
        part = f"{name}.weight_packed" if _is_nvfp4(t, name) else f"{name}.weight"
        t[part][rows] = 0  # code 0 is +0 in E2M1
    return edit


def flip_sign(module: str, row: int):
    def edit(t: Tensors, hf):
        name = hf(module)
        if _is_nvfp4(t, name):
            t[f"{name}.weight_packed"][row] ^= 0x88  # the sign bit of both nibbles
        else:
            t[f"{name}.weight"][row] = -t[f"{name}.weight"][row]
    return edit


def swap_modules(module_a: str, module_b: str):
    def edit(t: Tensors, hf):
        a, b = hf(module_a), hf(module_b)
        suffixes = [n[len(a):] for n in t if n.startswith(a + ".")]
        for s in suffixes:
            t[a + s], t[b + s] = t[b + s], t[a + s]
    return edit


def scale_tensor(module: str, factor: float):
    """The whole weight × factor: NVFP4 by dividing the global scale (a converter that wrote the
    wrong amax), dense by multiplying."""
    def edit(t: Tensors, hf):
        name = hf(module)
        if _is_nvfp4(t, name):
            t[f"{name}.weight_global_scale"] = t[f"{name}.weight_global_scale"] / factor
        else:
            t[f"{name}.weight"] = (t[f"{name}.weight"].float() * factor).to(t[f"{name}.weight"].dtype)
    return edit


def edit_vector(name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    def edit(t: Tensors, hf):
        t[hf(name)] = fn(t[hf(name)].clone())
    return edit


def swap_experts(layer: int, a: int, b: int):
    """Experts a and b of `layer` exchanged (gate, up and down): the router now sends tokens to the
    wrong weights. Per-expert modules (nvq's output) or fused stacks (a dense checkpoint)."""
    def edit(t: Tensors, hf):
        fused = hf(f"layers.{layer}.experts.down_proj")
        if fused in t:
            for stack in (fused, hf(f"layers.{layer}.experts.gate_up_proj")):
                t[stack][[a, b]] = t[stack][[b, a]].clone()
            return
        for proj in ("gate_proj", "up_proj", "down_proj"):
            swap_modules(f"layers.{layer}.experts.{a}.{proj}", f"layers.{layer}.experts.{b}.{proj}")(t, hf)
    return edit


def corrupt_block_scale(module: str, row: int):
    """The smallest FP8 block-scale byte of `row` overwritten with 0x7E (448, the largest E4M3
    value): that block scaled by tens to hundreds. (A block whose scale is already near 448, as the
    largest blocks of a tensor are, would change by less than legitimate quantizers differ.)"""
    def edit(t: Tensors, hf):
        scale = t[f"{hf(module)}.weight_scale"].view(torch.uint8)
        block = int(scale[row].argmin())
        scale[row, block] = 0x7E
    return edit


def _weights(fn) -> Callable[[Path, Path, Path], Path]:
    return lambda cand, dst, original: _edit_tensors(cand, dst, fn)


# --------------------------------------------------------------------------------------------
# Faults that need more than one edit
# --------------------------------------------------------------------------------------------

NOISE_RATIO = 1.5  # the noise fault: this many times the candidate's own quantization error


def extra_noise(module: str, ratio: float = NOISE_RATIO, seed: int = 0):
    """One NVFP4 weight re-quantized from the original plus gaussian noise sized so that its error
    against the original is `ratio`× the error of nvq's quantization (a sloppier quantizer)."""
    def apply(cand: Path, dst: Path, original: Path) -> Path:
        src = {k: v for f in sorted(original.glob("*.safetensors")) for k, v in load_file(f).items()}
        def edit(t: Tensors, hf):
            name = hf(module)
            if not _is_nvfp4(t, name):
                raise ValueError(f"the noise fault needs an NVFP4 module; {name} is dense")
            w = src[f"{name}.weight"].float()
            base = float((decode(t, name) - w).norm())
            noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
            noise *= base / float(noise.norm())
            g = t[f"{name}.weight_global_scale"].float().reshape(1)
            best = None
            for c in torch.linspace(0.5, 2.0, 31).tolist():  # the size whose requantized error is closest
                q = nvfp4.quantize(w + c * noise, g)
                err = float((nvfp4.dequantize(q) - w).norm()) / base
                if best is None or abs(err - ratio) < abs(best[0] - ratio):
                    best = (err, q)
            t[f"{name}.weight_packed"] = e2m1.pack_pairs(best[1].codes)
            t[f"{name}.weight_scale"] = best[1].block_scale
        return _edit_tensors(cand, dst, edit)
    return apply


def _swap_q_k_heads(layer: int):
    """The first KV-width rows of q_proj exchanged with k_proj (a loader that mixed up the two
    projections; the models' q and k differ in width, so only the overlapping heads move)."""
    def edit(t: Tensors, hf):
        n_k = t[_row_parts(t, hf(f"layers.{layer}.self_attn.k_proj"))[0]].shape[0]
        swap_rows(f"layers.{layer}.self_attn.q_proj", slice(0, n_k), f"layers.{layer}.self_attn.k_proj",
                  slice(0, n_k))(t, hf)
    return edit


def _bos_changed(cand: Path, dst: Path, original: Path) -> Path:
    """BOS id 1 -> 3 (<pad>) in config, generation config and tokenizer: a tokenizer re-exported
    with the wrong special token."""
    _edit_config(cand, dst, lambda c: c.update(bos_token_id=3))
    gen = dst / "generation_config.json"
    if gen.is_file():
        data = json.loads(gen.read_text())
        data["bos_token_id"] = 3
        gen.write_text(json.dumps(data, indent=2) + "\n")
    tc = dst / "tokenizer_config.json"
    data = json.loads(tc.read_text())
    data["bos_token"] = "<pad>"
    tc.write_text(json.dumps(data, indent=2) + "\n")
    tok = dst / "tokenizer.json"
    data = json.loads(tok.read_text())
    post = data["post_processor"]
    for seq in (post["single"], post["pair"]):
        for item in seq:
            if "SpecialToken" in item:
                item["SpecialToken"]["id"] = "<pad>"
    post["special_tokens"] = {"<pad>": {"id": "<pad>", "ids": [3], "tokens": ["<pad>"]}}
    tok.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return dst


SWAPPED_TOKENS = (100, 101)


def _swap_vocab_entries(data: dict) -> None:
    vocab = data["model"]["vocab"]
    by_id = {i: s for s, i in vocab.items()}
    a, b = SWAPPED_TOKENS
    vocab[by_id[a]], vocab[by_id[b]] = b, a


def _rope_theta(cfg: dict) -> None:
    rope = cfg["rope_parameters"]
    for params in (rope.values() if "sliding_attention" in rope else [rope]):
        params["rope_theta"] = params["rope_theta"] * 50


def _activation(cfg: dict) -> None:
    key = "hidden_activation" if "hidden_activation" in cfg else "hidden_act"
    cfg[key] = "silu" if cfg[key] != "silu" else "gelu_pytorch_tanh"


def _config(fn) -> Callable[[Path, Path, Path], Path]:
    return lambda cand, dst, original: _edit_config(cand, dst, fn)


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

_ROPE = ("rope_theta", "rope.freq_base", "freq_base")
_EPS = ("rms_norm_eps", "layer_norm_rms_epsilon")
_ACT = ("hidden_act", "hidden_activation", "activation")

FAULTS: list[Fault] = [
    # --- local damage in one weight
    Fault("output_row_zeroed", _weights(zero_rows("layers.0.mlp.up_proj", slice(37, 38))), ARCHS,
          Expect(0, ("blk.0.ffn_up.weight",), rows=(37, 37)), "a row-chunked writer that dropped one chunk"),
    Fault("two_output_rows_swapped", _weights(swap_rows("layers.1.mlp.gate_proj", slice(3, 4), "layers.1.mlp.gate_proj",
                                                        slice(90, 91))), ARCHS,
          Expect(1, ("blk.1.ffn_gate.weight",), rows=(3, 90)), "an off-by-one in a row permutation"),
    Fault("row_block_scaled_x4", _weights(edit_weight("layers.1.self_attn.o_proj",
                                                      lambda w: torch.cat([w[:16], w[16:32] * 4, w[32:]]))), ARCHS,
          Expect(1, ("blk.1.attn_output.weight",), rows=(16, 31)), "one tensor-parallel shard given the wrong scale"),
    Fault("sign_flipped_in_one_row", _weights(flip_sign("layers.1.mlp.up_proj", 5)), ARCHS,
          Expect(1, ("blk.1.ffn_up.weight",), rows=(5, 5)), "a sign bit lost in one row of the packing"),
    Fault("nvfp4_block_scale_byte_corrupted", _weights(corrupt_block_scale("layers.0.self_attn.v_proj", 6)), ARCHS,
          Expect(0, ("blk.0.attn_v.weight",), rows=(6, 6)), "one FP8 block-scale byte flipped", nvfp4_only=True),
    Fault("one_tensor_with_1.5x_quantization_noise", extra_noise("layers.1.mlp.down_proj"), ARCHS,
          Expect(1, ("blk.1.ffn_down.weight",)), "a quantizer 1.5× noisier than the scheme, in one tensor",
          nvfp4_only=True),
    Fault("global_scale_x3.9_on_one_tensor", _weights(scale_tensor("layers.0.mlp.down_proj", 3.9)), ARCHS,
          Expect(0, ("blk.0.ffn_down.weight",)), "a wrong amax in the global scale of one tensor"),
    Fault("square_weight_transposed", _weights(edit_weight("layers.1.self_attn.o_proj", lambda w: w.T.contiguous())),
          ARCHS, Expect(1, ("blk.1.attn_output.weight",)), "a [K, N] tensor written as [N, K]"),
    Fault("embedding_rows_swapped", _weights(swap_rows("embed_tokens", slice(10, 11), "embed_tokens", slice(11, 12))),
          ARCHS, Expect(None, ("token_embd.weight",), rows=(10, 11)), "a vocabulary permutation applied to the embedding only"),
    # --- tensors exchanged
    Fault("q_and_k_swapped", _weights(_swap_q_k_heads(0)), ARCHS,
          Expect(0, ("blk.0.attn_q.weight", "blk.0.attn_k.weight")), "q_proj and k_proj loaded into each other"),
    Fault("gate_and_up_swapped", _weights(swap_modules("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj")), ARCHS,
          Expect(1, ("blk.1.ffn_gate.weight", "blk.1.ffn_up.weight")), "the halves of a fused gate_up split the wrong way"),
    Fault("expert_pair_swapped", _weights(swap_experts(2, 1, 2)), ("gemma4_moe",),
          Expect(2, ("blk.2.ffn_gate_up_exps.weight", "blk.2.ffn_down_exps.weight"), expert=1),
          "expert indices of one layer permuted"),
    # --- Gemma-4 multipliers and norms
    Fault("attn_norm_shifted_by_one", _weights(edit_vector("layers.2.input_layernorm.weight", lambda w: w + 1)), GEMMA4,
          Expect(2, ("blk.2.attn_norm.weight",)), "Gemma-3's +1 norm convention applied to Gemma-4"),
    Fault("layer_scalar_doubled", _weights(edit_vector("layers.4.layer_scalar", lambda w: w * 2)), GEMMA4,
          Expect(4, ("blk.4.layer_output_scale.weight",)), "layer_scalar multiplied in twice"),
    Fault("router_scale_inverted", _weights(edit_vector("layers.1.router.scale", lambda w: 1 / w)), ("gemma4_moe",),
          Expect(1, ("blk.1.ffn_gate_inp.scale",)), "router.scale stored as its reciprocal"),
    Fault("one_per_expert_scale_zeroed", _weights(edit_vector("layers.3.router.per_expert_scale",
                                                              lambda w: torch.cat([w[:2], w[2:3] * 0, w[3:]]))),
          ("gemma4_moe",), Expect(3, ("blk.3.ffn_down_exps.scale",), expert=2), "one expert's output scale lost"),
    # --- config
    Fault("wrong_rope_theta", _config(_rope_theta), ARCHS, Expect(fields=_ROPE), "rope base read from the wrong key"),
    Fault("wrong_rms_norm_eps", _config(lambda c: c.update(rms_norm_eps=1e-2)), ARCHS, Expect(fields=_EPS),
          "eps of another model family"),
    Fault("wrong_hidden_act", _config(_activation), ARCHS, Expect(fields=_ACT), "activation of another model family"),
    Fault("wrong_sliding_window", _config(lambda c: c.update(sliding_window=4)), GEMMA4,
          Expect(fields=("sliding_window",)), "sliding window halved"),
    Fault("final_logit_softcapping_dropped", _config(lambda c: c.update(final_logit_softcapping=None)), GEMMA4,
          Expect(fields=("final_logit_softcapping",)), "softcap dropped by a config re-export"),
    # --- tokenizer
    Fault("bos_id_changed", _bos_changed, ARCHS, Expect(fields=("bos",), token=1), "BOS token id re-assigned"),
    Fault("two_tokenizer_entries_swapped",
          lambda cand, dst, original: _edit_json(cand, dst, "tokenizer.json", _swap_vocab_entries), ARCHS,
          Expect(fields=("tokenizer", "vocab"), token=SWAPPED_TOKENS[0]), "two vocabulary ids exchanged"),
]


def faults_for(arch: str, nvfp4: bool = True) -> list[Fault]:
    """The faults that apply to a candidate of `arch` (NVFP4 or dense)."""
    return [f for f in FAULTS if arch in f.archs and (nvfp4 or not f.nvfp4_only)]



# --------------------------------------------------------------------------------------------
# Reading a certificate against an expectation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    detected: bool  # exit code 1, verdict fail
    named: bool  # the first divergence (or every failing weight) names an expected tensor / field
    localized: bool  # named, and the expert, rows and token id are named too
    where: str  # what the certificate points at, one line


# Certificate sections whose failing entries are findings (config and tokenizer checks included).
_FINDING_SECTIONS = ("weights", "config", "tokenizer", "findings")


def _failing(cert: dict) -> list[dict]:
    return [d for key in _FINDING_SECTIONS for d in (cert.get(key) or []) if isinstance(d, dict) and not d.get("ok", True)]


def _mentions(text: str, word: str, number: int) -> bool:
    """`word` followed within a few words by `number` ("rows 16-31", "experts 1 and 2")."""
    return re.search(rf"{word}\w*\W+(?:[\w.]+\W+){{0,3}}?{number}\b", text) is not None


def judge(exit_code: int, cert: dict | None, expect: Expect) -> Outcome:
    if cert is None:
        return Outcome(False, False, False, f"exit {exit_code}, no certificate")
    fd = cert.get("first_divergence") or {}
    failing = _failing(cert)
    text = json.dumps([fd, failing]).lower()
    weights = [d.get("name") for d in failing if "name" in d and "field" not in d]
    named_tensor = bool(expect.tensors) and (
        fd.get("tensor") in expect.tensors or (bool(weights) and set(weights) <= set(expect.tensors)))
    named_field = any(f.lower() in text for f in expect.fields)
    named = named_tensor or named_field
    precise = all([
        expect.expert is None or _mentions(text, "expert", expect.expert),
        expect.rows is None or _mentions(text, "row", expect.rows[0]),
        expect.token is None or re.search(rf"\b{expect.token}\b", text) is not None,
    ])
    where = ", ".join(f"{k}={fd[k]}" for k in ("tap", "tensor", "hint") if fd.get(k) is not None) or "no first divergence"
    return Outcome(exit_code == 1 and cert.get("verdict") == "fail", named, named and precise, where)


VERIFY_TOKENS = 32  # tokens per verify run: enough to cross the sliding window (8) several times


def verify_cli(candidate: Path, oracle: Path, json_path: Path, tokens: int = VERIFY_TOKENS) -> tuple[int, dict | None, str]:
    """`nvq verify CANDIDATE --oracle ORACLE --json JSON_PATH --tokens N` through the CLI; returns
    (exit code, certificate or None, output)."""
    from typer.testing import CliRunner

    from nvq.cli import app

    json_path.unlink(missing_ok=True)
    args = ["verify", str(candidate), "--oracle", str(oracle), "--json", str(json_path), "--tokens", str(tokens)]
    result = CliRunner().invoke(app, args)
    cert = json.loads(json_path.read_text()) if json_path.is_file() else None
    return result.exit_code, cert, result.output
