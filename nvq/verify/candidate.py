"""Load any checkpoint under test as canonical float32 tensors, and say how each was stored.

A candidate is a Hugging Face directory: dense, compressed-tensors NVFP4 / MXFP4 (nvq's output or
another tool's), ModelOpt NVFP4, or GPTQ int4 (v1 or v2, any group size and g_idx). One table,
`READERS`, keyed by the `quantization_config`, picks the scheme and profile whose decoder
(`nvq.schemes`) its quantized modules go through; everything else is shared: quantized modules become
dense `<module>.weight` tensors, per-expert modules (`….experts.E.{gate,up,down}_proj`) are
reassembled into the fused stacks the name table knows (`experts.gate_up_proj` = per expert
cat(gate, up), stacked; `experts.down_proj` stacked), and the architecture's name table turns
HF names into canonical (GGUF) ones, exactly as `nvq.models.load.load_hf` does for dense
checkpoints.

`open_layout` reads headers only and says per canonical name how each tensor is made (`Source`);
`load_candidate` reads them all, `nvq.verify.sources.CandidateSource` one at a time on access.

Besides the tensors, the candidate says per canonical tensor how it was stored (`Scheme`): the
dense dtype, or the quantization format. The verifier applies that same scheme to the oracle's
weights to know how much error to expect (ARCHITECTURE decision 5).

GPTQ modules decode as GPTQModel and llama.cpp's converter read them (g_idx and qzeros, formats.md
§4.1); the candidate also carries their groups where act-order made them other than k // G
(`group_index`), and where vLLM would read the checkpoint differently (`client_findings`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nvq import schemes
from nvq.errors import CheckpointError
from nvq.formats.constants import INT4_SYM_ZERO
from nvq.io.hf import Checkpoint, HFConfig, load_config
from nvq.layouts import gptq as gptq_layout
from nvq.models import Architecture, config_rules, for_config
from nvq.models.base import NameTable
from nvq.models.load import canonical_names
from nvq.quant.policy import EXPERT_PARTS
from nvq.schemes.gptq import SERVED_SCALES
from nvq.verify.serving import DEFAULT_SERVING, SERVINGS, Serving


@dataclass(frozen=True)
class Scheme:
    """How one canonical tensor is stored in the candidate.

    name: a dense dtype ("f32", "bf16", "f16", "f64") or a format ("nvfp4", "mxfp4", "gptq").
    profile: whose arithmetic produced it, where formats have several ("ct", "modelopt").
    row_parts: a fused expert stack whose experts were quantized as this many row blocks each
        (gate_up: 2, the gate rows and the up rows; down: 1).
    group_size: elements per scale along K, for formats whose group size varies (gptq).
    """

    name: str
    profile: str | None = None
    row_parts: int = 1
    group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.name not in schemes.dense().storage_names

    def __str__(self) -> str:
        base = self.name if self.profile in (None, "ct") else f"{self.name}-{self.profile}"
        return base if self.group_size is None else f"{base}-g{self.group_size}"


@dataclass(frozen=True)
class ClientFinding:
    """Where a client serves the candidate other than GPTQModel and llama.cpp's converter read it.

    tensor: canonical name ("quantization_config" when the whole checkpoint is concerned).
    check: short id of the rule ("sym-qzeros", "g_idx-dropped", "act-order-refused", ...).
    rel_l2: ‖W_client − W‖ / ‖W‖ over the tensor, where the client loads it at all.
    serious: the client would silently serve other weights (verify fails); otherwise a note.
    """

    tensor: str
    client: str
    check: str
    what: str
    rel_l2: float | None
    serious: bool


@dataclass(frozen=True, eq=False)
class ModuleRead:
    """A decoded quantized module and what else its tensors say.

    groups: the group of each input column (GPTQ g_idx, int64 [K]); trivial: groups is k // G.
    """

    weight: torch.Tensor
    groups: torch.Tensor | None = None
    trivial: bool = True
    findings: tuple[ClientFinding, ...] = ()


@dataclass(frozen=True)
class Codec:
    """How one quantized Linear module of a checkpoint decodes: its scheme's Decoder (nvq.schemes:
    marker suffix, the parts it consumes, decode, dense shape from the headers) and what verify
    adds to it."""

    scheme: Scheme
    decoder: schemes.Decoder
    # (module, tensors) → ModuleRead, for formats whose tensors say more than the weight (GPTQ)
    read: Callable[[str, dict[str, torch.Tensor]], ModuleRead] | None = None
    findings: tuple[ClientFinding, ...] = ()  # about the whole checkpoint, from its config

    @property
    def marker(self) -> str:
        return self.decoder.marker

    @property
    def parts(self) -> tuple[str, ...]:
        return self.decoder.parts

    @property
    def optional(self) -> tuple[str, ...]:
        return self.decoder.optional

    def shape(self, stored: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        return self.decoder.shape(stored)

    def read_module(self, module: str, tensors: dict[str, torch.Tensor]) -> ModuleRead:
        return self.read(module, tensors) if self.read else ModuleRead(self.decoder.decode(tensors))


def _profile_codec(scheme: str, profile: str) -> Codec:
    return Codec(Scheme(scheme, profile), schemes.get(scheme).decoders[profile])


def ct_codecs() -> dict[str, Codec]:
    """compressed-tensors format name → codec, for every scheme that writes compressed-tensors."""
    return {d.format: _profile_codec(s.name, "ct") for s in schemes.all_schemes()
            if (d := s.decoders.get("ct")) is not None}


# What vLLM 0.33 serves from a GPTQ checkpoint (formats.md §4.2): check → (client, serious).
# Serious: vLLM loads the checkpoint and silently serves other weights. A refusal is loud, and a
# scale rounded to the serving dtype is the deployment's precision: notes.
VLLM = "vLLM 0.33"
GPTQ_CLIENT_CHECKS = {
    "sym-qzeros": (VLLM, True),  # sym → type uint4b8: qzeros ignored, zero 8 assumed
    "g_idx-dropped": (VLLM, True),  # desc_act false → the weight mapper drops .g_idx
    "act-order-refused": (VLLM, False),  # desc_act true with group_size ≠ −1 raises at load
    "asym-refused": (VLLM, False),  # only (bits, sym) ∈ {(4, true), (8, true)}
    "scale-dtype": (VLLM, False),  # fp16 scales cast to the model dtype
    "v1-zero-overflow": ("GPTQModel", True),  # a v1 zero point 0: GPTQModel and llama.cpp disagree
}
# config.json torch_dtype / dtype → the dtype vLLM holds the scales in
MODEL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# served scale dtype → the GPTQ scheme profile that says so (fp16 → fp32 is exact: no profile)
SCALE_PROFILES = {dtype: profile for profile, dtype in SERVED_SCALES.items()}


def _finding(tensor: str, check: str, what: str, rel_l2: float | None = None) -> ClientFinding:
    client, serious = GPTQ_CLIENT_CHECKS[check]
    return ClientFinding(tensor, client, check, what, rel_l2, serious)


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    n = ref.double().norm().item()
    d = (x.double() - ref.double()).norm().item()
    return d / n if n > 0 else d


def _gptq_codec(qc: dict, path: Path, serving: Serving = SERVINGS[DEFAULT_SERVING]) -> Codec:
    # GPTQ v1 / v2 (formats.md §4.1), read with g_idx and qzeros as GPTQModel and llama.cpp do.
    bits, group = qc.get("bits"), qc.get("group_size", -1)
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq")
    decoders = schemes.get("gptq").decoders  # checkpoint format → how it decodes
    if bits != 4 or fmt not in decoders or not isinstance(group, int):
        raise CheckpointError(
            f"{path}: GPTQ with bits={bits}, format '{fmt}', group_size={group!r} is not one nvq verifies; "
            f"it reads 4-bit {' and '.join(decoders)} checkpoints."
        )
    sym, desc_act = bool(qc.get("sym", True)), bool(qc.get("desc_act", False))
    config = load_config(path)
    dtype = MODEL_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype")))
    served = dtype if serving.gptq_scales_in_model_dtype else None  # vLLM's scales parameter

    def read(module: str, t: dict[str, torch.Tensor]) -> ModuleRead:
        m = gptq_layout.unpack(t, fmt)
        stored = m.weight()
        findings = tuple(_gptq_module_findings(f"{module}.weight", m, stored, fmt, sym, desc_act, dtype))
        return ModuleRead(m.weight(scale_dtype=served) if served else stored, m.g_idx, m.trivial, findings)

    config_findings = []
    if desc_act and group != -1:
        config_findings.append(_finding("quantization_config", "act-order-refused",
                                        f"desc_act true with group_size {group}: vLLM 0.33 refuses to load it"))
    if not sym:
        config_findings.append(_finding("quantization_config", "asym-refused",
                                        "sym false: vLLM 0.33 loads only symmetric GPTQ"))
    # -1: one group per row; the expected-noise model then uses the whole row as the group
    return Codec(Scheme("gptq", SCALE_PROFILES.get(served), 1, group), decoders[fmt], read, tuple(config_findings))


def _gptq_module_findings(tensor: str, m: gptq_layout.GPTQModule, w: torch.Tensor, fmt: str, sym: bool,
                          desc_act: bool, dtype: torch.dtype | None) -> list[ClientFinding]:
    """What vLLM (and GPTQModel, where it disagrees with llama.cpp) reads differently in one module."""
    out = []
    if sym and bool((m.zero != INT4_SYM_ZERO).any()):
        out.append(_finding(tensor, "sym-qzeros", f"sym checkpoint whose qzeros are not the implicit "
                            f"{gptq_layout.IMPLICIT_SYM_WORD[fmt]:#010x}: vLLM assumes zero {INT4_SYM_ZERO} where "
                            f"GPTQModel and llama.cpp read qzeros", _rel_l2(m.weight(zero=torch.full_like(m.zero, INT4_SYM_ZERO)), w)))
    if not desc_act and not m.trivial:
        out.append(_finding(tensor, "g_idx-dropped", "desc_act false but g_idx is not k // G: vLLM drops g_idx "
                            "and groups consecutive columns", _rel_l2(m.weight(g_idx=m.trivial_g_idx()), w)))
    if m.gptqmodel_zero is not None:
        out.append(_finding(tensor, "v1-zero-overflow", "a v1 qzeros nibble 15 (zero point 0, which v1 cannot store): "
                            "GPTQModel carries it into the next nibble, llama.cpp and nvq read zero 16",
                            _rel_l2(m.weight(zero=m.gptqmodel_zero), w)))
    if dtype is not None:
        cast = _rel_l2(m.weight(scale_dtype=dtype), w)
        if cast > 0:
            out.append(_finding(tensor, "scale-dtype", f"vLLM holds the fp16 scales in the model dtype "
                                f"{str(dtype).removeprefix('torch.')}", cast))
    return out


def _ct_codec(qc: dict, path: Path, serving: Serving | None = None) -> Codec:
    formats = {qc.get("format")} | {
        g.get("format") for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)
    }
    formats.discard(None)
    codecs = ct_codecs()
    known = [f for f in formats if f in codecs]
    if len(formats) != 1 or not known:
        raise CheckpointError(
            f"{path}: compressed-tensors format {sorted(formats) or 'unset'} is not one nvq verifies; "
            f"it reads {', '.join(codecs)}."
        )
    return codecs[known[0]]


def _modelopt_codec(qc: dict, path: Path, serving: Serving | None = None) -> Codec:
    algo = str(qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo") or "")
    if "FP4" not in algo.upper():
        raise CheckpointError(
            f"{path}: ModelOpt quant_algo '{algo}' is not one nvq verifies; it reads NVFP4 (W4A16_NVFP4, NVFP4)."
        )
    return _profile_codec("nvfp4", "modelopt")


# quant_method → how to pick the codec from the quantization_config. None: dense checkpoint.
READERS: dict[str | None, Callable[[dict, Path, Serving], Codec] | None] = {
    None: None,
    "compressed-tensors": _ct_codec,
    "modelopt": _modelopt_codec,
    "gptq": _gptq_codec,
}


@dataclass
class Candidate:
    path: Path
    arch: Architecture
    config: HFConfig
    tensors: Mapping[str, torch.Tensor]  # canonical name → float32 (a dict, or a lazy source)
    schemes: dict[str, Scheme]  # canonical name → how the candidate stores it
    format: str  # "dense", "compressed-tensors nvfp4-pack-quantized", "modelopt nvfp4", ...
    notes: list[str] = field(default_factory=list)
    # canonical name → int64 group of each input column, where it is not k // G (GPTQ act-order):
    # [K] for a 2-D weight, [E, row_parts, K] for a fused expert stack; `.reshape(-1, K)[i]` is the
    # g_idx of the i-th [N, K] block in the order diff.apply_scheme visits them
    group_index: dict[str, torch.Tensor] = field(default_factory=dict)
    client_findings: list[ClientFinding] = field(default_factory=list)

    @property
    def quantized(self) -> dict[str, Scheme]:
        return {n: s for n, s in self.schemes.items() if s.quantized}


def quantization_config(ckpt: Checkpoint) -> dict | None:
    """The checkpoint's quantization_config, or ModelOpt's legacy hf_quant_config.json."""
    qc = ckpt.config.get("quantization_config")
    if qc is None:
        legacy = ckpt.path / "hf_quant_config.json"
        if legacy.is_file():
            try:
                data = json.loads(legacy.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{legacy} cannot be read as JSON ({e}).") from None
            qc = {"quant_method": "modelopt", **(data.get("quantization") or {})}
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{ckpt.path}: quantization_config is a {type(qc).__name__}, not an object.")
    return qc


def _reader_key(qc: dict | None) -> str | None:
    if qc is None:
        return None
    method = str(qc.get("quant_method") or "")
    return "modelopt" if method.startswith("modelopt") else method


@dataclass(frozen=True)
class Source:
    """How one dense HF-named tensor of a candidate is made, known from the headers alone.

    A leaf is a tensor stored dense (`module` None: read `name` as stored) or a quantized module
    that the codec decodes into `<module>.weight`. A fused expert stack has `experts`: per expert,
    the leaves whose rows are concatenated (gate then up, or down alone).
    """

    name: str  # the HF name of the tensor it gives
    scheme: Scheme
    module: str | None = None
    experts: tuple[tuple[Source, ...], ...] = ()


@dataclass
class Layout:
    """A candidate directory as seen through its headers: per canonical name, the Source that
    makes it. Reads nothing until `read` / `read_expert` are called."""

    ckpt: Checkpoint
    arch: Architecture
    codec: Codec | None
    format: str  # "dense", "compressed-tensors nvfp4", "modelopt nvfp4", ...
    sources: dict[str, Source]  # canonical name → how to make it
    device: torch.device = torch.device("cpu")  # where quantized modules are decoded (CUDA kernels on a GPU)

    def read(self, src: Source) -> torch.Tensor:
        """The float32 tensor `src` gives: read as stored, decoded, or an expert stack."""
        if src.experts:
            try:
                return torch.stack([self.read_expert(src, e) for e in range(len(src.experts))])
            except RuntimeError:
                raise CheckpointError(f"{self.ckpt.path}: the per-expert modules of '{src.name}' differ in shape.") from None
        if src.module is None:
            return self.ckpt.read(src.name).to(self.device).float()
        return self.read_module(src).weight

    def shape(self, src: Source) -> tuple[int, ...] | None:
        """The dense shape `read(src)` gives, from the headers alone (None: the codec cannot say)."""
        if src.experts:
            leaves = [self.shape(leaf) for leaf in src.experts[0]]
            if any(s is None for s in leaves):
                return None
            return (len(src.experts), sum(s[0] for s in leaves), *leaves[0][1:])
        if src.module is None:
            return tuple(self.ckpt.tensors[src.name].shape)
        if self.codec.shape is None:
            return None
        return self.codec.shape({p: tuple(self.ckpt.tensors[f"{src.module}.{p}"].shape) for p in self.codec.parts})

    def read_module(self, src: Source) -> ModuleRead:
        """A quantized leaf decoded, with its groups and client findings (GPTQ)."""
        names = self.ckpt.tensors
        parts = {p: self.ckpt.read(f"{src.module}.{p}").to(self.device) for p in self.codec.parts}
        parts |= {p: self.ckpt.read(f"{src.module}.{p}").to(self.device) for p in self.codec.optional
                  if f"{src.module}.{p}" in names}
        try:
            return self.codec.read_module(src.module, parts)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{self.ckpt.path}: module '{src.module}' does not decode as {self.codec.scheme}: {e}"
            ) from None

    def read_full(self, src: Source) -> ModuleRead:
        """`read`, plus groups and findings: a stack's groups as [E, row_parts, K] (expert-major,
        gate before up), trivial only when every member's is."""
        if src.module is not None:
            return self.read_module(src)
        if not src.experts or src.experts[0][0].module is None:
            return ModuleRead(self.read(src))
        reads = [[self.read_module(leaf) for leaf in leaves] for leaves in src.experts]
        try:
            weight = torch.stack([torch.cat([r.weight for r in rs]) for rs in reads])
        except RuntimeError:
            raise CheckpointError(f"{self.ckpt.path}: the per-expert modules of '{src.name}' differ in shape.") from None
        findings = tuple(f for rs in reads for r in rs for f in r.findings)
        if any(r.groups is None for rs in reads for r in rs):
            return ModuleRead(weight, findings=findings)
        groups = torch.stack([torch.stack([r.groups for r in rs]) for rs in reads])
        return ModuleRead(weight, groups, all(r.trivial for rs in reads for r in rs), findings)

    def read_expert(self, src: Source, e: int) -> torch.Tensor:
        """Expert e of a fused stack: its leaves only, rows concatenated."""
        leaves = [self.read(leaf) for leaf in src.experts[e]]
        return leaves[0] if len(leaves) == 1 else torch.cat(leaves)


def open_layout(path: str | Path, serving: Serving = SERVINGS[DEFAULT_SERVING]) -> Layout:
    """Headers and config of a candidate directory → its Layout (CheckpointError for a format nvq
    does not verify, an incomplete quantized module, incomplete or mixed expert modules)."""
    ckpt = Checkpoint.open(path)
    qc = quantization_config(ckpt)
    key = _reader_key(qc)
    if key not in READERS:
        methods = ", ".join(k for k in READERS if k)
        raise CheckpointError(
            f"{ckpt.path}: quant_method '{key}' is not one nvq verifies; it reads dense checkpoints "
            f"and {methods}."
        )
    pick = READERS[key]
    codec = pick(qc, ckpt.path, serving) if pick else None
    arch = for_config(ckpt.config)
    hf = _hf_sources(ckpt, codec, arch.table)
    names = canonical_names(ckpt, arch, hf)
    fmt = "dense" if codec is None else f"{key} {codec.scheme.name}"
    lay = Layout(ckpt, arch, codec, fmt, {c: hf[s] for s, c in names.items()})
    # as convert does: a config that disagrees with the weights is bad input, not a failed verification
    shapes = {c: lay.shape(src) for c, src in lay.sources.items()}
    config_rules.check_tensors(ckpt.path, arch.config, {c: s for c, s in shapes.items() if s is not None})
    return lay


def load_candidate(path: str | Path) -> Candidate:
    """Read a candidate checkpoint directory into canonical float32 tensors and their schemes,
    with the groups of act-order GPTQ tensors and what clients would read differently."""
    lay = open_layout(path)
    cand = Candidate(lay.ckpt.path, lay.arch, lay.ckpt.config, {}, {}, lay.format,
                     client_findings=list(lay.codec.findings if lay.codec else ()))
    for c, src in lay.sources.items():
        read = lay.read_full(src)
        cand.tensors[c], cand.schemes[c] = read.weight, src.scheme
        if read.groups is not None and not read.trivial:
            cand.group_index[c] = read.groups
        cand.client_findings += merge_findings([replace(f, tensor=c) for f in read.findings])
    return cand


def merge_findings(findings: list[ClientFinding]) -> list[ClientFinding]:
    """One finding per tensor and check (a stack's experts: the largest rel-L2, and how many of
    its modules had it)."""
    merged: dict[tuple[str, str], list[ClientFinding]] = {}
    for f in findings:
        merged.setdefault((f.tensor, f.check), []).append(f)
    out = []
    for fs in merged.values():
        worst = max(fs, key=lambda f: -1.0 if f.rel_l2 is None else f.rel_l2)
        what = worst.what if len(fs) == 1 else f"{worst.what} (in {len(fs)} of its expert modules)"
        out.append(replace(worst, what=what))
    return out


_EXPERT = re.compile(r"(?P<stem>.+\.experts)\.(?P<e>\d+)\.(?P<part>[a-z_]+)\.weight")
# per-expert module suffix → the stacks it can join: (fused HF name, position in the fused rows,
# parts in that stack). Gemma-4 stacks gate with up (gate_up_proj); Qwen3-MoE's GGUF keeps them
# apart (ffn_gate_exps, ffn_up_exps): the name table says which stack exists.
_EXPERT_SLOTS: dict[str, list[tuple[str, int, int]]] = {}
for _parts in sorted(EXPERT_PARTS.values(), key=len):
    for _i, (_hf, _gguf) in enumerate(_parts):
        _fused = "_".join(p[0].removesuffix("_proj") for p in _parts) + "_proj"
        _EXPERT_SLOTS.setdefault(_hf, []).append((_fused, _i, len(_parts)))


def _hf_sources(ckpt: Checkpoint, codec: Codec | None, table: NameTable | None = None) -> dict[str, Source]:
    """Dense HF-named tensors: quantized modules decode to `<module>.weight`, per-expert modules
    fuse into their stacks."""
    names = set(ckpt.tensors)
    modules = set()
    if codec is not None:
        suffix = "." + codec.marker
        modules = {n[: -len(suffix)] for n in names if n.endswith(suffix)}
    owned = {f"{m}.{p}" for m in modules for p in (*codec.parts, *codec.optional)} if codec else set()
    out: dict[str, Source] = {}
    for m in sorted(modules):
        for p in codec.parts:
            if f"{m}.{p}" not in names:
                raise CheckpointError(f"{ckpt.path}: quantized module '{m}' has no '{p}' tensor.")
        out[f"{m}.weight"] = Source(f"{m}.weight", codec.scheme, module=m)
    for n in sorted(names - owned):
        info = ckpt.tensors[n]
        storage = info.dtype.lower()  # safetensors F32 → storage f32, what the dense scheme models
        if storage not in schemes.dense().storage_names:
            raise CheckpointError(
                f"{ckpt.path}: tensor '{n}' has dtype {info.dtype} and belongs to no quantized module "
                f"nvq can decode here."
            )
        out[n] = Source(n, Scheme(storage))
    _fuse_experts(ckpt.path, out, table)
    return out


def _slot(stem: str, part: str, table: NameTable | None) -> tuple[str, int, int] | None:
    """The stack a per-expert module joins: the first the name table knows (single-part stacks
    are tried first); without a table, the fused one."""
    slots = _EXPERT_SLOTS.get(part, [])
    if table is None:
        return slots[-1] if slots else None
    return next((s for s in slots if table.resolve(f"{stem}.{s[0]}") is not None), None)


def _fuse_experts(path: Path, out: dict[str, Source], table: NameTable | None = None) -> None:
    groups: dict[tuple[str, str], dict[int, dict[int, str]]] = {}
    sizes: dict[str, int] = {}
    for n in list(out):
        m = _EXPERT.fullmatch(n)
        slot = _slot(m["stem"], m["part"], table) if m else None
        if slot is None:
            continue
        fused, i, sizes[fused] = slot
        groups.setdefault((m["stem"], fused), {}).setdefault(int(m["e"]), {})[i] = n
    for (stem, fused), experts in groups.items():
        n_parts = sizes[fused]
        name = f"{stem}.{fused}"
        if sorted(experts) != list(range(len(experts))) or any(len(s) != n_parts for s in experts.values()):
            raise CheckpointError(f"{path}: the per-expert modules of '{name}' are incomplete.")
        members = tuple(tuple(out[experts[e][s]] for s in range(n_parts)) for e in sorted(experts))
        kinds = {leaf.scheme for leaves in members for leaf in leaves}
        if len(kinds) != 1:
            raise CheckpointError(f"{path}: the experts of '{name}' mix storage schemes {sorted(map(str, kinds))}.")
        kind = kinds.pop()
        scheme = Scheme(kind.name, kind.profile, n_parts if kind.quantized else 1, kind.group_size)
        out[name] = Source(name, scheme, experts=members)
        for leaves in members:
            for leaf in leaves:
                del out[leaf.name]
