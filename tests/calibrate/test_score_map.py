"""The learned probit score map and the calibration rules compared on a selection split.

Synthetic problems with known smoothed probabilities: the map must keep the conformal guarantee
(any map fixed before calibration does), and where the surrogate's errors depend on ŝ it must give
larger radii than one global quantile.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.isotonic import IsotonicRegression

from rrise import Calibration, certify_from_probs
from rrise.calibrate.rules import RULES, Rule, compare_rules, fit_rule, get_rule
from rrise.calibrate.score_map import fit_score_map, isotonic_increasing
from rrise.calibration import CalibrationSpec, conformalize
from rrise.scores import apply_score_map

N_MC, BETA, SIGMA = 2000, 0.001, 0.25


def _draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes; the surrogate is over-confident on mid-confidence inputs and honest near 1.

    Returns probs [size, 2], MC counts [size, 2] with N_MC draws, and the true p of class 0."""
    true_p = norm.cdf(rng.normal(1.6, 0.9, size)).clip(0.51, 1.0)
    z_true = norm.ppf(np.minimum(true_p, 1 - 1e-12))
    # mid-confidence inputs (true p in 0.6..0.95) are reported 0.8 probit units too confident
    bias = np.where((true_p > 0.6) & (true_p < 0.95), 0.8, 0.0)
    s_hat = norm.cdf(z_true + bias + rng.normal(0.0, 0.1, size)).clip(0.5 + 1e-6, 1 - 1e-9)
    probs = np.stack([s_hat, 1 - s_hat], axis=1)
    k0 = rng.binomial(N_MC, true_p)
    return probs, np.stack([k0, N_MC - k0], axis=1).astype(np.int64), true_p


def test_isotonic_increasing_matches_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.normal(size=200).cumsum() * 0.1 + rng.normal(size=200)
    w = rng.uniform(0.5, 3.0, 200)
    expected = IsotonicRegression().fit(np.arange(200), y, sample_weight=w).predict(np.arange(200))
    np.testing.assert_allclose(isotonic_increasing(y, w), expected, atol=1e-9)


def test_score_map_is_monotone_and_tracks_the_low_quantile():
    rng = np.random.default_rng(1)
    probs, counts, _ = _draw(rng, 3000)
    x, y = fit_score_map(probs, counts, n_mc=N_MC, beta=BETA, tau=0.1)
    assert len(x) >= 5 and all(b > a for a, b in zip(x, x[1:])) and all(b >= a for a, b in zip(y, y[1:]))
    # the map lowers the over-confident middle more than the honest top
    z_mid, z_top = 1.8, float(x[-1])
    assert z_mid - np.interp(z_mid, x, y) > 0.4
    assert z_top - np.interp(z_top, x, y) < z_mid - np.interp(z_mid, x, y)


def test_score_map_refuses_bad_input():
    rng = np.random.default_rng(2)
    probs, counts, _ = _draw(rng, 300)
    with pytest.raises(ValueError, match="tau"):
        fit_score_map(probs, counts, n_mc=N_MC, beta=BETA, tau=1.5)
    with pytest.raises(ValueError, match="too few"):
        fit_score_map(probs[:50], counts[:50], n_mc=N_MC, beta=BETA, tau=0.1)
    with pytest.raises(ValueError, match=r"\[n, K\]"):
        fit_score_map(probs, counts[:10], n_mc=N_MC, beta=BETA)


def test_mapped_calibration_keeps_the_guarantee_and_widens_radii():
    """Map fitted on a selection draw; calibration and test on fresh draws, 20 times."""
    rng = np.random.default_rng(3)
    alpha, m = 0.05, 600
    sel_probs, sel_counts, _ = _draw(rng, 2000)
    score_map = fit_score_map(sel_probs, sel_counts, n_mc=N_MC, beta=BETA, tau=0.1)
    violations, mapped_acr, single_acr = [], [], []
    for _ in range(20):
        cal_probs, cal_counts, _ = _draw(rng, m)
        kw = dict(n_mc=N_MC, sigma=SIGMA, alpha=alpha, beta=BETA)
        mapped = conformalize(
            CalibrationSpec(score_map_x=score_map[0], score_map_y=score_map[1], **kw), cal_probs, cal_counts
        )
        single = conformalize(CalibrationSpec(**kw), cal_probs, cal_counts)
        test_probs, _, test_p = _draw(rng, 4000)
        cert = certify_from_probs(test_probs, mapped)
        p_top = np.where(cert.top_class == 0, test_p, 1 - test_p)
        violations.append(np.mean(~cert.abstain & (cert.p_lower > p_top)))
        mapped_acr.append(cert.radius.mean())
        single_acr.append(certify_from_probs(test_probs, single).radius.mean())
    assert np.mean(violations) <= alpha + BETA + 0.01, np.mean(violations)
    # the check has power: the same map with a quantile that is too small violates far more
    uncorrected = certify_from_probs(test_probs, mapped.with_quantile(-2.0))
    p_top = np.where(uncorrected.top_class == 0, test_p, 1 - test_p)
    assert np.mean(~uncorrected.abstain & (uncorrected.p_lower > p_top)) > alpha + 0.1
    assert np.mean(mapped_acr) > np.mean(single_acr) + 0.01, (np.mean(mapped_acr), np.mean(single_acr))


def test_score_map_single_and_batch_paths_agree():
    cal = Calibration(
        sigma=0.5, quantile=0.3, alpha=0.01, beta=0.001, n_mc=10_000, m=3000,
        score_map_x=(0.0, 1.0, 2.5, 3.2), score_map_y=(-0.5, 0.4, 1.9, 3.0),
    )  # fmt: skip
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 4, (64, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    batch = certify_from_probs(probs, cal)
    for i, row in enumerate(probs):
        one = certify_from_probs(row, cal)
        assert one.abstain == batch.abstain[i]
        assert one.radius == pytest.approx(batch.radius[i], abs=1e-9)
        assert one.p_lower == pytest.approx(batch.p_lower[i], abs=1e-9)
    z = np.linspace(-1, 4, 101)
    np.testing.assert_allclose(
        [apply_score_map(float(v), cal.score_map) for v in z], apply_score_map(z, cal.score_map), atol=1e-12
    )
    assert apply_score_map(z, None) is z


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(score="logit", score_map_x=(0.0, 1.0), score_map_y=(0.0, 1.0)), "probit"),
        (dict(score_map_x=(0.0, 1.0), score_map_y=(0.0,)), "as many"),
        (dict(score_map_x=(1.0, 0.0), score_map_y=(0.0, 1.0)), "increase"),
        (dict(score_map_x=(0.0, 1.0), score_map_y=(1.0, 0.0)), "monotone"),
        (dict(score_map_x=(0.0, float("nan")), score_map_y=(0.0, 1.0)), "finite"),
    ],
)
def test_bad_score_maps_are_refused(kwargs, match):
    base = dict(sigma=0.25, quantile=0.1, alpha=0.01, beta=0.001, n_mc=1000, m=500)
    with pytest.raises(ValueError, match=match):
        Calibration(**{**base, **kwargs})


def test_score_map_round_trips_through_to_dict():
    cal = Calibration(
        sigma=0.25, quantile=0.1, alpha=0.01, beta=0.001, n_mc=1000, m=500,
        score_map_x=(0.0, 1.0), score_map_y=(-0.2, 0.7),
    )  # fmt: skip
    again = Calibration(**cal.to_dict())
    assert again == cal and again.score_map == ((0.0, 1.0), (-0.2, 0.7))
    assert dataclasses.replace(cal, score_map_x=(), score_map_y=()).score_map is None


def test_compare_rules_prefers_the_map_where_errors_depend_on_confidence():
    rng = np.random.default_rng(5)
    probs, counts, true_p = _draw(rng, 1500)
    labels = np.where(rng.uniform(size=len(true_p)) < 0.95, 0, 1)
    result = compare_rules(
        probs, counts, labels, n_mc=N_MC, sigma=SIGMA, alpha=0.05, beta=BETA, repeats=10, seed=0
    )
    table = result["rules"]
    assert set(table) == {r.name for r in RULES}
    assert result["winner"] in table and "error" not in table[result["winner"]]
    # one-standard-error rule: the winner is within one SE of the best; every simpler rule is not
    names = [r.name for r in RULES if "error" not in table[r.name]]
    win = table[result["winner"]]
    assert win["behind_best"] <= win["behind_best_se"]
    assert min(table[n]["behind_best"] for n in names) == 0.0
    for name in names[: names.index(result["winner"])]:
        assert table[name]["behind_best"] > table[name]["behind_best_se"], name
    assert table["map"]["mean_certified_accuracy"] > table["single"]["mean_certified_accuracy"]
    for row in table.values():
        if "error" not in row:
            assert row["miss_rate"] <= 0.05 + BETA + 0.02
            ca = list(row["certified_accuracy"].values())
            assert all(a >= b for a, b in zip(ca, ca[1:]))


def test_rules_that_cannot_run_say_why_and_map_rules_need_counts():
    rng = np.random.default_rng(6)
    probs, counts, _ = _draw(rng, 150)  # a fit part of 37: too few for maps with groups of 100
    result = compare_rules(
        probs, counts, np.zeros(150, dtype=int), n_mc=N_MC, sigma=SIGMA, alpha=0.05, beta=BETA, repeats=3
    )
    assert "too few" in result["rules"]["map-tau0.05"]["error"]
    with pytest.raises(ValueError, match="MC counts"):
        fit_rule(get_rule("map"), probs, None, sigma=SIGMA, m=100, n_mc=N_MC, alpha=0.05, beta=BETA)
    with pytest.raises(ValueError, match="unknown calibration rule"):
        get_rule("magic")
    assert Rule("x", bins=3, map_tau=0.1).describe() == "score map τ=0.1, ≤3 confidence bins"


def test_cli_rule_names_mirror_the_rules():
    from rrise.cli import RuleName

    assert {r.value for r in RuleName} == {r.name for r in RULES}


def test_compare_rules_at_the_deployment_calibration_size(monkeypatch):
    """A calibrate part smaller than the deployment's m is resampled to m, so each rule is scored at
    the quantile index and bin count it will run at, not at the part's own (higher) index."""
    import rrise.calibrate.rules as rules_mod

    sizes: list[int] = []
    real = rules_mod.conformalize

    def spy(spec, p, k, **kw):
        sizes.append(len(p))
        return real(spec, p, k, **kw)

    monkeypatch.setattr(rules_mod, "conformalize", spy)
    rng = np.random.default_rng(7)
    probs, counts, _ = _draw(rng, 400)
    labels = np.zeros(400, dtype=int)
    kw = dict(n_mc=N_MC, sigma=SIGMA, alpha=0.01, beta=BETA, repeats=5, seed=0)
    own = compare_rules(probs, counts, labels, **kw)
    assert set(sizes) == {200} and "resampled" not in own["split"]
    sizes.clear()
    deploy = compare_rules(probs, counts, labels, deploy_m=3000, **kw)
    assert set(sizes) == {3000} and "resampled to m = 3000" in deploy["split"]
    assert deploy["deploy_m"] == 3000
    # 200 calibration inputs at α = 0.01 leave room for one bin only; 3,000 for four
    assert own["rules"]["bins"]["certified_accuracy"] == own["rules"]["single"]["certified_accuracy"]
    assert deploy["rules"]["bins"]["certified_accuracy"] != deploy["rules"]["single"]["certified_accuracy"]
    sizes.clear()
    compare_rules(probs, counts, labels, deploy_m=150, **kw)  # a larger part is never cut down
    assert set(sizes) == {200}


def test_two_surrogates_on_the_same_splits_pair_up():
    """Per-split means let two surrogates be compared on shared splits: an honest surrogate beats
    the over-confident one by more than its paired standard error; other splits are refused."""
    from benchmarks.studies.rules_on_selection import paired_difference

    rng = np.random.default_rng(11)
    biased, counts, true_p = _draw(rng, 1200)
    labels = np.zeros(len(true_p), dtype=np.int64)
    s = np.clip(true_p, 0.5 + 1e-6, 1 - 1e-9)
    honest = np.stack([s, 1 - s], axis=1)
    kwargs = dict(n_mc=N_MC, sigma=SIGMA, alpha=0.05, beta=BETA, repeats=8, seed=3)
    runs = {name: compare_rules(p, counts, labels, **kwargs) for name, p in (("b", biased), ("h", honest))}
    for result in runs.values():
        for row in result["rules"].values():
            if "error" not in row:
                assert len(row["split_means"]) == 8
                assert np.mean(row["split_means"]) == pytest.approx(row["mean_certified_accuracy"], abs=2e-3)
    diff = paired_difference(runs["h"], runs["b"])["single"]
    assert diff["difference"] > 2 * diff["paired_se"] > 0
    other = compare_rules(honest, counts, labels, **{**kwargs, "repeats": 4})
    with pytest.raises(SystemExit, match="not the same splits"):
        paired_difference(runs["h"], other)
