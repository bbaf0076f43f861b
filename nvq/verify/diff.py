"""Metrics, bands, and where a candidate first leaves them.

Decision 5 of ARCHITECTURE.md: a quantized model never equals its oracle, so every error is judged
against the error a correct candidate would show next to THIS oracle: the candidate's scheme
applied to plausible originals behind the oracle's values (`nvq.verify.noise`, several draws).
A tap or weight fails when

    candidate error > factor · mean(expected draws) + z · sd(expected draws) + floor

(`Thresholds`). The factor covers legitimate quantizer choices (measured in bench/RESULTS.md:
MSE scale search, OCP floor rule, bf16-cast inputs and ModelOpt arithmetic stay within 0.90–1.02×
round-to-nearest at the weights); the spread term is the draws' own scatter, which grows with the
oracle's storage noise; the floor absorbs fp32 noise where nothing is expected. The mean KLD fails
above kld_factor · mean + z · sd + kld_floor over the draws' KLDs. Rows and experts are judged on
their own as well (`nvq.verify.damage`).

Logit statistics follow llama-perplexity (oracle.md §5): KL(oracle ‖ candidate) per position over
the softmax of the logits, summed over tokens whose oracle log-probability is above −16; top-1
agreement ("same top p"); Δp = p_candidate − p_oracle of the NEXT token of the sequence (RMS and
mean). Every position that has a next token is scored (llama-perplexity scores only the second
half of each chunk; these sequences are short).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch

from nvq.models.blame import Blame
from nvq.schemes import storing
from nvq.verify.candidate import Scheme
from nvq.verify.damage import LocalDamage, local_damage
from nvq.verify.hints import Evidence, weight_hint
from nvq.verify.metrics import cosine, max_abs, rel_l2, row_sq_error
from nvq.verify.taps import ForwardRun, tap_layer

KLD_LOG_P_MIN = -16.0  # llama-perplexity drops tokens with log p_base ≤ −16 from the KLD sum


@dataclass(frozen=True)
class Thresholds:
    weight_factor: float = 1.25  # a weight may reach this × its expected error (1.5× must fail)
    tap_factor: float = 2.5  # a tap may reach this × its expected error (deep free-running taps scatter)
    kld_factor: float = 2.0  # the mean KLD may reach this × the expected mean KLD
    z: float = 3.0  # plus z standard deviations of the draws
    tap_floor: float = 1e-4  # rel-L2 of a tap; fp32 noise where none is expected
    weight_floor: float = 1e-6  # rel-L2 of a weight
    kld_floor: float = 1e-5  # mean KLD, nats

    def tap_limit(self, expected: Sequence[float]) -> float:
        return _band(self.tap_factor, self.z, self.tap_floor, expected)

    def weight_limit(self, expected: Sequence[float], slack: float = 1.0) -> float:
        return _band(self.weight_factor * slack, self.z, self.weight_floor, expected)

    def kld_limit(self, expected: Sequence[float]) -> float:
        return _band(self.kld_factor, self.z, self.kld_floor, expected)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _band(factor: float, z: float, floor: float, draws: Sequence[float]) -> float:
    draws = [d for d in draws if math.isfinite(d)] or [0.0]
    sd = statistics.stdev(draws) if len(draws) > 1 else 0.0
    return factor * statistics.fmean(draws) + z * sd + floor


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class TapDiff:
    name: str
    layer: int | None
    rel_l2: float
    cosine: float
    max_abs: float
    expected_rel_l2: float  # mean over the draws
    limit: float
    ok: bool
    expected_sd: float = 0.0  # the draws' scatter


def diff_taps(
    oracle: ForwardRun, candidate: ForwardRun, expected: ForwardRun | Sequence[ForwardRun], th: Thresholds
) -> list[TapDiff]:
    """Every floating-point tap the oracle recorded, in its graph order, against the draws."""
    draws = [expected] if isinstance(expected, ForwardRun) else list(expected)
    out = []
    for name, ref in oracle.taps.items():
        if not ref.is_floating_point() or name not in candidate.taps:
            continue
        got = candidate.taps[name]
        if got.shape != ref.shape:
            out.append(TapDiff(name, tap_layer(name), math.inf, 0.0, math.inf, 0.0, 0.0, False))
            continue
        exp = [rel_l2(d.taps[name], ref) for d in draws if name in d.taps] or [0.0]
        err = rel_l2(got, ref)
        limit = th.tap_limit(exp)
        sd = statistics.stdev(exp) if len(exp) > 1 else 0.0
        out.append(TapDiff(name, tap_layer(name), err, cosine(got, ref), max_abs(got, ref),
                           statistics.fmean(exp), limit, err <= limit, sd))
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
        kld = torch.where(keep, po * (lo - lc), torch.zeros_like(po)).sum(-1)
        # a NaN logit makes `keep` false and its KLD term 0; report NaN, never a perfect 0
        finite = torch.isfinite(lo).all(-1) & torch.isfinite(lc).all(-1)
        klds.append(torch.where(finite, kld, torch.full_like(kld, math.nan)))
        same.append(lo.argmax(-1) == lc.argmax(-1))
        pick_o, pick_c = lo.gather(1, nxt[:, None])[:, 0], lc.gather(1, nxt[:, None])[:, 0]
        dps.append(pick_c.exp() - pick_o.exp())
        dnll.append(pick_o - pick_c)
        start += t
    return logit_summary(torch.cat(klds), torch.cat(same).double(), torch.cat(dps), torch.cat(dnll))


def logit_summary(kld: torch.Tensor, top1: torch.Tensor, dp: torch.Tensor, dnll: torch.Tensor) -> dict:
    """llama-perplexity's summary of per-position KLD, same-top-1, Δp and ln-probability ratio."""
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
        "mean_ln_ppl_ratio": dnll.mean().item(),
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
    expected_rel_l2: float  # mean over the draws
    limit: float
    ok: bool
    hint: str | None = None
    oracle_type: str | None = None  # how the oracle stores it (ggml type)
    bit_exact: bool = False  # equals nvq's own storage of the oracle's values, bit for bit
    where: str | None = None  # rows / experts that leave their band

    @property
    def ratio(self) -> float:
        if self.rel_l2 is None:
            return math.inf
        return self.rel_l2 / self.limit if self.limit > 0 else math.inf


_BLK = re.compile(r"blk\.(?P<layer>\d+)\.")


def weight_layer(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m["layer"]) if m else None


@dataclass
class WeightNoise:
    """The expected candidate of one tensor: the nominal draw (no dither) and the dithered ones."""

    nominal: torch.Tensor
    draws: list[torch.Tensor]  # empty when the oracle stores the tensor exactly


def diff_weight(
    name: str,
    got: torch.Tensor | None,
    ref: torch.Tensor,
    noise: WeightNoise,
    scheme: Scheme | None,
    th: Thresholds,
    oracle: Mapping[str, torch.Tensor],
    oracle_type: str | None = None,
) -> WeightDiff:
    """One oracle tensor against the candidate's: whole-tensor error, rows and experts."""
    layer, label = weight_layer(name), (str(scheme) if scheme else None)
    ref = ref.float()
    draws = noise.draws or [noise.nominal]
    exp = [rel_l2(d, ref) for d in draws]
    slack = weight_slack(scheme)
    limit = th.weight_limit(exp, slack)
    mean_exp = statistics.fmean(exp)
    if got is None:
        return WeightDiff(name, layer, label, None, mean_exp, limit, False, "missing from the candidate", oracle_type)
    if tuple(got.shape) != tuple(ref.shape):
        hint = (f"shape {list(got.shape)} where the oracle has {list(ref.shape)}: wrong head_dim or K "
                f"(e.g. K read as the packed width)")
        return WeightDiff(name, layer, label, None, mean_exp, limit, False, hint, oracle_type)
    got = got.float()
    err = rel_l2(got, ref)
    exact = bool(torch.equal(got, noise.nominal))
    damage = LocalDamage()
    if not exact and ref.dim() >= 2:
        damage = _local(got, ref, draws, scheme, th, slack)
    elif not exact and ref.dim() == 1 and ref.numel() > 1:
        damage = local_damage(got[:, None], ref[:, None],
                              torch.stack([(d.double() - ref.double()).pow(2) for d in draws]).mean(0),
                              th.weight_factor * slack, th.weight_floor)
        if PER_EXPERT_VECTOR.search(name):  # one entry per expert: name the experts
            damage.experts, damage.rows = damage.rows, []
    ok = exact or (err <= limit and not damage.found)
    hint = where = None
    if not ok:
        hint = weight_hint(Evidence(name, got, ref, limit, oracle, damage))
        where = damage.describe(ref.shape[1] if ref.dim() == 3 else None) or None
    return WeightDiff(name, layer, label, err, mean_exp, limit, ok, hint, oracle_type, exact, where)


def _local(got, ref, draws, scheme, th: Thresholds, slack: float) -> LocalDamage:
    """Rows and experts out of band (nvq.verify.damage)."""
    if scheme is not None and not storing(scheme.name).judge_rows:  # rows carry no signal (GPTQ)
        return LocalDamage()
    k = ref.shape[-1]
    sq = torch.stack([row_sq_error(d, ref, k) for d in draws]).mean(0)
    return local_damage(got, ref, sq, th.weight_factor * slack, th.weight_floor, scale_block(scheme, k))


PER_EXPERT_VECTOR = re.compile(r"\.ffn_down_exps\.scale$")  # Gemma-4 router.per_expert_scale


def weight_slack(scheme: Scheme | None) -> float:
    """How much wider than the draws say the scheme's weight band is: its weights may legitimately
    sit further from the oracle (GPTQ moves them to cancel output error)."""
    return storing(scheme.name).weight_slack if scheme else 1.0


def scale_block(scheme: Scheme | None, k: int) -> int:
    """Elements that share one scale along a row in the candidate's scheme (1: dense)."""
    if scheme is None or not scheme.quantized:
        return 1
    return storing(scheme.name).scale_block(scheme, k)


def weight_order(names) -> list[str]:
    """Global tensors first, then blocks in layer order."""
    return sorted(names, key=lambda n: (weight_layer(n) is not None, weight_layer(n) or 0, n))


def diff_weights(
    candidate: Mapping[str, torch.Tensor],
    oracle: Mapping[str, torch.Tensor],
    schemes: Mapping[str, Scheme],
    th: Thresholds,
    nominal: Mapping[str, torch.Tensor] | None = None,
    draws: Sequence[Mapping[str, torch.Tensor]] = (),
    storage: Mapping[str, str] | None = None,
) -> list[WeightDiff]:
    """Every oracle tensor against the candidate's, in layer order. `nominal`: the candidate's
    schemes applied to the oracle's own values (`nvq.verify.noise.expected_draw` draw 0);
    `draws`: the dithered draws (none for an exact oracle)."""
    from nvq.verify.noise import expected_draw

    nominal = nominal if nominal is not None else expected_draw(oracle, schemes, {}, 0)
    storage = storage or {}
    out = []
    for name in weight_order(oracle):
        noise = WeightNoise(nominal[name], [d[name] for d in draws])
        out.append(diff_weight(name, candidate.get(name), oracle[name], noise, schemes.get(name), th, oracle,
                               storage.get(name)))
    return out


# ---------------------------------------------------------------------------------------------
# First divergence
# ---------------------------------------------------------------------------------------------

def entry_tap(weight: str, order: Mapping[str, int], blame: Sequence[Blame]) -> str | None:
    """The first tap (present in `order`) that the weight feeds, by the architecture's blame rows."""
    layer = weight_layer(weight)
    suffix = "" if layer is None else f"-{layer}"
    for row in blame:
        if row.matches(weight):
            present = [f + suffix for f in row.taps if f + suffix in order]
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
    blame: Sequence[Blame],
    logits_ok: bool = True,
    config: list[dict] = (),
) -> dict | None:
    """The earliest point, in graph order (`tap_order`: the oracle's taps as recorded), where the
    candidate leaves its band: the first failing tap, the first tap a failing weight feeds, or the
    first tap of a layer whose structural config differs (`config`), whichever comes first; a
    weight feeds the taps its architecture's `blame` rows name.
    `tensor` is that layer's failing weight with the largest excess, `hint` its hint (a config
    difference of that layer explains more than a weight)."""
    order = {name: i for i, name in enumerate(tap_order)}
    by_name = {t.name: t for t in taps}
    positions = [order[t.name] for t in taps if not t.ok and t.name in order]
    bad_weights = [w for w in weights if not w.ok]
    for w in bad_weights:
        tap = entry_tap(w.name, order, blame)
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
            return {"tap": None, "layer": w.layer, "tensor": w.name, "where": w.where, "hint": w.hint}
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
    return {"tap": name, "layer": layer, "tensor": blamed.name if blamed else None,
            "where": blamed.where if blamed else None, "hint": hint}
