"""The deployment rule: surrogate probabilities + a conformal calibration → a certified radius.

This module is the single place where a radius is computed from a surrogate's output. The runtime,
the export checks and the evaluation all call :func:`certify_from_probs`.

Guarantee (docs/CERTIFICATE.md): if the calibration inputs and the deployed input are exchangeable, then with
probability at least ``1 − alpha − beta`` over calibration, input and noise, either the certificate
abstains or the smoothed classifier ``g`` predicts ``top_class`` and is constant on the ℓ2 ball of
radius ``radius`` around the input.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np

from .stats import norm_cdf, norm_ppf

__all__ = [
    "TRANSFORMS",
    "Calibration",
    "apply_score_map",
    "Certificate",
    "CertificateBatch",
    "certify_from_probs",
    "conformal_quantile",
    "conformal_rank",
    "confidence_bin",
    "mondrian_quantiles",
    "conformal_scores",
    "min_calibration_size",
    "p_cap",
    "transform",
    "inverse_transform",
]

TRANSFORMS = ("probit", "logit", "identity")


def transform(p: np.ndarray | float, name: str) -> np.ndarray:
    """The monotone score transform T: ``probit`` = Φ⁻¹, ``logit``, or ``identity``."""
    p = np.asarray(p, dtype=np.float64)
    if name == "probit":
        return np.asarray(norm_ppf(p))
    if name == "logit":
        with np.errstate(divide="ignore"):
            return np.log(p) - np.log1p(-p)
    if name == "identity":
        return p
    raise ValueError(f"unknown score transform {name!r}; expected one of {TRANSFORMS}")


def inverse_transform(t: np.ndarray | float, name: str) -> np.ndarray:
    """T⁻¹, clipped to [0, 1] (the identity transform can leave it)."""
    t = np.asarray(t, dtype=np.float64)
    if name == "probit":
        return np.asarray(norm_cdf(t))
    if name == "logit":
        return 1.0 / (1.0 + np.exp(-t))
    if name == "identity":
        return np.clip(t, 0.0, 1.0)
    raise ValueError(f"unknown score transform {name!r}; expected one of {TRANSFORMS}")


def p_cap(beta: float, n_mc: int) -> float:
    """β^(1/N): the largest Clopper–Pearson lower bound that N draws can give (k = N)."""
    return float(beta ** (1.0 / n_mc))


@dataclass(frozen=True)
class Calibration:
    """What the deployment rule needs from calibration (mirrors the manifest's ``calibration``)."""

    sigma: float
    quantile: float
    alpha: float
    beta: float
    n_mc: int
    m: int
    score: str = "probit"
    p_cap: float = field(default=float("nan"))
    delta: float | None = None  # set for a training-conditional (PAC) quantile
    # Mondrian calibration by confidence: inner edges on ŝ (ascending) and one q̂ per bin (None
    # in JSON = +inf: that bin always abstains). Empty: ``quantile`` serves every input. When set,
    # ``quantile`` stays the plain single-quantile calibration, valid on its own.
    bin_edges: tuple[float, ...] = ()
    bin_quantiles: tuple[float, ...] = ()
    # A learned monotone map g on the probit scale (knots x → y, linear between, flat beyond), fitted
    # on a selection split: the score becomes g(Φ⁻¹(min(ŝ, p_cap))) − Φ⁻¹(p̲). Empty: g is the identity.
    score_map_x: tuple[float, ...] = ()
    score_map_y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.score not in TRANSFORMS:
            raise ValueError(f"unknown score transform {self.score!r}; expected one of {TRANSFORMS}")
        object.__setattr__(self, "score_map_x", tuple(float(v) for v in self.score_map_x))
        object.__setattr__(self, "score_map_y", tuple(float(v) for v in self.score_map_y))
        _check_score_map(self.score_map_x, self.score_map_y, self.score)
        if math.isnan(self.p_cap):
            object.__setattr__(self, "p_cap", p_cap(self.beta, self.n_mc))
        object.__setattr__(self, "_z_cap", norm_ppf(float(self.p_cap)))  # Φ⁻¹(p_cap), once
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        object.__setattr__(self, "bin_edges", tuple(float(e) for e in self.bin_edges))
        object.__setattr__(
            self, "bin_quantiles", tuple(math.inf if q is None else float(q) for q in self.bin_quantiles)
        )
        if self.bin_edges or self.bin_quantiles:
            if len(self.bin_quantiles) != len(self.bin_edges) + 1:
                raise ValueError(
                    f"{len(self.bin_edges)} bin edges need {len(self.bin_edges) + 1} bin quantiles, "
                    f"got {len(self.bin_quantiles)}"
                )
            if any(b <= a for a, b in zip(self.bin_edges, self.bin_edges[1:])):
                raise ValueError(f"bin edges must increase strictly, got {self.bin_edges}")

    def quantiles_for(self, top_prob: np.ndarray) -> np.ndarray:
        """q̂ for each input: its confidence bin's quantile, or the single quantile."""
        s = np.asarray(top_prob, dtype=np.float64)
        if not self.bin_edges:
            return np.full(s.shape, self.quantile)
        return np.asarray(self.bin_quantiles)[confidence_bin(s, self.bin_edges)]

    @property
    def score_map(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The knots ``(x, y)`` of the learned probit map, or None for the plain transform."""
        return (self.score_map_x, self.score_map_y) if self.score_map_x else None

    def with_quantile(self, quantile: float, bin_quantiles: tuple[float, ...] | None = None) -> Calibration:
        """The same calibration with another variant's quantile(s)."""
        d = asdict(self)
        d["quantile"] = float(quantile)
        if bin_quantiles is not None:
            d["bin_quantiles"] = tuple(bin_quantiles)
        return Calibration(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bin_edges"] = list(self.bin_edges)
        d["bin_quantiles"] = [q if math.isfinite(q) else None for q in self.bin_quantiles]
        d["score_map_x"] = list(self.score_map_x)
        d["score_map_y"] = list(self.score_map_y)
        return d


def _check_score_map(x: tuple[float, ...], y: tuple[float, ...], score: str) -> None:
    if not x and not y:
        return
    if score != "probit":
        raise ValueError(f"a learned score map works on the probit scale only, not with score {score!r}")
    if len(x) != len(y) or len(x) < 1:
        raise ValueError(f"score map needs as many x as y knots (≥ 1), got {len(x)} and {len(y)}")
    if not all(math.isfinite(v) for v in (*x, *y)):
        raise ValueError("score map knots must be finite")
    if any(b <= a for a, b in zip(x, x[1:])):
        raise ValueError("score map x knots must increase strictly")
    if any(b < a for a, b in zip(y, y[1:])):
        raise ValueError("score map y values must not decrease (the map must be monotone)")


def apply_score_map(z: np.ndarray | float, score_map: tuple[tuple[float, ...], tuple[float, ...]] | None):
    """g(z): piecewise linear through the knots, flat beyond the end knots; identity when None."""
    if score_map is None:
        return z
    x, y = score_map
    if isinstance(z, float):  # the runtime's per-frame path: bisect beats np.interp's set-up
        i = bisect_right(x, z)
        if i == 0:
            return y[0]
        if i == len(x):
            return y[-1]
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        return y0 + (y1 - y0) * (z - x0) / (x1 - x0)
    return np.interp(z, x, y)


def confidence_bin(top_prob: np.ndarray, edges: tuple[float, ...] | list[float]) -> np.ndarray:
    """Bin index of each ŝ: 0 below the first edge, ``len(edges)`` at or above the last."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), top_prob, side="right")


@dataclass(frozen=True)
class Certificate:
    """One input's certified prediction.

    ``abstain`` is explicit: when it is True, ``pred`` is None and ``radius`` is 0.0. ``score`` is the
    surrogate's top-class probability ŝ and ``p_lower`` the calibrated lower bound p̃.
    """

    top_class: int
    abstain: bool
    radius: float
    score: float
    p_lower: float

    @property
    def pred(self) -> int | None:
        return None if self.abstain else self.top_class


@dataclass(frozen=True)
class CertificateBatch:
    """Certificates for a batch, as arrays; ``pred`` is -1 where the batch abstains."""

    top_class: np.ndarray
    abstain: np.ndarray
    radius: np.ndarray
    score: np.ndarray
    p_lower: np.ndarray

    @property
    def pred(self) -> np.ndarray:
        return np.where(self.abstain, -1, self.top_class)

    def __len__(self) -> int:
        return len(self.top_class)

    def __getitem__(self, i: int) -> Certificate:
        return Certificate(
            top_class=int(self.top_class[i]),
            abstain=bool(self.abstain[i]),
            radius=float(self.radius[i]),
            score=float(self.score[i]),
            p_lower=float(self.p_lower[i]),
        )


_SMALL_BATCH = 16


def certify_from_probs(probs: np.ndarray, calibration: Calibration) -> Certificate | CertificateBatch:
    """Certify from surrogate probabilities ``probs`` (``[K]`` → Certificate, ``[B, K]`` → batch).

    Rule: Â = argmax s; p̃ = min(T⁻¹(T(min(s[Â], p_cap)) − q̂), p_cap). If p̃ > 1/2, predict Â with
    radius σ·Φ⁻¹(p̃); otherwise abstain with radius 0. With confidence bins, q̂ is the quantile of
    the bin that s[Â] falls in (Mondrian calibration: the guarantee then also holds within each bin).
    With a learned score map g (probit only), T(min(s[Â], p_cap)) is replaced by g(Φ⁻¹(min(s[Â], p_cap))),
    exactly as in the calibration scores, so the same argument holds.

    Guarantee: with probability ≥ 1 − α − β over calibration, input and noise (calibration and
    deployed inputs exchangeable), the certificate abstains or the smoothed classifier predicts Â
    and is constant on the ℓ2 ball of the returned radius. Not a per-input guarantee.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[-1] < 2:
        raise ValueError(f"probs must be [K] or [B, K] with K >= 2, got shape {p.shape}")
    if not np.isfinite(p.sum()):  # NaN and ±inf survive the sum; one reduction per frame
        raise ValueError("probs contain NaN or inf")
    if p.ndim == 1:
        return _certify_one(p, calibration)
    if len(p) <= _SMALL_BATCH:  # a runtime micro-batch: floats beat array set-up below ~16 rows
        rows = [_certify_one(row, calibration) for row in p]
        return CertificateBatch(
            top_class=np.array([c.top_class for c in rows], dtype=np.int64),
            abstain=np.array([c.abstain for c in rows], dtype=bool),
            radius=np.array([c.radius for c in rows], dtype=np.float64),
            score=np.array([c.score for c in rows], dtype=np.float64),
            p_lower=np.array([c.p_lower for c in rows], dtype=np.float64),
        )
    batch = p
    top = np.argmax(batch, axis=1)
    s = batch[np.arange(len(batch)), top]
    capped = np.minimum(s, calibration.p_cap)
    with np.errstate(invalid="ignore"):
        t = apply_score_map(transform(capped, calibration.score), calibration.score_map)
        t_lower = t - calibration.quantiles_for(s)
        p_lower = np.minimum(inverse_transform(t_lower, calibration.score), calibration.p_cap)
    p_lower = np.nan_to_num(p_lower, nan=0.0)
    abstain = ~(p_lower > 0.5)
    if calibration.score == "probit":
        # σ·Φ⁻¹(p̃) = σ·min(Φ⁻¹(min(ŝ, p_cap)) − q̂, Φ⁻¹(p_cap)), without a Φ∘Φ⁻¹ round trip.
        z = np.minimum(t_lower, calibration._z_cap)
    else:
        z = np.asarray(norm_ppf(p_lower))
    radius = np.where(abstain, 0.0, calibration.sigma * z)
    out = CertificateBatch(
        top_class=top.astype(np.int64),
        abstain=abstain,
        radius=radius.astype(np.float64),
        score=s,
        p_lower=p_lower,
    )
    return out


def _certify_one(p: np.ndarray, calibration: Calibration) -> Certificate:
    """The same rule for one input, in Python floats: the runtime's per-frame path."""
    top = int(np.argmax(p))
    s = float(p[top])
    q = float(calibration.quantiles_for(np.array([s]))[0]) if calibration.bin_edges else calibration.quantile
    capped = min(s, calibration.p_cap)
    if calibration.score == "probit":
        z = min(apply_score_map(norm_ppf(capped), calibration.score_map) - q, calibration._z_cap)
        p_lower = min(norm_cdf(z), calibration.p_cap)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = float(transform(capped, calibration.score)) - q
            p_lower = min(float(inverse_transform(t, calibration.score)), calibration.p_cap)
        p_lower = 0.0 if math.isnan(p_lower) else p_lower
        z = norm_ppf(p_lower)
    abstain = not p_lower > 0.5
    return Certificate(
        top_class=top,
        abstain=abstain,
        radius=0.0 if abstain else calibration.sigma * z,
        score=s,
        p_lower=p_lower,
    )


def conformal_scores(
    top_prob: np.ndarray,
    p_lower_mc: np.ndarray,
    calibration_p_cap: float,
    score: str = "probit",
    score_map: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> np.ndarray:
    """Nonconformity scores e_i = g(T(min(ŝ_i, p_cap))) − T(p̲_i), +∞ where p̲_i = 0 (g: the learned
    score map, identity when None)."""
    s = np.minimum(np.asarray(top_prob, dtype=np.float64), calibration_p_cap)
    lo = np.asarray(p_lower_mc, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = apply_score_map(transform(s, score), score_map) - transform(lo, score)
    return np.where(lo <= 0.0, np.inf, e)


def _rank(m: int, alpha: float) -> int:
    """⌈(m+1)(1−α)⌉ in exact rational arithmetic (α read as the decimal it was written as)."""
    return math.ceil((m + 1) * (1 - Fraction(repr(float(alpha)))))


def mondrian_quantiles(
    scores: np.ndarray,
    top_prob: np.ndarray,
    edges: tuple[float, ...] | list[float],
    alpha: float,
    delta: float | None = None,
) -> tuple[float, ...]:
    """One conformal quantile per confidence bin (Mondrian split conformal).

    Guarantee: if the edges were fixed without looking at the calibration inputs, then for a new
    exchangeable input whose ŝ falls in bin g, P(e ≤ q̂_g) ≥ 1 − α; so also marginally. Each bin
    must hold at least :func:`min_calibration_size` inputs: a ValueError names the bin that does not.
    """
    e = np.asarray(scores, dtype=np.float64)
    which = confidence_bin(np.asarray(top_prob, dtype=np.float64), edges)
    bounds = [0.0, *edges, 1.0]
    out = []
    for g in range(len(edges) + 1):
        in_bin = e[which == g]
        need = min_calibration_size(alpha, delta)
        if len(in_bin) < need:
            raise ValueError(
                f"confidence bin {g} (ŝ in [{bounds[g]:.6g}, {bounds[g + 1]:.6g})) holds {len(in_bin)} "
                f"calibration inputs; alpha={alpha} needs at least {need} per bin: use fewer bins "
                "or more calibration inputs"
            )
        out.append(conformal_quantile(in_bin, alpha, delta))
    return tuple(out)


def conformal_rank(m: int, alpha: float, delta: float | None = None) -> int:
    """The rank k (1-based) of the order statistic that serves as q̂ among m scores.

    ``delta=None``: ⌈(m+1)(1−α)⌉, the split-conformal rank (marginal: P(e ≤ q̂) ≥ 1 − α).
    ``delta`` given: the smallest k with P(Binomial(m, 1−α) ≥ k) ≤ δ, the training-conditional (PAC)
    rank: with probability ≥ 1 − δ over the calibration draw, P(e ≤ q̂ | calibration) ≥ 1 − α.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if delta is None:
        return _rank(m, alpha)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    from scipy.stats import binom  # lazy: only the PAC rank needs it

    return int(binom.ppf(1.0 - delta, m, 1.0 - alpha)) + 1


def min_calibration_size(alpha: float, delta: float | None = None) -> int:
    """Smallest m whose conformal rank is at most m: the fewest calibration inputs that give q̂."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    m = max(1, math.floor((1.0 - alpha) / alpha) - 1)
    while conformal_rank(m, alpha, delta) > m:
        m += 1 if delta is None else max(1, m // 50)
    if delta is not None:  # step back to the exact smallest m
        while m > 1 and conformal_rank(m - 1, alpha, delta) <= m - 1:
            m -= 1
    return m


def conformal_quantile(scores: np.ndarray, alpha: float, delta: float | None = None) -> float:
    """q̂: the k-th smallest of m scores, k = :func:`conformal_rank` (m, α, δ).

    Guarantee (δ = None): for a new exchangeable score e, P(e ≤ q̂) ≥ 1 − α. With δ: with
    probability ≥ 1 − δ over the calibration scores, P(e ≤ q̂ | calibration) ≥ 1 − α. Raises
    ValueError naming the smallest m that works when k > m.
    """
    e = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    m = len(e)
    k = conformal_rank(m, alpha, delta)
    if k > m:
        what = f"alpha={alpha}" + ("" if delta is None else f", delta={delta}")
        raise ValueError(
            f"{m} calibration inputs are too few for {what}: "
            f"need at least m={min_calibration_size(alpha, delta)}"
        )
    return float(e[k - 1])
