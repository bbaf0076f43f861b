"""Metrics, the expected-noise model, and where a candidate first leaves it.

Decision 5 of ARCHITECTURE.md: a quantized model never equals its oracle, so every error is judged
against the error that the candidate's own storage scheme produces on the ORACLE's weights.
`expected_weights` applies each tensor's scheme (nvfp4 / mxfp4 through the reference codecs of
nvq.formats; a dense dtype by rounding to it) to the oracle's tensors; a forward over those is the
expected-noise run. A tap or weight fails when

    candidate error > factor · expected error + floor

(`Thresholds`; the floor absorbs fp32 noise where nothing is expected). The mean KLD, which grows
with the square of a logit error, fails above factor² · expected + kld_floor.

Logit statistics follow llama-perplexity (oracle.md §5): KL(oracle ‖ candidate) per position over
the softmax of the logits, summed over tokens whose oracle log-probability is above −16; top-1
agreement ("same top p"); Δp = p_candidate − p_oracle of the NEXT token of the sequence (RMS and
mean). Every position that has a next token is scored (llama-perplexity scores only the second
half of each chunk; these sequences are short).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch

from nvq.formats import int4, mxfp4, nvfp4
from nvq.verify.candidate import Scheme
from nvq.verify.taps import ForwardRun, tap_layer

KLD_LOG_P_MIN = -16.0  # llama-perplexity drops tokens with log p_base ≤ −16 from the KLD sum


@dataclass(frozen=True)
class Thresholds:
    factor: float = 2.0  # candidate error may reach factor × the expected error ...
    tap_floor: float = 1e-4  # ... plus this (rel-L2 of a tap; fp32 noise where none is expected)
    weight_floor: float = 1e-6  # rel-L2 of a weight
    kld_floor: float = 1e-5  # mean KLD, nats; its band is factor² × expected + kld_floor

    def tap_limit(self, expected: float) -> float:
        return self.factor * expected + self.tap_floor

    def weight_limit(self, expected: float) -> float:
        return self.factor * expected + self.weight_floor

    def kld_limit(self, expected: float) -> float:
        return self.factor**2 * expected + self.kld_floor

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ---------------------------------------------------------------------------------------------
# Expected noise: the candidate's scheme applied to the oracle's weights
# ---------------------------------------------------------------------------------------------


def _nvfp4_2d(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    q = nvfp4.quantize(w, profile=nvfp4.Profile(scheme.profile or "ct"))
    return nvfp4.dequantize(q, torch.float32)


def _mxfp4_2d(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    return mxfp4.dequantize(mxfp4.quantize(w), torch.float32)


def _gptq_2d(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    # Round-to-nearest at the candidate's group size: GPTQ trades a weight error of about this
    # size for a smaller output error, so RTN is the expected band for both.
    return int4.dequantize(int4.quantize(w, scheme.group_size or -1), torch.float32)


# scheme name → what storing an fp32 [N, K] block in it does to the values
NOISE = {
    "f32": lambda w, s: w,
    "f64": lambda w, s: w,
    "bf16": lambda w, s: w.to(torch.bfloat16).float(),
    "f16": lambda w, s: w.to(torch.float16).float(),
    "nvfp4": _nvfp4_2d,
    "mxfp4": _mxfp4_2d,
    "gptq": _gptq_2d,
}


# Schemes whose weights may legitimately sit further from the oracle than the expected noise says.
# GPTQ moves weights to cancel output error: on SmolLM2 (group 64) its weight rel-L2 is 1.27× that
# of round-to-nearest at the median and 2.83× at worst (blk.11.ffn_down), so its band is doubled.
# Its output error, which the taps judge, is below round-to-nearest's.
WEIGHT_SLACK = {"gptq": 2.0}


def apply_scheme(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """w as the candidate's scheme would store it. Quantized formats work per 2-D block with the
    block's own tensor scale: per expert, and per gate/up half of a fused gate_up stack."""
    fn = NOISE[scheme.name]
    w = w.float()
    if not scheme.quantized or w.dim() == 2 and scheme.row_parts == 1:
        return fn(w, scheme)
    mats = w.reshape(-1, *w.shape[-2:])
    out = []
    for m in mats:
        out.append(torch.cat([fn(p, scheme) for p in m.chunk(scheme.row_parts)]))
    return torch.stack(out).reshape(w.shape)


def expected_weights(oracle: Mapping[str, torch.Tensor], schemes: Mapping[str, Scheme]) -> dict[str, torch.Tensor]:
    """The oracle's tensors as the candidate's schemes store them (tensors the candidate lacks
    stay as the oracle has them)."""
    out = {}
    for name, w in oracle.items():
        s = schemes.get(name)
        out[name] = apply_scheme(w, s) if s is not None and _fits(w, s) else w
    return out


def _fits(w: torch.Tensor, s: Scheme) -> bool:
    block = {"nvfp4": 16, "mxfp4": 32, "gptq": s.group_size if (s.group_size or -1) > 0 else None}.get(s.name)
    return block is None or (w.dim() >= 2 and w.shape[-1] % block == 0 and w.shape[-2] % s.row_parts == 0)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    d, n = (x - ref).norm().item(), ref.norm().item()
    return d / n if n > 0 else d


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().flatten(), ref.double().flatten()
    nx, nr = x.norm().item(), ref.norm().item()
    if nx == 0 or nr == 0:
        return 1.0 if nx == nr else 0.0
    return max(-1.0, min(1.0, (x @ ref).item() / (nx * nr)))


def max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


@dataclass
class TapDiff:
    name: str
    layer: int | None
    rel_l2: float
    cosine: float
    max_abs: float
    expected_rel_l2: float
    limit: float
    ok: bool


def diff_taps(oracle: ForwardRun, candidate: ForwardRun, expected: ForwardRun, th: Thresholds) -> list[TapDiff]:
    """Every floating-point tap the oracle recorded, in its graph order."""
    out = []
    for name, ref in oracle.taps.items():
        if not ref.is_floating_point() or name not in candidate.taps:
            continue
        got = candidate.taps[name]
        if got.shape != ref.shape:
            out.append(TapDiff(name, tap_layer(name), math.inf, 0.0, math.inf, 0.0, 0.0, False))
            continue
        exp = rel_l2(expected.taps[name], ref) if name in expected.taps else 0.0
        err = rel_l2(got, ref)
        limit = th.tap_limit(exp)
        out.append(TapDiff(name, tap_layer(name), err, cosine(got, ref), max_abs(got, ref), exp, limit, err <= limit))
    return out


def logit_stats(oracle: torch.Tensor, candidate: torch.Tensor, sequences: list[torch.Tensor]) -> dict:
    """llama-perplexity's statistics of `candidate` against `oracle` (module docstring)."""
    klds, same, dps, dnll = [], [], [], []
    start = 0
    for ids in sequences:
        t = ids.numel()
        rows = slice(start, start + t - 1)  # positions with a next token
        nxt = ids[1:].long()
        lo = torch.log_softmax(oracle[rows].double(), dim=-1)
        lc = torch.log_softmax(candidate[rows].double(), dim=-1)
        po = lo.exp()
        keep = lo > KLD_LOG_P_MIN
        klds.append(torch.where(keep, po * (lo - lc), torch.zeros_like(po)).sum(-1))
        same.append(lo.argmax(-1) == lc.argmax(-1))
        pick_o, pick_c = lo.gather(1, nxt[:, None])[:, 0], lc.gather(1, nxt[:, None])[:, 0]
        dps.append(pick_c.exp() - pick_o.exp())
        dnll.append(pick_o - pick_c)
        start += t
    kld, top1, dp = torch.cat(klds), torch.cat(same).double(), torch.cat(dps)
    q = torch.quantile(kld, torch.tensor([0.99, 0.95, 0.90, 0.5], dtype=torch.float64))
    return {
        "mean_kld": kld.mean().item(),
        "kld_p99": q[0].item(),
        "kld_p95": q[1].item(),
        "kld_p90": q[2].item(),
        "kld_median": q[3].item(),
        "kld_max": kld.max().item(),
        "top1_agreement": top1.mean().item(),
        "rms_dp": dp.pow(2).mean().sqrt().item(),
        "mean_dp": dp.mean().item(),
        "mean_ln_ppl_ratio": torch.cat(dnll).mean().item(),
        "dp_of": "next token",
        "positions": int(kld.numel()),
    }


# ---------------------------------------------------------------------------------------------
# Weights, and hints for what went wrong
# ---------------------------------------------------------------------------------------------


@dataclass
class WeightDiff:
    name: str
    layer: int | None
    scheme: str | None
    rel_l2: float | None  # None: not comparable (missing or wrong shape)
    expected_rel_l2: float
    limit: float
    ok: bool
    hint: str | None = None

    @property
    def ratio(self) -> float:
        if self.rel_l2 is None:
            return math.inf
        return self.rel_l2 / self.limit if self.limit > 0 else math.inf


_BLK = re.compile(r"blk\.(?P<layer>\d+)\.")


def weight_layer(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m["layer"]) if m else None


def diff_weights(
    candidate: Mapping[str, torch.Tensor],
    oracle: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    schemes: Mapping[str, Scheme],
    th: Thresholds,
) -> list[WeightDiff]:
    """Every oracle tensor against the candidate's, in layer order."""
    out = []
    for name in sorted(oracle, key=lambda n: (weight_layer(n) is not None, weight_layer(n) or 0, n)):
        ref = oracle[name].float()
        s = schemes.get(name)
        label = str(s) if s else None
        exp = rel_l2(expected[name], ref)
        limit = th.weight_limit(exp * WEIGHT_SLACK.get(s.name if s else None, 1.0))
        got = candidate.get(name)
        if got is None:
            out.append(WeightDiff(name, weight_layer(name), label, None, exp, limit, False, "missing from the candidate"))
            continue
        if tuple(got.shape) != tuple(ref.shape):
            hint = (f"shape {list(got.shape)} where the oracle has {list(ref.shape)}: wrong head_dim or K "
                    f"(e.g. K read as the packed width)")
            out.append(WeightDiff(name, weight_layer(name), label, None, exp, limit, False, hint))
            continue
        err = rel_l2(got, ref)
        ok = err <= limit
        hint = None if ok else weight_hint(name, got.float(), ref, th, limit)
        out.append(WeightDiff(name, weight_layer(name), label, err, exp, limit, ok, hint))
    return out


def weight_hint(name: str, got: torch.Tensor, ref: torch.Tensor, th: Thresholds, limit: float) -> str:
    """The first entry of `HINTS` that explains the difference, else a plain statement."""
    for check in HINTS:
        hint = check(name, got, ref, limit)
        if hint:
            return hint
    return f"differs from the oracle by {rel_l2(got, ref) / max(limit, 1e-30):.3g}× its band (rel-L2 {rel_l2(got, ref):.3g})"


def _all_ones(name, got, ref, limit):
    if torch.all(got == 1) and not torch.all(ref == 1):
        what = ("norm missing or replaced by ones" if "norm" in name
                else "scalar left at its default 1.0" if ref.numel() == 1 else "scale left at its default of ones")
        return f"equal to all ones where the oracle's is not: {what}"
    return None


def _rope_permuted(name, got, ref, limit):
    if not re.search(r"\.attn_[qk]\.(weight|bias)$", name) or ref.dim() < 1:
        return None
    rows = ref.shape[0]
    for d in range(4, rows + 1, 2):
        if rows % d:
            continue
        heads = ref.reshape(rows // d, 2, d // 2, *ref.shape[1:])
        permuted = heads.transpose(1, 2).reshape(ref.shape)  # llama.cpp's LlamaModel.permute
        if rel_l2(got, permuted) <= limit:
            return (f"rows in llama.cpp's interleaved RoPE order (head_dim {d}): the GGUF Q/K "
                    f"permutation was left in (not undone)")
    return None


def _constant_factor(name, got, ref, limit):
    if ref.numel() < 2:
        return None
    mats = [(None, got, ref)] if ref.dim() < 3 else [(e, got[e], ref[e]) for e in range(ref.shape[0])]
    for e, g, r in mats:
        rr = r.double().flatten()
        gg = g.double().flatten()
        denom = (rr @ rr).item()
        if denom == 0:
            continue
        alpha = (gg @ rr).item() / denom
        if abs(alpha - 1) > 0.05 and rel_l2(g, alpha * r) <= limit + 0.05:
            where = "" if e is None else f" (expert {e})"
            return (f"off by a constant factor ×{alpha:.4g}{where}: a global or per-expert scale read "
                    f"as a multiplier instead of a divisor (or stored inverted)")
    return None


def _constant_offset(name, got, ref, limit):
    delta = (got.double() - ref.double()).flatten()
    if delta.numel() < 2:
        return None
    mean = delta.mean().item()
    if abs(mean) > 0.05 and (delta - mean).norm().item() <= limit * ref.double().norm().item() + 1e-6:
        return f"off by a constant {mean:+.4g}: a (1 + w) norm shift applied twice or not undone"
    return None


HINTS = [_all_ones, _rope_permuted, _constant_factor, _constant_offset]


# ---------------------------------------------------------------------------------------------
# First divergence
# ---------------------------------------------------------------------------------------------

# canonical weight stem → the tap families it feeds first (earliest in graph order wins)
WEIGHT_TAPS: list[tuple[re.Pattern[str], tuple[str, ...]]] = [
    (re.compile(p), taps)
    for p, taps in [
        (r"token_embd\..*", ("embd", "inp_scaled")),
        (r"per_layer_.*", ("inp_per_layer_selected", "per_layer_proj", "inp_per_layer")),
        (r"output_norm\..*", ("result_norm",)),
        (r"output\..*", ("result_output",)),
        (r"blk\.\d+\.attn_norm\..*", ("attn_norm",)),
        (r"blk\.\d+\.attn_q\..*", ("Qcur",)),
        (r"blk\.\d+\.attn_q_norm\..*", ("Qcur_normed",)),
        (r"blk\.\d+\.attn_k\..*", ("Kcur", "Vcur")),
        (r"blk\.\d+\.attn_k_norm\..*", ("Kcur_normed",)),
        (r"blk\.\d+\.attn_v\..*", ("Vcur",)),
        (r"blk\.\d+\.attn_output\..*", ("attn_out", "attn_post_norm")),
        (r"blk\.\d+\.post_attention_norm\..*", ("attn_post_norm",)),
        (r"blk\.\d+\.ffn_norm\..*", ("ffn_norm", "ffn_norm_1")),
        (r"blk\.\d+\.ffn_(gate|up|down)\.weight", ("ffn_out", "ffn_mlp")),
        (r"blk\.\d+\.post_ffw_norm_1\..*", ("ffn_mlp",)),
        (r"blk\.\d+\.ffn_gate_inp\..*", ("ffn_moe_logits",)),
        (r"blk\.\d+\.pre_ffw_norm_2\..*", ("ffn_norm_2",)),
        (r"blk\.\d+\.ffn_(gate_up|down)_exps\..*", ("ffn_moe_out",)),
        (r"blk\.\d+\.post_ffw_norm_2\..*", ("ffn_moe",)),
        (r"blk\.\d+\.post_ffw_norm\..*", ("ffn_post_norm",)),
        (r"blk\.\d+\.(inp_gate|proj|post_norm)\..*", ("per_layer_embd_out",)),
    ]
]


def entry_tap(weight: str, order: Mapping[str, int]) -> str | None:
    """The first tap (present in `order`) that the weight feeds."""
    layer = weight_layer(weight)
    suffix = "" if layer is None else f"-{layer}"
    for pattern, families in WEIGHT_TAPS:
        if pattern.fullmatch(weight):
            present = [f + suffix for f in families if f + suffix in order]
            if present:
                return min(present, key=order.__getitem__)
    fallback = f"l_out{suffix}" if layer is not None else "result_output"
    return fallback if fallback in order else None


def config_hint(d: dict) -> str:
    where = "" if d.get("layer") is None else f" of layer {d['layer']}"
    a, b = d["candidate"], d["oracle"]
    if d.get("layer") is not None and isinstance(a, list) and isinstance(b, list) and d["layer"] < min(len(a), len(b)):
        a, b = a[d["layer"]], b[d["layer"]]
    return (f"config: {d['field']}{where} is {a!r} in the candidate but {b!r} in the oracle GGUF "
            f"(e.g. a per-layer-type value taken from the other layer type)")


def first_divergence(
    taps: list[TapDiff],
    weights: list[WeightDiff],
    tap_order: list[str],
    logits_ok: bool = True,
    config: list[dict] = (),
) -> dict | None:
    """The earliest point, in graph order (`tap_order`: the oracle's taps as recorded), where the
    candidate leaves its band: the first failing tap, the first tap a failing weight feeds, or the
    first tap of a layer whose structural config differs (`config`), whichever comes first.
    `tensor` is that layer's failing weight with the largest excess, `hint` its hint (a config
    difference of that layer explains more than a weight)."""
    order = {name: i for i, name in enumerate(tap_order)}
    by_name = {t.name: t for t in taps}
    positions = [order[t.name] for t in taps if not t.ok and t.name in order]
    bad_weights = [w for w in weights if not w.ok]
    for w in bad_weights:
        tap = entry_tap(w.name, order)
        if tap is not None:
            positions.append(order[tap])
    config_at = {}
    for d in config:
        first = next((i for i, n in enumerate(tap_order) if d["layer"] is None or tap_layer(n) == d["layer"]), None)
        if first is not None:
            positions.append(first)
            config_at.setdefault(tap_layer(tap_order[first]), d)
    if not positions:
        if bad_weights:
            w = min(bad_weights, key=lambda x: (x.layer if x.layer is not None else -1, -x.ratio))
            return {"tap": None, "layer": w.layer, "tensor": w.name, "hint": w.hint}
        if not logits_ok:
            return {"tap": "result_output", "layer": None, "tensor": None,
                    "hint": "the logit distribution leaves the expected band (mean KLD)"}
        return None
    name = tap_order[min(positions)]
    layer = tap_layer(name)
    in_layer = [w for w in bad_weights if w.layer == layer]
    blamed = max(in_layer, key=lambda w: w.ratio) if in_layer else None
    tap = by_name.get(name)
    if layer in config_at:
        hint = config_hint(config_at[layer])
    elif blamed is not None:
        hint = blamed.hint
    elif tap is None or tap.ok:
        hint = None
    else:
        excess = tap.rel_l2 / tap.limit if tap.limit > 0 else math.inf
        hint = (f"rel-L2 {tap.rel_l2:.3g} is {excess:.3g}× its band with no weight to blame: the "
                f"computation differs (config or a forward convention)")
    return {"tap": name, "layer": layer, "tensor": blamed.name if blamed else None, "hint": hint}
