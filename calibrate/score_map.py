"""A learned monotone score map and a positive score scale on the probit scale, fitted on a selection split.

The plain probit score ``e = Φ⁻¹(min(ŝ, p_cap)) − Φ⁻¹(p̲)`` gives one shift q̂ for every input, so a
tail of over-confident inputs in one range of ŝ shrinks the radii of all the others. The map ``g``
below is a low quantile (level ``tau``) of ``Φ⁻¹(p̲)`` given ``z = Φ⁻¹(min(ŝ, p_cap))``: with the score
``g(z) − Φ⁻¹(p̲)``, the conformal q̂ only corrects what ``g`` got wrong, wherever in ŝ that is
(the conformalized-quantile-regression idea with ŝ as the only feature).

The scale ``u`` normalizes the score: ``(g(z) − Φ⁻¹(p̲)) / u(z)`` with ``u`` the typical size of the
residual near ``z``. One pooled q̂ then shrinks each radius by ``q̂·u(z)``: little where the
surrogate and the Monte Carlo agree closely, more where they do not (locally weighted conformal).

Guarantee: any ``g`` fixed before the calibration inputs are seen keeps split conformal's guarantee
(rrise.calibration.conformalize); fit it on a selection split, never on the
calibration split.
"""

from __future__ import annotations

import numpy as np

from rrise.calibration import mc_lower_bounds
from rrise.scores import apply_score_map, p_cap
from rrise.stats import norm_ppf

__all__ = ["fit_score_map", "fit_score_scale", "isotonic_increasing"]

# Φ⁻¹(p̲) for p̲ = 0 (no votes) is −∞: such inputs pull the low quantile down to this floor instead.
_FLOOR = -4.0


def isotonic_increasing(y: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The weighted least-squares non-decreasing fit to ``y`` (pool adjacent violators)."""
    values: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for v, wt in zip(np.asarray(y, dtype=np.float64), np.asarray(weight, dtype=np.float64)):
        values.append(float(v))
        weights.append(float(wt))
        sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            w2 = weights[-2] + weights[-1]
            merged = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w2
            size = sizes[-2] + sizes[-1]
            del values[-1], weights[-1], sizes[-1]
            values[-1], weights[-1], sizes[-1] = merged, w2, size
    return np.repeat(values, sizes)


def fit_score_map(
    probs: np.ndarray,
    counts: np.ndarray,
    *,
    n_mc: int,
    beta: float,
    tau: float = 0.1,
    group_size: int | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Knots ``(x, y)`` of ``g``: the ``tau``-quantile of ``Φ⁻¹(p̲)`` given ``z = Φ⁻¹(min(ŝ, p_cap))``.

    ``probs`` [n, K] are the surrogate's probabilities on SELECTION inputs and ``counts`` [n, K] fresh
    MC counts with ``n_mc`` draws each (the same N and β as calibration). Inputs are sorted by ``z``
    and cut into groups of ``group_size`` (default: enough for about 5 points below the quantile);
    each group gives a knot at its mean ``z`` and its ``tau``-quantile of ``Φ⁻¹(p̲)``; the knots are
    made non-decreasing (isotonic regression) and groups that share a ``z`` are merged.
    """
    p = np.asarray(probs, dtype=np.float64)
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    k = np.asarray(counts)
    if p.ndim != 2 or k.shape != p.shape:
        raise ValueError(f"probs and counts must both be [n, K], got {p.shape} and {k.shape}")
    size = int(group_size or max(20, int(np.ceil(5.0 / tau))))
    z, w, cuts = _grouped(p, k, n_mc, beta, size, "score map")
    x = np.array([z[a:b].mean() for a, b in zip(cuts, cuts[1:])])
    y = np.array([np.quantile(w[a:b], tau, method="inverted_cdf") for a, b in zip(cuts, cuts[1:])])
    n = np.diff(cuts).astype(np.float64)
    y = isotonic_increasing(y, n)
    keep = np.concatenate([[True], np.diff(x) > 1e-12])
    return tuple(float(v) for v in x[keep]), tuple(float(v) for v in y[keep])


def fit_score_scale(
    probs: np.ndarray,
    counts: np.ndarray,
    *,
    n_mc: int,
    beta: float,
    score_map: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    groups: int = 8,
    min_group_size: int = 20,
    floor_fraction: float = 0.3,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Knots ``(x, u)`` of a positive scale: the mean absolute residual ``|g(z) − Φ⁻¹(p̲)|`` given
    ``z = Φ⁻¹(min(ŝ, p_cap))``, on SELECTION inputs (``probs``, ``counts`` as in
    :func:`fit_score_map`; ``score_map`` g, identity when None).

    Inputs are cut along ``z`` into at most ``groups`` groups of at least ``min_group_size`` (a
    scale of a few parameters: it must not chase noise); each gives a knot at its mean ``z``.
    Every knot is at least ``floor_fraction`` of the largest (and positive), so that no input's
    score is blown up by a group that happened to fit well. Only the shape of ``u`` matters: the
    conformal q̂ sets its size.
    """
    p, k = np.asarray(probs, dtype=np.float64), np.asarray(counts)
    if p.ndim != 2 or k.shape != p.shape:
        raise ValueError(f"probs and counts must both be [n, K], got {p.shape} and {k.shape}")
    if not 0.0 < floor_fraction <= 1.0:
        raise ValueError(f"floor_fraction must be in (0, 1], got {floor_fraction}")
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    size = max(int(min_group_size), -(-len(p) // int(groups)))
    z, w, cuts = _grouped(p, k, n_mc, beta, size, "score scale")
    r = np.abs(np.asarray(apply_score_map(z, score_map), dtype=np.float64) - w)
    x = np.array([z[a:b].mean() for a, b in zip(cuts, cuts[1:])])
    u = np.array([r[a:b].mean() for a, b in zip(cuts, cuts[1:])])
    u = np.maximum(u, max(floor_fraction * float(u.max()), 1e-3))
    keep = np.concatenate([[True], np.diff(x) > 1e-12])
    return tuple(float(v) for v in x[keep]), tuple(float(v) for v in u[keep])


def _grouped(p: np.ndarray, k: np.ndarray, n_mc: int, beta: float, size: int, what: str):
    """``z = Φ⁻¹(min(ŝ, p_cap))`` and ``w = Φ⁻¹(p̲)`` (floored at −4) sorted by ``z``, and the cuts of
    groups of about ``size`` inputs that never split a run of equal ``z`` (inputs at the cap)."""
    if len(p) < 2 * size:
        raise ValueError(f"{len(p)} selection inputs are too few for a {what} with groups of {size}")
    top = p.argmax(axis=1)
    cap = p_cap(beta, n_mc)
    z = np.asarray(norm_ppf(np.minimum(p[np.arange(len(p)), top], cap)), dtype=np.float64)
    low = mc_lower_bounds(k, top, n_mc, beta)
    with np.errstate(divide="ignore"):
        w = np.where(low > 0, np.asarray(norm_ppf(np.clip(low, 1e-300, 1.0)), dtype=np.float64), _FLOOR)
    w = np.maximum(w, _FLOOR)
    order = np.argsort(z, kind="stable")
    z, w = z[order], w[order]
    cuts = [0]
    while cuts[-1] < len(z):
        nxt = min(cuts[-1] + size, len(z))
        while nxt < len(z) and z[nxt] == z[nxt - 1]:
            nxt += 1
        if len(z) - nxt < size // 2:  # fold a short remainder into the last group
            nxt = len(z)
        cuts.append(nxt)
    return z, w, cuts
