"""The normalized score: a positive scale u learned on a selection split divides the residual.

Synthetic problems with known smoothed probabilities: any scale fixed before calibration keeps the
conformal guarantee, and where the size of the surrogate's error follows its own confidence the
normalized score gives the confident inputs larger radii than one global quantile.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from rrise import Calibration, certify_from_probs
from rrise.calibrate.rules import fit_rule, get_rule
from rrise.calibrate.score_map import fit_score_scale
from rrise.calibration import CalibrationSpec, conformalize, mc_lower_bounds
from rrise.manifest_schema import quantile_floor
from rrise.scores import conformal_scores

N_MC, BETA, SIGMA = 2000, 0.001, 0.25


def _draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes; the surrogate's probit error depends on its own confidence: sd 0.6 where
    Φ⁻¹(ŝ) < 1.5 and 0.05 above. Returns probs [size, 2], MC counts with N_MC draws, true p of class 0."""
    z_hat = np.abs(rng.normal(1.8, 0.9, size)) + 0.01
    spread = np.where(z_hat < 1.5, 0.6, 0.05)
    true_p = norm.cdf(z_hat + spread * rng.normal(size=size))
    s_hat = norm.cdf(z_hat)
    probs = np.stack([s_hat, 1 - s_hat], axis=1)
    k0 = rng.binomial(N_MC, true_p)
    return probs, np.stack([k0, N_MC - k0], axis=1).astype(np.int64), true_p


def _violations(cert, true_p: np.ndarray) -> float:
    p_top = np.where(cert.top_class == 0, true_p, 1 - true_p)
    return float(np.mean(~cert.abstain & (cert.p_lower > p_top)))


def test_scale_is_positive_floored_and_larger_where_the_surrogate_errs():
    rng = np.random.default_rng(1)
    probs, counts, _ = _draw(rng, 3000)
    x, u = fit_score_scale(probs, counts, n_mc=N_MC, beta=BETA)
    assert all(b > a for a, b in zip(x, x[1:])) and min(u) >= 0.3 * max(u) - 1e-12 > 0
    # low-confidence inputs carry the large errors; confident ones only Clopper–Pearson's slack
    assert len(x) <= 8 and np.interp(0.8, x, u) > 1.5 * np.interp(x[-1], x, u)
    with pytest.raises(ValueError, match="too few"):
        fit_score_scale(probs[:30], counts[:30], n_mc=N_MC, beta=BETA)
    with pytest.raises(ValueError, match="floor_fraction"):
        fit_score_scale(probs, counts, n_mc=N_MC, beta=BETA, floor_fraction=0.0)


def test_normalized_calibration_keeps_the_guarantee_and_widens_radii():
    """Scale fitted on a selection draw; calibration and test on fresh draws, 20 times."""
    rng = np.random.default_rng(3)
    alpha, m = 0.05, 600
    sel_probs, sel_counts, _ = _draw(rng, 2000)
    scale = fit_score_scale(sel_probs, sel_counts, n_mc=N_MC, beta=BETA)
    kw = dict(n_mc=N_MC, sigma=SIGMA, alpha=alpha, beta=BETA)
    spec = CalibrationSpec(score_scale_x=scale[0], score_scale_y=scale[1], **kw)
    violations, scaled_acr, single_acr = [], [], []
    for _ in range(20):
        cal_probs, cal_counts, _ = _draw(rng, m)
        scaled = conformalize(spec, cal_probs, cal_counts)
        single = conformalize(CalibrationSpec(**kw), cal_probs, cal_counts)
        test_probs, _, test_p = _draw(rng, 4000)
        cert = certify_from_probs(test_probs, scaled)
        violations.append(_violations(cert, test_p))
        scaled_acr.append(cert.radius.mean())
        single_acr.append(certify_from_probs(test_probs, single).radius.mean())
    assert np.mean(violations) <= alpha + BETA + 0.01, np.mean(violations)
    # the check has power: the same scale with a quantile that is too small violates far more
    assert _violations(certify_from_probs(test_probs, scaled.with_quantile(-1.0)), test_p) > alpha + 0.1
    assert np.mean(scaled_acr) > np.mean(single_acr) + 0.02, (np.mean(scaled_acr), np.mean(single_acr))


def test_deployment_inverts_the_calibration_score_exactly():
    """An input whose score equals q̂ gets p̃ = p̲: the rule and the score are one another's inverse."""
    cal = Calibration(
        sigma=0.5, quantile=0.7, alpha=0.01, beta=0.001, n_mc=10_000, m=3000,
        score_map_x=(0.0, 1.0, 2.5, 3.2), score_map_y=(-0.5, 0.4, 1.9, 3.0),
        score_scale_x=(0.5, 2.0, 3.0), score_scale_y=(1.5, 0.6, 0.2),
    )  # fmt: skip
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 4, (64, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    batch = certify_from_probs(probs, cal)
    top = probs.max(axis=1)
    e = conformal_scores(top, batch.p_lower, cal.p_cap, "probit", cal.score_map, cal.score_scale)
    inside = (batch.p_lower > 1e-6) & (batch.p_lower < cal.p_cap - 1e-9)
    assert inside.sum() > 10
    np.testing.assert_allclose(e[inside], cal.quantile, atol=1e-6)
    for i, row in enumerate(probs):
        one = certify_from_probs(row, cal)
        assert one.abstain == batch.abstain[i]
        assert one.radius == pytest.approx(batch.radius[i], abs=1e-9)
        assert one.radius <= cal.max_radius() + 1e-12
    assert Calibration.from_dict(cal.to_dict()) == cal and cal.to_dict()["score_scale_y"] == [1.5, 0.6, 0.2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(score="logit", score_scale_x=(0.0, 1.0), score_scale_y=(1.0, 1.0)), "probit"),
        (dict(score_scale_x=(0.0, 1.0), score_scale_y=(1.0,)), "as many"),
        (dict(score_scale_x=(1.0, 0.0), score_scale_y=(1.0, 1.0)), "increase"),
        (dict(score_scale_x=(0.0, 1.0), score_scale_y=(1.0, 0.0)), "positive"),
        (dict(score_scale_x=(0.0, 1.0), score_scale_y=(1.0, -2.0)), "positive"),
        (dict(score_scale_x=(0.0, 1.0), score_scale_y=(1.0, float("inf"))), "finite"),
    ],
)
def test_bad_score_scales_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrationSpec(sigma=0.25, n_mc=1000, alpha=0.01, beta=0.001, **kwargs)


def test_no_normalized_score_falls_below_the_quantile_floor():
    """The manifest check's floor holds for every input a calibration can see, scale or not."""
    rng = np.random.default_rng(7)
    k, n_mc, beta = 10, 1000, 0.001
    cap = beta ** (1 / n_mc)
    scale = ((0.0, 1.5, 3.0), (2.0, 0.5, 0.05))
    floor = quantile_floor(k, cap, "probit", None, scale)
    probs = rng.dirichlet(np.full(k, 0.3), 5000)
    counts = rng.multinomial(n_mc, np.full(k, 1.0 / k), 5000)
    counts[:2500, :] = 0
    counts[np.arange(2500), probs[:2500].argmax(axis=1)] = n_mc  # every draw on Â: p̲ = p_cap
    low = mc_lower_bounds(counts, probs.argmax(axis=1), n_mc, beta)
    e = conformal_scores(probs.max(axis=1), low, cap, "probit", None, scale)
    assert e.min() >= floor - 1e-12 and floor < 0


def test_the_scale_rules_fit_a_scale_and_need_counts():
    rng = np.random.default_rng(8)
    probs, counts, _ = _draw(rng, 400)
    kw = dict(sigma=SIGMA, m=500, n_mc=N_MC, alpha=0.05, beta=BETA)
    spec = fit_rule(get_rule("map-tau0.5+scale"), probs, counts, **kw)
    assert spec.score_map is not None and spec.score_scale is not None
    assert fit_rule(get_rule("scale"), probs, counts, **kw).score_map is None
    with pytest.raises(ValueError, match="MC counts"):
        fit_rule(get_rule("scale"), probs, None, **kw)
