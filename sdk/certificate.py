"""The deployment rule: surrogate probabilities + a conformal calibration → a certified radius.

This module is the single place where a radius is computed from a surrogate's output. The runtime,
the export checks and the evaluation all call :func:`certify_from_probs`. Calibration itself (the
quantile) lives in :mod:`rrise.calibration`; the score it shares with this rule in :mod:`rrise.scores`.

Guarantee (docs/CERTIFICATE.md): if the calibration inputs and the deployed input are exchangeable, then with
probability at least ``1 − alpha − beta`` over calibration, input and noise, either the certificate
abstains or the smoothed classifier ``g`` predicts ``top_class`` and is constant on the ℓ2 ball of
radius ``radius`` around the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .calibration import Calibration
from .numerics import MICRO_BATCH_LIMIT
from .scores import apply_score_map, apply_score_scale, inverse_transform, transform
from .stats import norm_cdf, norm_ppf

__all__ = ["Calibration", "Certificate", "CertificateBatch", "certify_from_probs"]


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


def certify_from_probs(probs: np.ndarray, calibration: Calibration) -> Certificate | CertificateBatch:
    """Certify from surrogate probabilities ``probs`` (``[K]`` → Certificate, ``[B, K]`` → batch).

    Rule: Â = argmax s; p̃ = min(T⁻¹(T(min(s[Â], p_cap)) − q̂), p_cap). If p̃ > 1/2, predict Â with
    radius σ·Φ⁻¹(p̃); otherwise abstain with radius 0. With confidence bins, q̂ is the quantile of
    the bin that s[Â] falls in (Mondrian calibration: the guarantee then also holds within each bin).
    With a learned score map g and scale u (probit only), with z = Φ⁻¹(min(s[Â], p_cap)):
    Φ⁻¹(p̃) = min(g(z) − q̂·u(z), Φ⁻¹(p_cap)), the inverse of the calibration score (g(z) − Φ⁻¹(p̲))/u(z),
    so the same argument holds.

    Guarantee: with probability ≥ 1 − α − β over calibration, input and noise (calibration and
    deployed inputs exchangeable), the certificate abstains or the smoothed classifier predicts Â
    and is constant on the ℓ2 ball of the returned radius. Not a per-input guarantee.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[-1] < 2:
        raise ValueError(f"probs must be [K] or [B, K] with K >= 2, got shape {p.shape}")
    if not math.isfinite(p.sum()):  # NaN and ±inf survive the sum; one reduction per frame
        raise ValueError("probs contain NaN or inf")
    if p.ndim == 1:
        return _certify_one(p, calibration)
    if len(p) <= MICRO_BATCH_LIMIT:  # a runtime micro-batch: floats beat array set-up below ~16 rows
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
        z0 = transform(capped, calibration.score)
        t = apply_score_map(z0, calibration.score_map)
        shift = calibration.quantiles_for(s)
        if calibration.score_scale is not None:
            shift = shift * apply_score_scale(z0, calibration.score_scale)
        t_lower = t - shift
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
    top = int(p.argmax())
    s = float(p[top])
    q = float(calibration.quantiles_for(np.array([s]))[0]) if calibration.bin_edges else calibration.quantile
    capped = min(s, calibration.p_cap)
    if calibration.score == "probit":
        z0 = norm_ppf(capped)
        u = apply_score_scale(z0, calibration.score_scale)
        z = min(apply_score_map(z0, calibration.score_map) - q * u, calibration._z_cap)
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
