"""Split-conformal calibration of the surrogate's radii (docs/CERTIFICATE.md).

For calibration inputs ``x_1..x_m``: ``Â_i = argmax s(x_i)``, ``ŝ_i = s(x_i)[Â_i]``, and from fresh MC
with ``N_cal`` draws the Clopper–Pearson lower bound ``p̲_i`` on ``p_{Â_i}(x_i)`` at level β. The score
``e_i = T(min(ŝ_i, p_cap)) − T(p̲_i)`` and its conformal quantile ``q̂`` make the deployment rule
:func:`rrise.certify_from_probs` conservative.
"""

from __future__ import annotations

import math

import numpy as np

from rrise.certificate import (
    Calibration,
    conformal_quantile,
    conformal_scores,
    min_calibration_size,
    mondrian_quantiles,
    p_cap,
)
from rrise.stats import clopper_pearson_lower

__all__ = ["calibrate_from_counts", "confidence_bin_edges", "mc_lower_bounds"]


def mc_lower_bounds(counts: np.ndarray, classes: np.ndarray, n_mc: int, beta: float) -> np.ndarray:
    """One-sided (1−β) Clopper–Pearson lower bounds on ``p_{classes[i]}(x_i)`` from ``[m, K]`` counts.

    Guarantee: for each i, if ``counts[i]`` comes from ``n_mc`` fresh draws independent of the choice of
    ``classes[i]``, then ``P(bound_i ≤ p_{classes[i]}(x_i)) ≥ 1 − β``. The bound is 0 when the count is 0.
    """
    c = np.asarray(counts)
    cls = np.asarray(classes, dtype=np.int64)
    if c.ndim != 2 or cls.shape != (len(c),):
        raise ValueError(f"counts must be [m, K] and classes [m]; got {c.shape} and {cls.shape}")
    if np.any((cls < 0) | (cls >= c.shape[1])):
        raise ValueError(f"classes must lie in [0, {c.shape[1]})")
    k = c[np.arange(len(c)), cls]
    return np.atleast_1d(np.asarray(clopper_pearson_lower(k, int(n_mc), beta), dtype=np.float64))


def calibrate_from_counts(
    probs: np.ndarray,
    counts: np.ndarray,
    *,
    n_mc: int,
    sigma: float,
    alpha: float,
    beta: float,
    score: str = "probit",
    delta: float | None = None,
    bin_edges: tuple[float, ...] | list[float] = (),
    score_map: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> Calibration:
    """The conformal quantile ``q̂`` of the surrogate's scores on ``m`` calibration inputs.

    ``probs`` ``[m, K]``: the surrogate's probabilities (of the exact numerics that will be deployed);
    ``counts`` ``[m, K]``: fresh MC vote counts of the base classifier, ``n_mc`` draws per row.
    ``q̂`` is the ``⌈(m+1)(1−α)⌉``-th smallest score ``e_i = T(min(ŝ_i, p_cap)) − T(p̲_i)`` with
    ``p_cap = β^(1/n_mc)``; too few inputs raise ValueError naming the smallest m that works.

    Guarantee: if the calibration inputs were not used to train or select the base model, the
    surrogate or ``score``, and they are exchangeable with a deployed input, then with probability at
    least ``1 − α − β`` over calibration, input and noise, :func:`rrise.certify_from_probs` with the
    returned Calibration either abstains or gives ``p̃ ≤ p_Â(x)``, so the smoothed classifier
    predicts ``Â`` and is constant on the ℓ2 ball of radius ``σ·Φ⁻¹(p̃)``. The guarantee is marginal
    over inputs, not per input.

    With ``delta`` (training-conditional, PAC): with probability at least ``1 − δ`` over the
    calibration draw, the calibration obtained is one for which the statement above holds at
    ``1 − α − β`` for every later exchangeable input. It costs a slightly larger ``q̂``.

    With ``bin_edges`` (fixed beforehand, e.g. by :func:`confidence_bin_edges` on a selection split,
    never on these calibration inputs): one quantile per confidence bin of ŝ (Mondrian), so that a
    tail of over-confident inputs in one bin no longer shrinks the radii of every other bin. The
    guarantee then holds within each bin, hence marginally too.

    With ``score_map`` (knots of a monotone map g on the probit scale, fitted on a selection split by
    :func:`rrise.calibrate.score_map.fit_score_map`, never on these inputs): the score is
    ``g(Φ⁻¹(min(ŝ_i, p_cap))) − Φ⁻¹(p̲_i)``; any g fixed beforehand keeps the guarantee, and a g close
    to a low quantile of Φ⁻¹(p̲) given ŝ makes q̂ small wherever the surrogate is well calibrated.
    """
    s = np.asarray(probs, dtype=np.float64)
    c = np.asarray(counts)
    if s.ndim != 2 or c.shape != s.shape:
        raise ValueError(f"probs and counts must both be [m, K]; got {s.shape} and {c.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("probs contain NaN or inf")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {c.dtype}")
    if n_mc < 1:
        raise ValueError(f"n_mc must be >= 1, got {n_mc}")
    if np.any(c < 0):
        raise ValueError("counts must be non-negative")
    wrong = np.flatnonzero(c.sum(axis=1) != n_mc)
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(
            f"counts row {i} sums to {int(c[i].sum())}, not n_mc={n_mc} ({wrong.size} such row(s))"
        )
    top = np.argmax(s, axis=1)
    top_prob = s[np.arange(len(s)), top]
    p_low = mc_lower_bounds(c, top, n_mc, beta)
    cap = p_cap(beta, n_mc)
    scores = conformal_scores(top_prob, p_low, cap, score, score_map)
    quantile = conformal_quantile(scores, alpha, delta)
    bin_quantiles = mondrian_quantiles(scores, top_prob, bin_edges, alpha, delta) if len(bin_edges) else ()
    return Calibration(
        sigma=float(sigma),
        quantile=quantile,
        alpha=float(alpha),
        beta=float(beta),
        n_mc=int(n_mc),
        m=len(s),
        score=score,
        delta=delta,
        bin_edges=tuple(bin_edges),
        bin_quantiles=bin_quantiles,
        score_map_x=() if score_map is None else tuple(score_map[0]),
        score_map_y=() if score_map is None else tuple(score_map[1]),
    )


def confidence_bin_edges(
    selection_top_prob: np.ndarray, m: int, alpha: float, *, max_bins: int = 4, delta: float | None = None
) -> tuple[float, ...]:
    """Inner edges of up to ``max_bins`` equal-mass confidence bins, from a SELECTION split's ŝ.

    The number of bins keeps about 1.5× the minimum calibration size per bin at ``m`` calibration
    inputs. Choose the edges on data disjoint from calibration, or the guarantee is void.
    """
    s = np.asarray(selection_top_prob, dtype=np.float64)
    need = min_calibration_size(alpha, delta)
    bins = int(max(1, min(max_bins, m // math.ceil(1.5 * need))))
    if bins == 1 or len(s) == 0:
        return ()
    edges = np.unique(np.quantile(s, np.arange(1, bins) / bins))
    return tuple(float(e) for e in edges if 0.0 < e <= 1.0)
