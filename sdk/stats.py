"""Scalar statistics the certificate needs, with numpy alone at import.

``norm_ppf`` is Wichura's AS241 (relative error below 1e-15 on (0, 1)); ``norm_cdf`` uses the C
library's ``erfc``. The Clopper–Pearson bounds need the Beta quantile and import scipy lazily, so
``import rrise`` stays free of scipy.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = [
    "norm_ppf",
    "norm_cdf",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "binom_test_two_sided",
]

# AS241 PPND16 coefficients.
_A = (
    3.387132872796366608,
    133.14166789178437745,
    1971.5909503065514427,
    13731.693765509461125,
    45921.953931549871457,
    67265.770927008700853,
    33430.575583588128105,
    2509.0809287301226727,
)
_B = (
    1.0,
    42.313330701600911252,
    687.1870074920579083,
    5394.1960214247511077,
    21213.794301586595867,
    39307.89580009271061,
    28729.085735721942674,
    5226.495278852545925,
)
_C = (
    1.42343711074968357734,
    4.6303378461565452959,
    5.7694972214606914055,
    3.64784832476320460504,
    1.27045825245236838258,
    0.24178072517745061177,
    0.0227238449892691845833,
    7.7454501427834140764e-4,
)
_D = (
    1.0,
    2.05319162663775882187,
    1.6763848301838038494,
    0.68976733498510000455,
    0.14810397642748007459,
    0.0151986665636164571966,
    5.475938084995344946e-4,
    1.05075007164441684324e-9,
)
_E = (
    6.6579046435011037772,
    5.4637849111641143699,
    1.7848265399172913358,
    0.29656057182850489123,
    0.026532189526576123093,
    0.0012426609473880784386,
    2.71155556874348757815e-5,
    2.01033439929228813265e-7,
)
_F = (
    1.0,
    0.59983220655588793769,
    0.13692988092273580531,
    0.0148753612908506148525,
    7.868691311456132591e-4,
    1.8463183175100546818e-5,
    1.4215117583164458887e-7,
    2.04426310338993978564e-15,
)


def _poly(coefs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    out = np.full_like(x, coefs[-1])
    for c in reversed(coefs[:-1]):
        out = out * x + c
    return out


_STD_NORMAL = NormalDist()


def norm_ppf(p: np.ndarray | float) -> np.ndarray | float:
    """Standard normal quantile Φ⁻¹(p); -inf at 0, +inf at 1, nan outside [0, 1]."""
    if isinstance(p, float):  # the per-frame path: the standard library's AS241, no array set-up
        if 0.0 < p < 1.0:
            return _STD_NORMAL.inv_cdf(p)
        return -math.inf if p == 0.0 else math.inf if p == 1.0 else math.nan
    scalar = np.ndim(p) == 0
    p = np.asarray(p, dtype=np.float64)
    q = p - 0.5
    out = np.empty_like(q)
    central = np.abs(q) <= 0.425
    if central.any():
        qc = q[central]
        r = 0.180625 - qc * qc
        out[central] = qc * _poly(_A, r) / _poly(_B, r)
    tail = ~central
    if tail.any():
        qt = q[tail]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(qt < 0, p[tail], 1.0 - p[tail])
            r = np.sqrt(-np.log(r))
            near = r <= 5.0
            val = np.where(
                near,
                _poly(_C, r - 1.6) / _poly(_D, r - 1.6),
                _poly(_E, r - 5.0) / _poly(_F, r - 5.0),
            )
        out[tail] = np.where(qt < 0, -val, val)
    out[p == 0.0] = -np.inf
    out[p == 1.0] = np.inf
    out[(p < 0.0) | (p > 1.0) | np.isnan(p)] = np.nan
    return float(out) if scalar else out


_erfc = np.frompyfunc(math.erfc, 1, 1)


def norm_cdf(x: np.ndarray | float) -> np.ndarray | float:
    """Standard normal CDF Φ(x) = erfc(-x/√2)/2, accurate in both tails."""
    if isinstance(x, float):
        return 0.5 * math.erfc(-x / math.sqrt(2.0))
    scalar = np.ndim(x) == 0
    x = np.asarray(x, dtype=np.float64)
    out = 0.5 * _erfc(-x / math.sqrt(2.0)).astype(np.float64)
    return float(out) if scalar else out


def clopper_pearson_lower(k: np.ndarray | int, n: np.ndarray | int, alpha: float):
    """One-sided (1−α) Clopper–Pearson lower bound on a binomial proportion.

    Guarantee: for K ~ Binomial(n, p), P(clopper_pearson_lower(K, n, α) ≤ p) ≥ 1 − α.
    Equals BetaQuantile(α; k, n−k+1), and 0 when k = 0.
    """
    from scipy.stats import beta  # lazy: keeps `import rrise` free of scipy

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    _check_counts(k, n, alpha)
    with np.errstate(invalid="ignore"):
        out = beta.ppf(alpha, np.maximum(k, 1.0), n - k + 1.0)
    out = np.where(k == 0, 0.0, out)
    return float(out) if out.ndim == 0 else out


def clopper_pearson_upper(k: np.ndarray | int, n: np.ndarray | int, alpha: float):
    """One-sided (1−α) Clopper–Pearson upper bound: BetaQuantile(1−α; k+1, n−k), 1 when k = n."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    _check_counts(k, n, alpha)
    with np.errstate(invalid="ignore"):
        out = beta.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1.0))
    out = np.where(k == n, 1.0, out)
    return float(out) if out.ndim == 0 else out


def binom_test_two_sided(k: np.ndarray | int, n: np.ndarray | int, p: float = 0.5):
    """Exact two-sided binomial test p-value of ``k`` successes in ``n`` trials (scipy's rule)."""
    from scipy.stats import binomtest

    k_arr = np.atleast_1d(np.asarray(k, dtype=np.int64))
    n_arr = np.broadcast_to(np.asarray(n, dtype=np.int64), k_arr.shape)
    out = np.array([binomtest(int(a), int(b), p).pvalue if b > 0 else 1.0 for a, b in zip(k_arr, n_arr)])
    return float(out[0]) if np.ndim(k) == 0 else out


def _check_counts(k: np.ndarray, n: np.ndarray, alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("counts must satisfy 0 <= k <= n")
