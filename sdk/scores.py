"""The conformal score: a monotone transform T of probabilities, an optional learned map g and
positive scale u on the probit scale, and confidence bins. Pure functions shared by calibration
(sdk/calibration.py) and the deployment rule (sdk/certificate.py), so that both compute exactly the
same score.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from .stats import norm_cdf, norm_ppf

__all__ = [
    "TRANSFORMS",
    "apply_score_map",
    "apply_score_scale",
    "confidence_bin",
    "conformal_scores",
    "inverse_transform",
    "p_cap",
    "transform",
]

TRANSFORMS = ("probit", "logit", "identity")
ScoreMap = tuple[tuple[float, ...], tuple[float, ...]]


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


def apply_score_map(z: np.ndarray | float, score_map: ScoreMap | None):
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


def apply_score_scale(z: np.ndarray | float, score_scale: ScoreMap | None):
    """u(z): the learned positive scale, piecewise linear through its knots; 1 when None."""
    if score_scale is None:
        return 1.0 if isinstance(z, float) else np.ones_like(np.asarray(z, dtype=np.float64))
    return apply_score_map(z, score_scale)


def confidence_bin(top_prob: np.ndarray, edges: tuple[float, ...] | list[float]) -> np.ndarray:
    """Bin index of each ŝ: 0 below the first edge, ``len(edges)`` at or above the last."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), top_prob, side="right")


def conformal_scores(
    top_prob: np.ndarray,
    p_lower_mc: np.ndarray,
    calibration_p_cap: float,
    score: str = "probit",
    score_map: ScoreMap | None = None,
    score_scale: ScoreMap | None = None,
    clip_at_abstention: bool = False,
) -> np.ndarray:
    """Nonconformity scores e_i = (g(z_i) − T(p̲_i)) / u(z_i) with z_i = T(min(ŝ_i, p_cap)), +∞ where
    p̲_i = 0 (g: the learned score map, identity when None; u: the learned positive scale, 1 when
    None). The deployment rule inverts exactly this: T(p̃) = g(z) − q̂·u(z).

    ``clip_at_abstention``: each score clipped at its input's abstention threshold,
    e'_i = min(e_i, a_i) with a_i = (g(z_i) − T(½)) / u(z_i). The rule certifies an input only when
    q̂ < a (else T(p̃) ≤ T(½): it abstains), and a certified input with e > q̂ has e' > q̂ too, so the
    event the guarantee bounds (certified, and p̲ < p̃) implies e' > q̂, which split conformal bounds
    by α. Since e' ≤ e, the quantile can only fall: inputs the rule would abstain on anyway (a
    confident surrogate that disagrees with the smoothed classifier) no longer widen every margin."""
    s = np.minimum(np.asarray(top_prob, dtype=np.float64), calibration_p_cap)
    lo = np.asarray(p_lower_mc, dtype=np.float64)
    z = transform(s, score)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = apply_score_map(z, score_map)
        u = 1.0 if score_scale is None else apply_score_scale(z, score_scale)
        e = np.where(lo <= 0.0, np.inf, (g - transform(lo, score)) / u)
        if clip_at_abstention:
            e = np.minimum(e, (g - transform(0.5, score)) / u)
    return e
