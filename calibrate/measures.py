"""What the report measures: certified accuracy curves, ACR, abstain rates, violation rates against a
high-budget reference and their detection limit. Numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rrise.stats import clopper_pearson_lower, clopper_pearson_upper, norm_ppf

__all__ = [
    "DEFAULT_RADII",
    "average_certified_radius",
    "certified_accuracy",
    "detection_limit",
    "method_metrics",
    "pseudo_count_certify",
    "reference_violations",
    "violation_stats",
]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def certified_accuracy(
    radius: np.ndarray, pred: np.ndarray, labels: np.ndarray, radii: tuple[float, ...] | np.ndarray
) -> np.ndarray:
    """Fraction of inputs predicted correctly (not abstaining, ``pred >= 0``) with radius ≥ r, per r."""
    radius, pred, labels = np.asarray(radius), np.asarray(pred), np.asarray(labels)
    ok = (pred >= 0) & (pred == labels)
    return np.array([np.mean(ok & (radius >= r)) for r in radii], dtype=np.float64)


def average_certified_radius(radius: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> float:
    """ACR: mean radius over all inputs, counting 0 for wrong or abstained ones."""
    radius, pred, labels = np.asarray(radius), np.asarray(pred), np.asarray(labels)
    ok = (pred >= 0) & (pred == labels)
    return float(np.mean(np.where(ok, radius, 0.0)))


def method_metrics(
    radius: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray,
    *,
    radii: tuple[float, ...] = DEFAULT_RADII,
    per_query_s: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The numbers the report keeps for one certification method."""
    pred = np.asarray(pred)
    return {
        "n": int(len(pred)),
        "certified_accuracy": [round(float(v), 6) for v in certified_accuracy(radius, pred, labels, radii)],
        "acr": round(average_certified_radius(radius, pred, labels), 6),
        "abstain_rate": round(float(np.mean(pred < 0)), 6),
        "per_query_s": per_query_s,
        **extra,
    }


def pseudo_count_certify(
    probs: np.ndarray, n: int, sigma: float, alpha: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Accelerated Smoothing radius (arXiv 2402.07498): Clopper–Pearson on pseudo-counts ⌊n·ŝ⌋.

    No calibration and NO guarantee: the surrogate's ŝ is treated as if it were an MC frequency.
    Returns ``(pred with -1 = abstain, radius, p_lower)``.
    """
    p = np.asarray(probs, dtype=np.float64)
    top = p.argmax(1)
    k = np.floor(n * p[np.arange(len(p)), top]).astype(np.int64)
    p_low = np.atleast_1d(clopper_pearson_lower(k, n, alpha))
    certified = p_low > 0.5
    radius = np.where(certified, sigma * np.asarray(norm_ppf(np.where(certified, p_low, 0.5))), 0.0)
    return np.where(certified, top, -1), radius, p_low


def reference_violations(
    classes: np.ndarray, certified: np.ndarray, p_lower: np.ndarray, ref_counts: np.ndarray, *, level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input: the reference count ``k`` of ``classes``, its one-sided (1 − ``level``)
    Clopper–Pearson upper bound, and whether a certified ``p_lower`` lies above that bound."""
    ref = np.asarray(ref_counts)
    n_ref = int(ref[0].sum()) if len(ref) else 0
    k = ref[np.arange(len(ref)), np.asarray(classes)]
    upper = np.atleast_1d(clopper_pearson_upper(k, n_ref, level))
    return k, upper, np.asarray(certified) & (np.asarray(p_lower) > upper)


def detection_limit(p: np.ndarray | float, n_ref: int, level: float) -> np.ndarray:
    """The smallest excess ``d`` of a claimed ``p`` over the truth ``p − d`` that a reference of
    ``n_ref`` draws flags at least half the time with the one-sided (1 − ``level``) upper-bound test.

    The test flags ``p`` when ``clopper_pearson_upper(k, n_ref, level) < p``, i.e. when
    ``k ≤ k*(p)``; a truth ``t`` puts the median of ``k`` at about ``n_ref·t``, so ``d = p − k*/n_ref``
    (``p`` itself when no count can flag it). Smaller excesses go unseen more often than not.
    """
    p = np.atleast_1d(np.asarray(p, dtype=np.float64))
    upper = np.atleast_1d(clopper_pearson_upper(np.arange(n_ref + 1), n_ref, level))  # increasing in k
    k_star = np.searchsorted(upper, p, side="left") - 1  # largest k whose upper bound is below p
    return np.where(k_star >= 0, p - np.maximum(k_star, 0) / n_ref, p)


def _rate(v: int, n: int) -> dict[str, Any]:
    """A count out of ``n`` with its rate and two-sided 95% Clopper–Pearson interval."""
    lo = float(clopper_pearson_lower(v, n, 0.025)) if n else 0.0
    hi = float(clopper_pearson_upper(v, n, 0.025)) if n else 1.0
    return {"count": v, "of": n, "rate": round(v / n, 6) if n else 0.0, "ci95": [round(lo, 6), round(hi, 6)]}


def violation_stats(
    pred: np.ndarray, p_lower: np.ndarray, ref_counts: np.ndarray, *, level: float = 0.001
) -> dict[str, Any]:
    """How often a certified ``p_lower`` exceeds what a high-budget reference MC run supports.

    Two tests against the reference counts ``[B, K]`` (independent draws):

    * ``violations`` (kept for comparison with older reports): certified ``p_lower`` above the
      one-sided (1 − ``level``) Clopper–Pearson upper bound of ``p_Â``; it misses excesses below the
      ``detection_limit`` and so undercounts.
    * ``above_point_estimate``: certified ``p_lower`` above the reference frequency ``k/N_ref``,
      divided by ALL inputs (the guarantee bounds P(certified and wrong) ≤ α + β over all inputs). A
      true violation is counted with probability about 1/2 or more; a sound ``p_lower`` within a
      standard error of the truth is sometimes counted too, so this rate errs towards alarm.

    ``rate`` and ``ci95`` (95% Clopper–Pearson) of the first test are among certified inputs.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref_counts)
    n_ref = int(ref[0].sum()) if len(ref) else 0
    cert = pred >= 0
    k, _, violation = reference_violations(np.where(cert, pred, 0), cert, p_lower, ref, level=level)
    v, c = int(violation.sum()), int(cert.sum())
    above = cert & (np.asarray(p_lower) > k / max(n_ref, 1))
    cert_p = np.asarray(p_lower)[cert]
    limit = detection_limit(cert_p, n_ref, level) if c and n_ref else np.zeros(0)
    upper_test = _rate(v, c)
    return {
        "violations": v,
        "certified": c,
        "rate": v / c if c else 0.0,
        "ci95": upper_test["ci95"],
        "n_ref": n_ref,
        "level": level,
        "inputs": int(len(pred)),
        "above_point_estimate": _rate(int(above.sum()), int(len(pred))),
        "above_upper_bound_over_all_inputs": _rate(v, int(len(pred))),
        "detection_limit": {
            "median over certified p̃": round(float(np.median(limit)), 6) if len(limit) else None,
            "largest over certified p̃": round(float(np.max(limit)), 6) if len(limit) else None,
        },
    }
