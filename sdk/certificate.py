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
    """One input's certified prediction, as :func:`certify_from_probs` gives it.

    Guarantee: if the calibration inputs and this input are exchangeable, then with probability at
    least 1 − α − β over calibration, input and noise, either the certificate abstains or the
    smoothed classifier predicts ``top_class`` and is constant on the ℓ2 ball of radius ``radius``
    (in [0,1]-pixel units of the model input). Marginal over inputs, not per input.

    Parameters
    ----------
    top_class : int
        Â, the surrogate's most probable class.
    abstain : bool
        Whether the certificate abstains; then ``pred`` is None and ``radius`` is 0.0.
    radius : float
        The certified ℓ2 radius σ·Φ⁻¹(p̃) (0.0 when abstaining).
    score : float
        ŝ, the surrogate's top-class probability.
    p_lower : float
        p̃, the calibrated lower bound on the smoothed classifier's probability of Â.

    Examples
    --------
    >>> cert = Certificate(top_class=3, abstain=False, radius=0.5, score=0.97, p_lower=0.95)
    >>> cert.pred
    3
    >>> Certificate(top_class=3, abstain=True, radius=0.0, score=0.5, p_lower=0.3).pred is None
    True
    """

    top_class: int
    abstain: bool
    radius: float
    score: float
    p_lower: float

    @property
    def pred(self) -> int | None:
        """The predicted class, or None when abstaining."""
        return None if self.abstain else self.top_class


@dataclass(frozen=True)
class CertificateBatch:
    """Certificates for a batch, as arrays (one row per input); ``pred`` is -1 where a row abstains.

    Every row carries the guarantee of :class:`Certificate`: with probability at least 1 − α − β
    over calibration, input and noise, the row abstains or the smoothed classifier predicts its
    ``top_class`` and is constant on the ℓ2 ball of its ``radius``.

    Parameters
    ----------
    top_class : numpy.ndarray
        int64 [B], Â per input.
    abstain : numpy.ndarray
        bool [B].
    radius : numpy.ndarray
        float64 [B], 0.0 where abstaining.
    score : numpy.ndarray
        float64 [B], ŝ per input.
    p_lower : numpy.ndarray
        float64 [B], p̃ per input.

    Examples
    --------
    >>> batch = CertificateBatch(
    ...     top_class=np.array([2, 0]), abstain=np.array([False, True]), radius=np.array([0.3, 0.0]),
    ...     score=np.array([0.9, 0.5]), p_lower=np.array([0.88, 0.4]))
    >>> batch.pred.tolist(), len(batch), batch[0].radius
    ([2, -1], 2, 0.3)
    """

    top_class: np.ndarray
    abstain: np.ndarray
    radius: np.ndarray
    score: np.ndarray
    p_lower: np.ndarray

    @property
    def pred(self) -> np.ndarray:
        """The predicted class per input, -1 where it abstains."""
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
    """Certify from surrogate probabilities: the one deployment rule.

    Rule: Â = argmax s; p̃ = min(T⁻¹(T(min(s[Â], p_cap)) − q̂), p_cap). If p̃ > 1/2, predict Â with
    radius σ·Φ⁻¹(p̃); otherwise abstain with radius 0. With confidence bins, q̂ is the quantile of
    the bin that s[Â] falls in (Mondrian calibration: the guarantee then also holds within each bin).
    With a learned score map g and scale u (probit only), with z = Φ⁻¹(min(s[Â], p_cap)):
    Φ⁻¹(p̃) = min(g(z) − q̂·u(z), Φ⁻¹(p_cap)), the inverse of the calibration score (g(z) − Φ⁻¹(p̲))/u(z),
    so the same argument holds.

    Guarantee: with probability ≥ 1 − α − β over calibration, input and noise (calibration and
    deployed inputs exchangeable), the certificate abstains or the smoothed classifier predicts Â
    and is constant on the ℓ2 ball of the returned radius. Not a per-input guarantee.

    Parameters
    ----------
    probs : numpy.ndarray
        The surrogate's probabilities, ``[K]`` for one input or ``[B, K]`` for a batch, from the
        numerics ``calibration`` holds for (the bundle variant's own quantile).
    calibration : Calibration
        The conformal calibration (:func:`rrise.conformalize`, or ``Bundle.calibration(variant)``).

    Returns
    -------
    Certificate or CertificateBatch
        A :class:`Certificate` for ``[K]``, a :class:`CertificateBatch` for ``[B, K]``.

    Raises
    ------
    ValueError
        When ``probs`` is not ``[K]`` or ``[B, K]`` with K ≥ 2, or holds NaN or infinity.

    Examples
    --------
    >>> from rrise import Calibration
    >>> cal = Calibration(sigma=0.25, quantile=0.4, alpha=0.01, beta=0.001, n_mc=10_000, m=3000)
    >>> cert = certify_from_probs(np.array([0.9, 0.1]), cal)
    >>> cert.pred, round(cert.radius, 4), round(cert.p_lower, 4)
    (0, 0.2204, 0.811)
    >>> certify_from_probs(np.array([0.55, 0.45]), cal).abstain  # p̃ ≤ 1/2
    True
    >>> certify_from_probs(np.array([[0.9, 0.1], [0.55, 0.45]]), cal).pred.tolist()
    [0, -1]
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[-1] < 2:
        raise ValueError(f"probs must be [K] or [B, K] with K >= 2, got shape {p.shape}")
    if not math.isfinite(p.sum()):  # NaN and ±inf survive the sum; one reduction per frame
        raise ValueError("probs contain NaN or inf")
    if p.ndim == 1:
        return _certify_one(p, calibration)
    if len(p) <= MICRO_BATCH_LIMIT:  # a runtime micro-batch: floats beat array set-up below ~16 rows
        return _stack([_certify_one(row, calibration) for row in p])
    return _certify_batch(p, calibration)


def _stack(rows: list[Certificate]) -> CertificateBatch:
    return CertificateBatch(
        top_class=np.array([c.top_class for c in rows], dtype=np.int64),
        abstain=np.array([c.abstain for c in rows], dtype=bool),
        radius=np.array([c.radius for c in rows], dtype=np.float64),
        score=np.array([c.score for c in rows], dtype=np.float64),
        p_lower=np.array([c.p_lower for c in rows], dtype=np.float64),
    )


def _certify_batch(batch: np.ndarray, calibration: Calibration) -> CertificateBatch:
    """The same rule on a large batch ``[B, K]``, vectorized."""
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
