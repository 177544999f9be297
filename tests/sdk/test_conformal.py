"""Split-conformal calibration against a problem whose smoothed probabilities are known exactly.

Base classifier: 2-class linear, so p₁(x) = Φ((w·x + b)/(σ‖w‖)). Surrogate: the true p plus noise.
The guarantee to check: the rate of "certified and p̃ > p_Â(x)" is at most α + β (plus sampling slack).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from rrise import Calibration, certify_from_probs
from rrise.calibrate.mc import sample_counts
from rrise.calibration import (
    CalibrationSpec,
    conformal_quantile,
    conformal_rank,
    conformalize,
    mc_lower_bounds,
    min_calibration_size,
)
from rrise.stats import clopper_pearson_lower

SIGMA, ALPHA, BETA, N_MC = 0.25, 0.1, 0.01, 1000
SLACK = 0.03


def _surrogate(p1: np.ndarray, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """An honest but noisy surrogate: [1 − s, s] with s = p₁ + N(0, noise²), clipped into (0, 1)."""
    s1 = np.clip(p1 + rng.normal(0.0, noise, p1.shape), 1e-4, 1 - 1e-4)
    return np.stack([1 - s1, s1], axis=1)


def _overconfident(probs: np.ndarray, power: float = 3.0) -> np.ndarray:
    """The same surrogate pushed toward 1: s ∝ s^power."""
    t = probs**power
    return t / t.sum(axis=1, keepdims=True)


def _counts_for(top: np.ndarray, k_top: np.ndarray, n_mc: int) -> np.ndarray:
    counts = np.zeros((len(top), 2), dtype=np.int64)
    rows = np.arange(len(top))
    counts[rows, top] = k_top
    counts[rows, 1 - top] = n_mc - k_top
    return counts


def _violation_rate(probs: np.ndarray, p1: np.ndarray, cal: Calibration) -> float:
    """Fraction of inputs certified with p̃ > p_Â(x), i.e. where the certificate could be wrong."""
    cert = certify_from_probs(probs, cal)
    p_top = np.where(cert.top_class == 1, p1, 1 - p1)
    return float(np.mean(~cert.abstain & (cert.p_lower > p_top)))


def test_mc_lower_bounds_are_clopper_pearson_of_the_chosen_class():
    counts = np.array([[0, 100], [37, 63], [100, 0], [50, 50]])
    classes = np.array([0, 1, 0, 1])
    got = mc_lower_bounds(counts, classes, 100, 0.001)
    np.testing.assert_allclose(got, clopper_pearson_lower(np.array([0, 63, 100, 50]), 100, 0.001))
    assert got[0] == 0.0 and 0.0 < got[1] < 0.63 and got[2] == pytest.approx(0.001 ** (1 / 100))
    with pytest.raises(ValueError):
        mc_lower_bounds(counts, np.array([0, 1, 2, 0]), 100, 0.001)


def test_quantile_follows_the_definition():
    """q̂ = the ⌈(m+1)(1−α)⌉-th smallest e_i = Φ⁻¹(min(ŝ_i, p_cap)) − Φ⁻¹(p̲_i), from scratch."""
    from scipy.stats import beta as beta_dist

    rng = np.random.default_rng(3)
    m = 57
    p1 = norm.cdf(rng.normal(1.0, 1.0, m))
    probs = _surrogate(p1, rng)
    top = probs.argmax(axis=1)
    k = rng.binomial(N_MC, np.where(top == 1, p1, 1 - p1))
    k[0] = N_MC  # p̲ = p_cap exactly
    counts = _counts_for(top, k, N_MC)
    cal = conformalize(CalibrationSpec(n_mc=N_MC, sigma=SIGMA, alpha=ALPHA, beta=BETA), probs, counts)
    cap = BETA ** (1 / N_MC)
    lower = np.where(k > 0, beta_dist.ppf(BETA, np.maximum(k, 1), N_MC - k + 1), 0.0)
    scores = norm.ppf(np.minimum(probs.max(axis=1), cap)) - norm.ppf(lower)
    rank = int(np.ceil((m + 1) * (1 - ALPHA)))
    assert cal.quantile == pytest.approx(np.sort(scores)[rank - 1], abs=1e-9)
    logit = conformalize(
        CalibrationSpec(n_mc=N_MC, sigma=SIGMA, alpha=ALPHA, beta=BETA, score="logit"), probs, counts
    )
    logit_scores = np.log(np.minimum(probs.max(1), cap) / (1 - np.minimum(probs.max(1), cap)))
    logit_scores -= np.log(lower / (1 - lower))
    assert logit.score == "logit"
    assert logit.quantile == pytest.approx(np.sort(logit_scores)[rank - 1], abs=1e-9)


def test_calibration_with_real_monte_carlo_counts():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 16, generator=gen))
        model[1].bias.zero_()
    weight = model[1].weight.detach().double().numpy()
    w = weight[1] - weight[0]
    rng = np.random.default_rng(0)
    m, m_test = 300, 2000
    x = rng.normal(0.0, 0.4, (m + m_test, 1, 4, 4)).astype(np.float32)
    p1 = norm.cdf(x.reshape(len(x), -1).astype(np.float64) @ w / (SIGMA * np.linalg.norm(w)))
    probs = _surrogate(p1, rng)
    counts = sample_counts(model, x[:m], N_MC, SIGMA, batch_size=1000, seed=1)
    assert counts.shape == (m, 2) and np.all(counts.sum(axis=1) == N_MC)
    cal = conformalize(CalibrationSpec(n_mc=N_MC, sigma=SIGMA, alpha=ALPHA, beta=BETA), probs[:m], counts)
    assert isinstance(cal, Calibration)
    assert (cal.sigma, cal.alpha, cal.beta, cal.n_mc, cal.m, cal.score) == (
        SIGMA,
        ALPHA,
        BETA,
        N_MC,
        m,
        "probit",
    )
    assert cal.p_cap == pytest.approx(BETA ** (1 / N_MC))
    assert np.isfinite(cal.quantile) and cal.quantile > 0
    assert _violation_rate(probs[m:], p1[m:], cal) <= ALPHA + BETA + 0.05
    assert np.mean(~certify_from_probs(probs[m:], cal).abstain) > 0.3  # not vacuous


def _trial(seed: int, m: int = 200, m_test: int = 2000) -> dict[str, tuple[float, float, float]]:
    """One calibration + test draw with closed-form binomial MC counts: (q̂, mean radius, violations)."""
    rng = np.random.default_rng(seed)
    p1 = norm.cdf(rng.normal(0.8, 1.2, m + m_test))
    honest = _surrogate(p1, rng)
    top = honest.argmax(axis=1)
    p_top = np.where(top == 1, p1, 1 - p1)
    counts = _counts_for(top[:m], rng.binomial(N_MC, p_top[:m]), N_MC)
    out = {}
    for name, probs in (("honest", honest), ("overconfident", _overconfident(honest))):
        cal = conformalize(CalibrationSpec(n_mc=N_MC, sigma=SIGMA, alpha=ALPHA, beta=BETA), probs[:m], counts)
        radius = certify_from_probs(probs[m:], cal).radius.mean()
        out[name] = (cal.quantile, radius, _violation_rate(probs[m:], p1[m:], cal))
        out[name + "/uncalibrated"] = (0.0, 0.0, _violation_rate(probs[m:], p1[m:], cal.with_quantile(0)))
    return out


@pytest.fixture(scope="module")
def trials() -> list[dict]:
    """30 cheap repetitions (fresh calibration and test sets each)."""
    return [_trial(seed) for seed in range(30)]


def test_violation_rate_is_at_most_alpha_plus_beta_over_repetitions(trials):
    for name in ("honest", "overconfident"):
        violations = np.array([t[name][2] for t in trials])
        assert violations.mean() <= ALPHA + BETA + SLACK, (name, violations.mean())
        # the check has power: without the conformal correction (q̂ = 0) it fails by far
        uncalibrated = np.mean([t[name + "/uncalibrated"][2] for t in trials])
        assert uncalibrated > ALPHA + BETA + 0.2, (name, uncalibrated)


def test_overconfident_surrogate_gets_a_larger_quantile_not_larger_radii(trials):
    q_honest = np.array([t["honest"][0] for t in trials])
    q_over = np.array([t["overconfident"][0] for t in trials])
    assert np.all(q_over > q_honest)
    r_honest = np.mean([t["honest"][1] for t in trials])
    r_over = np.mean([t["overconfident"][1] for t in trials])
    assert r_over <= r_honest, (r_over, r_honest)


def test_too_few_calibration_inputs_name_the_smallest_m():
    m_min = min_calibration_size(ALPHA)
    rng = np.random.default_rng(0)
    probs = _surrogate(np.full(m_min - 1, 0.9), rng)
    counts = _counts_for(probs.argmax(axis=1), np.full(m_min - 1, 900), N_MC)
    with pytest.raises(ValueError, match=f"m={m_min}"):
        conformalize(CalibrationSpec(n_mc=N_MC, sigma=SIGMA, alpha=ALPHA, beta=BETA), probs, counts)
    probs = _surrogate(np.full(m_min, 0.9), rng)
    counts = _counts_for(probs.argmax(axis=1), np.full(m_min, 900), N_MC)
    cal = conformalize(CalibrationSpec(n_mc=N_MC, sigma=SIGMA, alpha=ALPHA, beta=BETA), probs, counts)
    assert cal.m == m_min


@pytest.mark.parametrize("delta", [0.001, 0.05, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize(("m", "alpha"), [(3000, 0.01), (500, 0.05), (2000, 0.001), (40, 0.1)])
def test_a_pac_quantile_never_loses_the_marginal_guarantee(m, alpha, delta):
    """For exchangeable continuous scores the k-th smallest of m covers a new one with probability
    exactly k/(m+1). A PAC rank below ⌈(m+1)(1−α)⌉ (large δ: m = 3000, α = 0.01, δ = 0.9 gave
    2964/3001 = 0.9877) would void the marginal 1 − α the bundle states."""
    if min_calibration_size(alpha, delta) > m:
        with pytest.raises(ValueError, match="too few"):
            conformal_quantile(np.arange(m, dtype=float), alpha, delta)
        return
    k = conformal_rank(m, alpha, delta)
    assert k / (m + 1) >= 1 - alpha
    assert k >= conformal_rank(m, alpha)
    scores = np.random.default_rng(0).permutation(m).astype(float)
    assert conformal_quantile(scores, alpha, delta) == k - 1  # the k-th smallest of 0..m-1


def test_the_pac_minimum_size_is_never_below_the_marginal_one():
    assert conformal_rank(3000, 0.01, 0.9) == conformal_rank(3000, 0.01) == 2971
    assert min_calibration_size(0.01, 0.9) == min_calibration_size(0.01) == 99
    for alpha, delta in [(0.01, 0.9), (0.05, 0.5), (0.1, 0.99), (0.01, 0.1)]:
        m = min_calibration_size(alpha, delta)
        assert conformal_rank(m, alpha, delta) <= m < conformal_rank(m - 1, alpha, delta) + 1
        assert m >= min_calibration_size(alpha)
    assert min_calibration_size(0.01, 0.1, bins=3) == 3 * min_calibration_size(0.01, 0.1 / 3)


def test_bad_counts_are_rejected():
    rng = np.random.default_rng(0)
    probs = _surrogate(np.full(20, 0.9), rng)
    counts = _counts_for(probs.argmax(axis=1), np.full(20, 900), N_MC)
    kwargs = dict(n_mc=N_MC, sigma=SIGMA, alpha=ALPHA, beta=BETA)
    short = counts.copy()
    short[4, 0] -= 1
    with pytest.raises(ValueError, match="row 4"):
        conformalize(CalibrationSpec(**kwargs), probs, short)
    with pytest.raises(ValueError):
        conformalize(CalibrationSpec(**kwargs), probs, counts[:10])
    with pytest.raises(ValueError):
        conformalize(CalibrationSpec(**kwargs), probs, counts.astype(np.float64))
    with pytest.raises(ValueError, match="score transform"):
        conformalize(CalibrationSpec(score="cubic", **kwargs), probs, counts)


def test_mondrian_calibration_is_conservative_within_each_bin_and_widens_confident_radii():
    """A surrogate whose low-confidence inputs are badly over-confident: with one quantile, that
    tail shrinks every radius; per-bin quantiles keep the confident bin's radii and the guarantee."""
    import dataclasses

    from rrise import certify_from_probs
    from rrise.calibrate.rules import confidence_bin_edges
    from rrise.scores import confidence_bin

    rng = np.random.default_rng(11)
    n_mc, alpha, beta, m = 2000, 0.05, 0.001, 1200

    def draw(size):
        true_p = np.where(
            rng.uniform(size=size) < 0.5, rng.uniform(0.55, 0.8, size), rng.uniform(0.995, 1, size)
        )
        # over-confident below 0.9, honest above
        s_hat = np.where(true_p < 0.9, np.minimum(true_p + 0.15, 0.95), true_p)
        probs = np.stack([s_hat, 1 - s_hat], axis=1)
        counts0 = rng.binomial(n_mc, true_p)
        return probs, np.stack([counts0, n_mc - counts0], axis=1).astype(np.int64), true_p

    sel_probs, _, _ = draw(2000)
    edges = confidence_bin_edges(sel_probs.max(1), m, alpha, max_bins=2)
    assert len(edges) == 1
    violations, single_radius, binned_radius = [], [], []
    for _ in range(20):
        cal_probs, cal_counts, _ = draw(m)
        binned = conformalize(
            CalibrationSpec(n_mc=n_mc, sigma=0.25, alpha=alpha, beta=beta, bin_edges=edges),
            cal_probs,
            cal_counts,
        )
        test_probs, _, test_p = draw(4000)
        cert = certify_from_probs(test_probs, binned)
        single = certify_from_probs(test_probs, dataclasses.replace(binned, bin_edges=(), bin_quantiles=()))
        top_bin = confidence_bin(test_probs.max(1), edges) == 1
        single_radius.append(single.radius[top_bin].mean())
        binned_radius.append(cert.radius[top_bin].mean())
        for g in (0, 1):
            in_g = (confidence_bin(test_probs.max(1), edges) == g) & ~cert.abstain
            violations.append((g, np.mean(cert.p_lower[in_g] > test_p[in_g]) if in_g.any() else 0.0))
    for g in (0, 1):
        rate = np.mean([v for b, v in violations if b == g])
        assert rate <= alpha + beta + 0.02, (g, rate)
    assert np.mean(binned_radius) > np.mean(single_radius) + 0.05


def _flipped_trial(seed: int, m: int = 300, m_test: int = 3000, share: float = 0.08) -> dict[str, tuple]:
    """The honest surrogate, confidently wrong (its two classes swapped) on ``share`` of the inputs:
    the disagreements that set a plain quantile. ``{clip: (q̂, certificates, violation rate)}``."""
    rng = np.random.default_rng(seed)
    p1 = norm.cdf(rng.normal(0.8, 1.2, m + m_test))
    probs = _surrogate(p1, rng)
    flip = rng.random(len(p1)) < share
    probs[flip] = probs[flip, ::-1]
    top = probs.argmax(axis=1)
    p_top = np.where(top == 1, p1, 1 - p1)
    counts = _counts_for(top[:m], rng.binomial(N_MC, p_top[:m]), N_MC)
    out = {}
    for clip in (False, True):
        spec = CalibrationSpec(n_mc=N_MC, sigma=SIGMA, alpha=ALPHA, beta=BETA, clip_at_abstention=clip)
        cal = conformalize(spec, probs[:m], counts)
        certs = certify_from_probs(probs[m:], cal)
        out[clip] = (cal.quantile, certs, _violation_rate(probs[m:], p1[m:], cal))
    return out


def test_scores_clipped_at_abstention_keep_the_guarantee_and_never_lose_a_certificate():
    """min(e, a) with a the input's abstention threshold: the violation rate stays within α + β, the
    quantile never rises, and every certificate the plain score gives is kept with a radius as large."""
    trials = [_flipped_trial(seed) for seed in range(30)]
    violations = np.array([t[True][2] for t in trials])
    assert violations.mean() <= ALPHA + BETA + SLACK, violations.mean()
    for t in trials:
        (q_plain, plain, _), (q_clip, clipped, _) = t[False], t[True]
        assert q_clip <= q_plain
        assert not np.any(clipped.abstain & ~plain.abstain)
        assert np.all(clipped.radius >= plain.radius - 1e-12)
    # here the confident disagreements set the plain quantile: clipping gives real certificates back
    gained = np.mean([(~t[True][1].abstain).mean() - (~t[False][1].abstain).mean() for t in trials])
    assert gained > 0.05, gained


def test_clipped_scores_follow_the_definition():
    """e' = min(Φ⁻¹(min(ŝ, p_cap)) − Φ⁻¹(p̲), Φ⁻¹(min(ŝ, p_cap)) − Φ⁻¹(½)), +∞ → the threshold where p̲ = 0."""
    from rrise.scores import conformal_scores

    s = np.array([0.9, 0.9, 0.6, 0.999999])
    lower = np.array([0.95, 0.2, 0.0, 0.5])
    cap = BETA ** (1 / N_MC)
    z = norm.ppf(np.minimum(s, cap))
    plain = conformal_scores(s, lower, cap)
    clipped = conformal_scores(s, lower, cap, clip_at_abstention=True)
    np.testing.assert_allclose(plain[[0, 1, 3]], (z - norm.ppf(lower))[[0, 1, 3]])
    assert plain[2] == np.inf
    np.testing.assert_allclose(clipped, np.minimum(plain, z))
    # with a learned scale u the threshold is g(z)/u(z), as the deployment rule inverts it
    scale = ((0.0, 3.0), (0.5, 0.5))
    scaled = conformal_scores(s, lower, cap, score_scale=scale, clip_at_abstention=True)
    np.testing.assert_allclose(scaled, 2 * clipped)
