"""Lever 3: the two-stage lower bound (more draws only where the first draws all hit Â) stays valid."""

from __future__ import annotations

import numpy as np
import pytest

from rrise.calibrate.cap import two_stage_lower, two_stage_miss_probability
from rrise.stats import clopper_pearson_lower

N1, N2, BETA = 40, 400, 0.05  # a large β so that a miss rate above it would be visible


@pytest.mark.parametrize(
    "p", [0.5, 0.9, 0.92, BETA ** (1 / N1), 0.94, 0.95, 0.97, 0.99, BETA ** (1 / N2), 0.999]
)
def test_two_stage_bound_misses_with_probability_at_most_beta_exactly(p):
    assert two_stage_miss_probability(p, N1, N2, BETA) <= BETA + 1e-12


def test_two_stage_bound_by_simulation_and_its_cap():
    rng = np.random.default_rng(0)
    trials = 40_000
    worst = 0.0
    for p in (0.9, BETA ** (1 / N1) - 0.005, BETA ** (1 / N1) + 0.005, 0.98, 0.995):
        k1, k2 = rng.binomial(N1, p, trials), rng.binomial(N2, p, trials)
        miss = float(np.mean(two_stage_lower(k1, N1, k2, N2, BETA) > p))
        exact = two_stage_miss_probability(p, N1, N2, BETA)
        assert miss == pytest.approx(exact, abs=4 * np.sqrt(BETA / trials) + 1e-3)
        worst = max(worst, miss)
    assert worst <= BETA + 4 * np.sqrt(BETA / trials)
    # the cap moves from β^(1/N1) to β^(1/N2); below the cap the first bound is kept as it is
    assert two_stage_lower(np.array([N1]), N1, np.array([N2]), N2, BETA)[0] == pytest.approx(BETA ** (1 / N2))
    assert two_stage_lower(np.array([N1 - 1]), N1, np.array([N2]), N2, BETA)[0] == pytest.approx(
        clopper_pearson_lower(N1 - 1, N1, BETA)
    )


def test_two_stage_bound_holds_on_a_fine_grid_and_refuses_impossible_counts():
    ps = np.linspace(0.9, 0.9999, 60)
    assert max(two_stage_miss_probability(float(p), N1, N2, BETA) for p in ps) <= BETA + 1e-12
    with pytest.raises(ValueError, match="counts must lie"):
        two_stage_lower(np.array([N1 + 1]), N1, np.array([0]), N2, BETA)


def _calibration_draw(rng: np.random.Generator, size: int, n1: int, n2: int):
    """Two classes, most inputs near certain: probs [size, 2], first-stage counts (n1 draws), the
    second stage (n2 draws on the rows whose n1 draws all fell on one class, zeros elsewhere), true p."""
    from scipy.stats import norm

    z_hat = rng.normal(3.0, 0.8, size).clip(0.1, 5.0)
    true_p = norm.cdf(z_hat + 0.2 * rng.normal(size=size))
    probs = np.stack([norm.cdf(z_hat), norm.sf(z_hat)], axis=1)
    k1 = rng.binomial(n1, true_p)
    counts = np.stack([k1, n1 - k1], axis=1).astype(np.int64)
    at_cap = counts.max(axis=1) == n1
    k2 = np.where(at_cap, rng.binomial(n2, true_p), 0)
    cap_counts = np.stack([k2, np.where(at_cap, n2 - k2, 0)], axis=1).astype(np.int64)
    return probs, counts, cap_counts, true_p


def test_conformalize_with_draws_at_the_cap_keeps_the_guarantee_and_lifts_the_radius_cap():
    from rrise import certify_from_probs
    from rrise.calibration import CalibrationSpec, conformalize

    rng = np.random.default_rng(5)
    n1, n2, alpha, beta = 1000, 20_000, 0.05, 0.001
    one = CalibrationSpec(sigma=0.25, n_mc=n1, alpha=alpha, beta=beta)
    two = CalibrationSpec(sigma=0.25, n_mc=n1, alpha=alpha, beta=beta, cap_draws=n2)
    assert two.p_cap == pytest.approx(beta ** (1 / n2)) and one.p_cap == pytest.approx(beta ** (1 / n1))
    violations, largest = [], []
    for _ in range(15):
        probs, counts, cap_counts, _ = _calibration_draw(rng, 600, n1, n2)
        cal1 = conformalize(one, probs, counts)
        cal2 = conformalize(two, probs, counts, cap_counts=cap_counts)
        test_probs, _, _, test_p = _calibration_draw(rng, 4000, n1, n2)
        cert = certify_from_probs(test_probs, cal2)
        violations.append(
            np.mean(~cert.abstain & (cert.p_lower > np.where(cert.top_class == 0, test_p, 1 - test_p)))
        )
        largest.append((cert.radius.max(), certify_from_probs(test_probs, cal1).radius.max()))
    assert np.mean(violations) <= alpha + beta + 0.01, np.mean(violations)
    r2, r1 = np.mean(largest, axis=0)
    assert r1 <= 0.25 * 3.0902 + 1e-9  # σ·Φ⁻¹(β^(1/1000)): the single-stage ceiling
    assert r2 > r1 + 0.05, (r2, r1)
    again = type(cal2).from_dict(cal2.to_dict())
    assert again == cal2 and again.to_dict()["cap_draws"] == n2


def test_draws_at_the_cap_are_refused_when_they_do_not_fit():
    from rrise.calibration import CalibrationSpec, conformalize

    rng = np.random.default_rng(6)
    probs, counts, cap_counts, _ = _calibration_draw(rng, 300, 100, 1000)
    kw = dict(sigma=0.25, n_mc=100, alpha=0.05, beta=0.001)
    with pytest.raises(ValueError, match="must exceed n_mc"):
        CalibrationSpec(cap_draws=100, **kw)
    spec = CalibrationSpec(cap_draws=1000, **kw)
    with pytest.raises(ValueError, match="pass cap_counts"):
        conformalize(spec, probs, counts)
    with pytest.raises(ValueError, match="no cap_draws"):
        conformalize(CalibrationSpec(**kw), probs, counts, cap_counts=cap_counts)
    wrong = cap_counts.copy()
    row = int(np.flatnonzero(counts.max(axis=1) < 100)[0])  # a row below the cap must hold no draws
    wrong[row, 0] = 5
    with pytest.raises(ValueError, match=f"cap_counts row {row} sums to 5, expected 0"):
        conformalize(spec, probs, counts, cap_counts=wrong)
    with pytest.raises(ValueError, match="integer"):
        conformalize(spec, probs, counts, cap_counts=cap_counts.astype(float))


def test_rule_selection_with_draws_at_the_cap_sees_the_radii_only_they_reach():
    """`rrise select-rule --cap-draws`: compare_rules calibrates and tests every rule with the
    two-stage bound, so a radius beyond the single-stage ceiling counts on the selection split
    (for confidence bins, whose top bin keeps its own small quantile)."""
    from rrise.calibrate.rules import compare_rules

    rng = np.random.default_rng(7)
    n1, n2, alpha, beta = 1000, 100_000, 0.1, 0.001
    probs, counts, cap_counts, _ = _calibration_draw(rng, 1600, n1, n2)
    labels = np.zeros(len(probs), dtype=int)
    beyond = 0.25 * 3.0902 + 0.01  # past σ·Φ⁻¹(β^(1/1000)), the single-stage ceiling
    kw = dict(n_mc=n1, sigma=0.25, alpha=alpha, beta=beta, repeats=6, radii=(0.0, 0.5, beyond), seed=1)
    one = compare_rules(probs, counts, labels, **kw)
    two = compare_rules(probs, counts, labels, cap_counts=cap_counts, cap_draws=n2, **kw)
    assert one["cap_draws"] is None and two["cap_draws"] == n2
    key = f"{beyond:g}"
    assert all(row["certified_accuracy"][key] == 0.0 for row in one["rules"].values())
    assert two["rules"]["bins"]["certified_accuracy"][key] > 5.0, two["rules"]["bins"]
    for row in two["rules"].values():
        assert row["miss_rate"] <= alpha + beta + 0.02
    with pytest.raises(ValueError, match="no calibration rule could run"):  # cap counts that do not fit
        compare_rules(probs, counts, labels, cap_counts=np.zeros_like(cap_counts), cap_draws=n2, **kw)
