"""Building blocks of the reference forward: plain PyTorch, one sequence, no KV cache.

Every function takes activations as `[T, features]` (or `[T, heads, head_dim]` for per-head
tensors) and weights in PyTorch's `[out, in]` layout, in the dtype the caller chose (fp32 for the
reference, fp64 for tests). Reductions that transformers runs in fp32 (RMSNorm, softmax) run here in
`promote_types(dtype, float32)`, so fp64 stays fp64 and bf16 would be upcast as in transformers.
The math follows spec/gemma4.md §2 and §8; nothing here knows about checkpoints or names.

`Taps` records named intermediates for the verifier; with no taps (or none that match) a forward
does no extra work beyond a set lookup per name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

NORM_LLAMA = "llama"  # w · cast(x·rsqrt(mean x² + eps)): cast to x.dtype BEFORE the multiply
NORM_ONE_PLUS = "one_plus"  # Gemma-1..3: (x·rsqrt(·))_f32 · (1 + w)_f32, then cast
NORM_PLAIN = "plain"  # Gemma-4: (x·rsqrt(·))_f32 · w_f32, then cast
NORM_KINDS = (NORM_LLAMA, NORM_ONE_PLUS, NORM_PLAIN)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, kind: str = NORM_PLAIN
) -> torch.Tensor:
    """RMSNorm over the last dim. `weight=None` is the weightless norm (Gemma-4 v_norm, router).

    `kind` picks where the weight enters (gemma4.md §2.1, §8): NORM_LLAMA casts the normalized
    value back to x.dtype and then multiplies; NORM_ONE_PLUS multiplies by (1 + w) in fp32;
    NORM_PLAIN multiplies by w in fp32. In fp32 and fp64 the first and the last agree exactly.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown RMSNorm kind {kind!r}; expected one of {NORM_KINDS}")
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return normed.to(x.dtype)
    if kind == NORM_LLAMA:
        return weight.to(x.dtype) * normed.to(x.dtype)
    w = weight.to(ct)
    if kind == NORM_ONE_PLUS:
        w = 1.0 + w
    return (normed * w).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# RoPE (rotate-half / NEOX pairing: dim j pairs with dim j + D/2)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeSpec:
    """One layer type's rotary embedding, as HF `rope_parameters[...]` describes it.

    kind: "default", "linear" (frequencies / factor), "llama3" (wavelength-banded scaling) or
    "proportional" (Gemma-4 full layers: the first int(partial_rotary_factor·D/2) pairs rotate with
    exponent denominator D, the other pairs get frequency 0, i.e. pass through).
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: dict | None, default_theta: float) -> RopeSpec:
        params = dict(params or {})
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind not in ("default", "linear", "llama3", "proportional"):
            raise ValueError(f"RoPE type {kind!r} is not supported by the reference forward")
        return cls(
            theta=float(params.get("rope_theta", default_theta)),
            kind=kind,
            factor=float(params.get("factor", 1.0) or 1.0),
            partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0) or 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", 8192)
            ),
        )


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Per-pair angular frequencies f_j, j < head_dim/2, in fp64 (gemma4.md §2.4).

    Partial rotary (a RoPE over the first `partial_rotary_factor·D` dims only) is not supported
    except in the proportional form, which keeps the full-width pairing.
    """
    d = head_dim
    j = torch.arange(0, d // 2, dtype=torch.float64)
    if spec.kind == "proportional":
        rotated = int(spec.partial_rotary_factor * d // 2)
        inv = torch.where(j < rotated, spec.theta ** (-2.0 * j / d), torch.zeros_like(j))
        return inv / spec.factor
    if spec.partial_rotary_factor != 1.0:
        raise ValueError("partial_rotary_factor != 1 is only supported with proportional RoPE")
    inv = spec.theta ** (-2.0 * j / d)
    if spec.kind == "linear":
        return inv / spec.factor
    if spec.kind == "llama3":
        old = spec.original_max_position_embeddings
        low_wavelen = old / spec.low_freq_factor
        high_wavelen = old / spec.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / spec.factor, inv)
        smooth = (old / wavelen - spec.low_freq_factor) / (
            spec.high_freq_factor - spec.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of p·f_j as `[T, D/2]`, computed in fp64 and rounded once to `dtype`."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[T, heads, D]`; cos/sin `[T, D/2]`. out[j] = x[j]c − x[j+h]s, out[j+h] = x[j+h]c + x[j]s."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def attention_mask(t: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean `[T_q, T_k]`, True where a query may attend: k ≤ q and, with a window W, q − k < W."""
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal multi-head attention with GQA over one sequence at positions 0..T−1.

    q `[T, Hq, D]`, k/v `[T, Hkv, D]`; query head h reads KV head h // (Hq/Hkv) (repeat_interleave).
    scores = q·kᵀ·scale, optionally softcapped (c·tanh(s/c)), masked, softmaxed in ≥fp32.
    Returns `[T, Hq·D]` (heads concatenated, head-major), the input of the output projection.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads")
    g = hq // hkv
    qg = q.reshape(t, hkv, g, d)
    scores = torch.einsum("qkgd,skd->kgqs", qg, k) * scale  # [Hkv, g, Tq, Tk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = attention_mask(t, window, device=q.device)
    ct = compute_dtype(q.dtype)
    scores = scores.to(ct).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.einsum("kgqs,skd->qkgd", probs, v)  # [Tq, Hkv, g, D]
    return out.reshape(t, hq * d)


# ---------------------------------------------------------------------------------------------
# MLPs and MoE
# ---------------------------------------------------------------------------------------------


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), HF `gelu_pytorch_tanh`."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
        ) from None


class Observer(Protocol):
    """What GPTQ calibration (nvq.quant.capture) sees of a forward it is handed explicitly."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor | ExpertModules, expert: int | None) -> None:
        """Called with a Linear's input before `weight` (or expert `expert` of it) is used."""

    def keep(self, t: torch.Tensor) -> None:
        """Called with every tensor the forward passes to `Ops.keep`."""


class InputQuantized(torch.Tensor):
    """A weight whose Linear quantizes its input first, as an engine serving it does
    (`nvq.verify.serving`); subclasses name the quantizer. The type survives casts and indexing."""

    @staticmethod
    def quantize_input(x: torch.Tensor) -> torch.Tensor:
        return x


def _served(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(weight, InputQuantized):
        return type(weight).quantize_input(x), weight.as_subclass(torch.Tensor)
    return x, weight


# A fused expert stack `[E, rows, cols]`, or a function giving expert e's `[rows, cols]` (a lazy
# source reads only the experts that tokens were routed to).
ExpertStack = torch.Tensor | Callable[[int], torch.Tensor]


class ExpertModules:
    """Experts stored one Linear each (`name[e]`, e.g. Qwen3-MoE's per-expert checkpoint tensors),
    read on use. Each is an ordinary named weight, so the observer sees it as its own Linear."""

    def __init__(self, weights: Weights, name: str) -> None:
        self.weights, self.name = weights, name

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.weights(f"{self.name}[{e}]")


ALL_EXPERTS = -1  # observer's expert index for the MoE block's input before routing


@dataclass(frozen=True)
class Routing:
    logits: torch.Tensor  # [T, E] router projection output
    probs: torch.Tensor  # [T, E] softmax over all experts
    experts: torch.Tensor  # [T, K] selected expert ids, by descending probability
    weights_norm: torch.Tensor  # [T, K] top-k probabilities renormalized to sum 1
    weights: torch.Tensor  # [T, K] the weights the expert outputs are summed with


class Ops:
    """The operations of a forward that run Linears or hold activations, bound to the forward's
    observer (None outside calibration). A forward makes one and passes it to its helpers."""

    def __init__(self, observer: Observer | None = None) -> None:
        self.observer = observer

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """Returns t. Marks an activation the forward holds across later Linears (the residual
        stream, K/V or PLE inputs kept for later layers): a calibration sequence parked at a Linear
        may have its kept tensors and the Linear's input moved off the device until it resumes.
        Tensors a forward holds but no longer needs should be released instead (end of a helper's
        frame, `del`), so the parked state is the kept set plus the Linear's input."""
        if self.observer is not None:
            self.observer.keep(t)
        return t

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x `[T, in]` · Wᵀ (`[out, in]`) + b."""
        if self.observer is not None:
            self.observer.linear(x, weight, None)
        return F.linear(*_served(x, weight), bias)

    def _expert_linear(self, x: torch.Tensor, stack: ExpertStack | ExpertModules, e: int) -> torch.Tensor:
        """x · stack[e]ᵀ, announced to the observer as expert e of the stack (a view has no identity)."""
        if isinstance(stack, ExpertModules):  # a weight of its own, observed as expert e
            w = stack[e]
            if self.observer is not None:
                self.observer.linear(x, w, e)
            return F.linear(*_served(x, w))
        if self.observer is not None:
            self.observer.linear(x, stack, e)
        return F.linear(*_served(x, stack[e] if isinstance(stack, torch.Tensor) else stack(e)))

    def glu_mlp(
        self,
        x: torch.Tensor,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        act: str,
        biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
    ) -> torch.Tensor:
        """down·(act(gate·x) ⊙ up·x): SwiGLU with act="silu", GeGLU with act="gelu_pytorch_tanh"."""
        fn = activation(act)
        bg, bu, bd = biases
        h = fn(self.linear(x, gate, bg)) * self.linear(x, up, bu)
        del x  # a calibration sequence parks at `down`; its input is no longer part of its state
        return self.linear(h, down, bd)

    def softmax_route(self, x: torch.Tensor, proj: torch.Tensor, top_k: int, normalize: bool) -> Routing:
        """Qwen3-MoE / Mixtral router: softmax of proj·x over all experts in ≥fp32, top-k, and with
        `normalize` (HF norm_topk_prob) the k weights renormalized to sum 1."""
        logits = self.linear(x, proj)
        probs = torch.softmax(logits.to(compute_dtype(x.dtype)), dim=-1)
        top, idx = torch.topk(probs, top_k, dim=-1)
        norm = top / top.sum(dim=-1, keepdim=True) if normalize else top
        return Routing(logits, probs, idx, norm, norm)

    def moe_glu(
        self,
        x: torch.Tensor,
        gate: ExpertStack | ExpertModules,
        up: ExpertStack | ExpertModules,
        down: ExpertStack | ExpertModules,
        experts: torch.Tensor,
        weights: torch.Tensor,
        act: str,
    ) -> torch.Tensor:
        """`moe_experts` with gate `[E, Ie, H]` and up `[E, Ie, H]` as separate stacks (llama.cpp's
        ffn_gate_exps / ffn_up_exps), or as per-expert Linears (ExpertModules)."""
        fn = activation(act)
        out = torch.zeros_like(x)
        if self.observer is not None:  # every token: the fallback Hessian of rarely routed experts
            self.observer.linear(x, gate, ALL_EXPERTS)
            self.observer.linear(x, up, ALL_EXPERTS)
        for e in torch.unique(experts).tolist():
            tok, slot = torch.nonzero(experts == e, as_tuple=True)
            xe = x[tok]
            y = self._expert_linear(fn(self._expert_linear(xe, gate, e)) * self._expert_linear(xe, up, e), down, e)
            out = out.index_add(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
        return out

    def moe_experts(
        self,
        x: torch.Tensor,
        gate_up: ExpertStack,
        down: ExpertStack,
        experts: torch.Tensor,
        weights: torch.Tensor,
        act: str,
    ) -> torch.Tensor:
        """Σ_k w_k · D_e(act(G_e·x) ⊙ U_e·x) over the selected experts e = experts[t, k].

        gate_up `[E, 2·Ie, H]` (rows [0, Ie) gate, [Ie, 2·Ie) up), down `[E, H, Ie]`, or functions of
        e giving one expert's rows (see ExpertStack). Loops over the experts that at least one token
        selected; tokens are batched per expert.
        """
        fn = activation(act)
        out = torch.zeros_like(x)
        if self.observer is not None:  # every token: the fallback Hessian of rarely routed experts
            self.observer.linear(x, gate_up, ALL_EXPERTS)
        for e in torch.unique(experts).tolist():
            tok, slot = torch.nonzero(experts == e, as_tuple=True)
            xe = x[tok]
            gu = self._expert_linear(xe, gate_up, e)
            ie = gu.shape[-1] // 2
            y = self._expert_linear(fn(gu[:, :ie]) * gu[:, ie:], down, e)
            out = out.index_add(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
        return out


UNOBSERVED = Ops()  # outside calibration: the LM head, tests


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """c·tanh(x/c); identity when cap is None or 0."""
    if not cap:
        return x
    return torch.tanh(x / cap) * cap


# ---------------------------------------------------------------------------------------------
# Taps
# ---------------------------------------------------------------------------------------------


class Taps:
    """Records named intermediates of a forward, only those a caller asked for.

    `Taps()` records everything; `Taps({"l_out-3", "result_norm"})` records exact names;
    `Taps(pattern=r"l_out-\\d+|result_.*")` records names the regex fully matches (both may be
    given: a name is recorded if either selects it). The forward calls `taps(name, tensor)`;
    the decision per name is cached, so an unselected name costs one dict lookup.

    Recorded tensors are detached (not copied: the forward never writes into a tensor after it
    was tapped) and optionally moved with `device=` (e.g. "cpu" when the forward runs on a GPU).
    Read them like a dict: `taps["l_out-0"]`, `taps.names()`, `dict(taps.items())`.
    """

    def __init__(
        self,
        names: Iterable[str] | None = None,
        pattern: str | re.Pattern[str] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self._names = None if names is None else frozenset(names)
        self._pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        self._all = names is None and pattern is None
        self._device = device
        self._wants: dict[str, bool] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        hit = self._wants.get(name)
        if hit is None:
            hit = (
                self._all
                or (self._names is not None and name in self._names)
                or (self._pattern is not None and self._pattern.fullmatch(name) is not None)
            )
            self._wants[name] = hit
        return hit

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.wants(name):
            t = tensor.detach()
            if self._device is not None:
                t = t.to(self._device)
            self.tensors[name] = t
        return tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def items(self):
        return self.tensors.items()


class _NoTaps:
    """Stands in for `taps=None`: records nothing."""

    def wants(self, name: str) -> bool:
        return False

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


NO_TAPS = _NoTaps()


def as_taps(taps: Taps | None) -> Taps | _NoTaps:
    return NO_TAPS if taps is None else taps


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


class Weights:
    """Reads canonical tensors from a mapping, cast to the forward's dtype and device on use.

    Only `in` and `[]` are used, so the mapping may be lazy (read each tensor from disk on access)
    to keep one layer's weights in memory at a time. A lazy source may also offer
    `rows(name, ids)`, `row_block(name, start, stop)` and `expert(name, e)`, which read part of a
    tensor; they are used when present (nvq.verify.sources, nvq.io.gguf_model.GGUFSource).
    """

    def __init__(self, tensors, dtype: torch.dtype, device) -> None:
        self._t = tensors
        self.dtype = dtype
        self.device = torch.device(device)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def __call__(self, name: str) -> torch.Tensor:
        try:
            t = self._t[name]
        except KeyError:
            raise KeyError(
                f"the reference forward needs tensor '{name}', which is not loaded"
            ) from None
        return self._cast(t)

    def get(self, name: str) -> torch.Tensor | None:
        return self(name) if name in self._t else None

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: only the selected rows are cast (and, from a lazy source, read)."""
        read = getattr(self._t, "rows", None)
        if read is not None:
            return self._cast(read(name, ids.cpu()))
        t = self._t[name]
        return self._cast(t[ids.to(t.device)])

    def experts(self, name: str) -> ExpertStack:
        """A fused expert stack; from a lazy source, a function reading expert e on demand."""
        read = getattr(self._t, "expert", None)
        if read is None:
            return self(name)
        return lambda e: self._cast(read(name, e))

    @property
    def lm_head_name(self) -> str:
        """output.weight, or the tied token embedding when there is none (as llama.cpp does)."""
        return "output.weight" if "output.weight" in self._t else "token_embd.weight"

    def lm_head(self) -> torch.Tensor:
        return self(self.lm_head_name)

    def lm_head_rows(self, start: int, stop: int) -> torch.Tensor:
        """Vocabulary rows [start, stop) of the LM head: the head in chunks."""
        name = self.lm_head_name
        read = getattr(self._t, "row_block", None)
        if read is not None:
            return self._cast(read(name, start, stop))
        return self._cast(self._t[name][start:stop])


# ---------------------------------------------------------------------------------------------
# Stepwise forwards
# ---------------------------------------------------------------------------------------------

FINAL = TypeVar("FINAL")
EMBEDDED = -1  # what a stepwise forward yields once the embedding is computed


def run_layers(steps: Generator[int, None, FINAL]) -> FINAL:
    """Drive a stepwise forward (`forward_layers`) to its end and return its final norm."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def check_token_ids(token_ids: torch.Tensor) -> torch.Tensor:
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D [T], got shape {tuple(token_ids.shape)}")
    if token_ids.numel() == 0:
        raise ValueError("token_ids is empty")
    return token_ids.long()
