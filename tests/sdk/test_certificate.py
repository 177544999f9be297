"""The deployment rule and the conformal quantile (docs/CERTIFICATE.md), by example and by property."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from rrise import Calibration, CertificateBatch, certify_from_probs
from rrise.calibration import conformal_quantile, min_calibration_size
from rrise.scores import conformal_scores, inverse_transform, p_cap, transform
from rrise.stats import clopper_pearson_lower

SIGMA = 0.25


def cal(
    q: float, score: str = "probit", beta: float = 0.001, n_mc: int = 10_000, m: int = 3000, **bins
) -> Calibration:
    """The tests' calibration at σ = SIGMA, α = 0.01; ``bins``: ``bin_edges`` and ``bin_quantiles``."""
    return Calibration(sigma=SIGMA, quantile=q, alpha=0.01, beta=beta, n_mc=n_mc, m=m, score=score, **bins)


def probs_with_top(top: float, k: int = 10, cls: int = 3) -> np.ndarray:
    p = np.full(k, (1.0 - top) / (k - 1))
    p[cls] = top
    return p


def test_worked_example_probit():
    c = cal(0.5)
    cert = certify_from_probs(probs_with_top(0.95), c)
    expected_z = norm.ppf(0.95) - 0.5
    assert cert.pred == 3 and not cert.abstain
    assert cert.radius == pytest.approx(SIGMA * expected_z, rel=1e-12)
    assert cert.p_lower == pytest.approx(norm.cdf(expected_z), rel=1e-12)
    assert cert.score == pytest.approx(0.95)


def test_top_probability_is_capped_at_p_cap():
    c = cal(0.1)
    assert c.p_cap == pytest.approx(0.001**1e-4)
    near_one = certify_from_probs(probs_with_top(1 - 1e-9), c)
    at_cap = certify_from_probs(probs_with_top(c.p_cap), c)
    assert near_one.radius == pytest.approx(at_cap.radius)
    assert near_one.radius == pytest.approx(SIGMA * (norm.ppf(c.p_cap) - 0.1))


def test_abstains_when_surrogate_is_unsure():
    cert = certify_from_probs(probs_with_top(0.6), cal(0.5))  # Φ⁻¹(0.6) − 0.5 < 0
    assert cert.abstain and cert.pred is None and cert.radius == 0.0
    assert cert.top_class == 3


def test_batch_matches_single():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 10)) * 4
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    c = cal(0.3)
    batch = certify_from_probs(probs, c)
    assert len(batch) == 64
    for i in range(64):
        single, row = certify_from_probs(probs[i], c), batch[i]
        assert (single.top_class, single.abstain) == (row.top_class, row.abstain)
        assert single.score == row.score
        assert single.radius == pytest.approx(row.radius, rel=1e-12, abs=1e-15)
        assert single.p_lower == pytest.approx(row.p_lower, rel=1e-12, abs=1e-15)
    assert np.all(batch.pred[batch.abstain] == -1)
    small = certify_from_probs(probs[:5], c)  # the micro-batch path
    assert isinstance(small, CertificateBatch) and len(small) == 5
    np.testing.assert_array_equal(small.pred, batch.pred[:5])
    np.testing.assert_allclose(small.radius, batch.radius[:5], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("score", ["probit", "logit", "identity"])
def test_single_path_matches_batch_path_for_every_transform_and_bins(score):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.full(10, 0.1), size=200)
    for c in (
        cal(0.3, score),
        cal(0.4, score, bin_edges=(0.9,), bin_quantiles=(0.6, 0.2)),
    ):
        batch = certify_from_probs(probs, c)
        for i in range(len(probs)):
            one = certify_from_probs(probs[i], c)
            assert one.abstain == batch.abstain[i] and one.top_class == batch.top_class[i]
            assert one.radius == pytest.approx(batch.radius[i], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("bad", [np.array([0.5]), np.zeros((2, 2, 2)), np.array([np.nan, 1.0])])
def test_rejects_malformed_probs(bad):
    with pytest.raises(ValueError):
        certify_from_probs(bad, cal(0.1))


def test_unknown_transform_rejected():
    with pytest.raises(ValueError, match="unknown score transform"):
        cal(0.1, score="sqrt")


@pytest.mark.parametrize("score", ["probit", "logit", "identity"])
def test_transforms_invert(score):
    p = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(inverse_transform(transform(p, score), score), p, rtol=1e-12)


probs_strategy = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
q_strategy = st.floats(min_value=-1.0, max_value=5.0, allow_nan=False)
score_strategy = st.sampled_from(["probit", "logit", "identity"])


@settings(max_examples=300, deadline=None)
@given(top=st.floats(min_value=0.1, max_value=1.0), q=q_strategy, score=score_strategy)
def test_abstains_iff_p_lower_at_most_half(top, q, score):
    cert = certify_from_probs(probs_with_top(top), cal(q, score))
    assert cert.abstain == (not cert.p_lower > 0.5)
    if cert.abstain:
        assert cert.radius == 0.0 and cert.pred is None
    else:
        assert cert.radius > 0.0 and cert.pred == cert.top_class


@settings(max_examples=300, deadline=None)
@given(top=st.floats(min_value=0.1, max_value=1.0), q1=q_strategy, q2=q_strategy, score=score_strategy)
def test_radius_non_increasing_in_quantile(top, q1, q2, score):
    lo, hi = sorted((q1, q2))
    r_lo = certify_from_probs(probs_with_top(top), cal(lo, score)).radius
    r_hi = certify_from_probs(probs_with_top(top), cal(hi, score)).radius
    assert r_hi <= r_lo + 1e-12


@settings(max_examples=300, deadline=None)
@given(
    top=st.floats(min_value=0.1, max_value=1.0),
    q=q_strategy,
    score=score_strategy,
    n_mc=st.integers(min_value=10, max_value=100_000),
)
def test_radius_bounded_by_what_mc_could_certify(top, q, score, n_mc):
    c = cal(q, score, n_mc=n_mc)
    cert = certify_from_probs(probs_with_top(top), c)
    assert cert.p_lower <= c.p_cap
    assert cert.radius <= SIGMA * norm.ppf(c.p_cap) + 1e-12


@settings(max_examples=200, deadline=None)
@given(top=st.floats(min_value=0.51, max_value=0.9999), q=st.floats(min_value=0, max_value=2))
def test_probit_radius_is_sigma_times_ppf_of_p_lower(top, q):
    cert = certify_from_probs(probs_with_top(top), cal(q))
    if not cert.abstain:
        assert cert.radius == pytest.approx(SIGMA * norm.ppf(cert.p_lower), rel=1e-9, abs=1e-12)


def test_scores_edge_cases_k_zero_and_k_n():
    n, beta = 1000, 0.001
    cap = p_cap(beta, n)
    k = np.array([0, n, 900])
    lower = clopper_pearson_lower(k, n, beta)
    s = np.array([0.9, 0.999999, 0.9])
    e = conformal_scores(s, lower, cap, "probit")
    assert e[0] == np.inf  # k = 0: no lower bound, the score is +∞
    assert lower[1] == pytest.approx(cap)  # k = N gives exactly the cap…
    assert e[1] == pytest.approx(0.0, abs=1e-9)  # …so a capped ŝ scores 0
    assert e[2] == pytest.approx(norm.ppf(0.9) - norm.ppf(lower[2]))


def test_quantile_is_the_right_order_statistic():
    scores = np.arange(1, 1001, dtype=float)[::-1]  # m = 1000
    # ⌈1001 · 0.99⌉ = 991 → the 991st smallest
    assert conformal_quantile(scores, 0.01) == 991.0
    assert conformal_quantile(scores, 0.1) == 901.0


def test_quantile_refuses_too_few_and_names_the_smallest_m():
    m_min = min_calibration_size(0.01)
    assert m_min == 99
    assert math.ceil((m_min + 1) * 0.99) <= m_min
    conformal_quantile(np.zeros(99), 0.01)
    with pytest.raises(ValueError, match="m=99"):
        conformal_quantile(np.zeros(98), 0.01)
    assert min_calibration_size(0.001) == 999


@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.05, 0.01, 0.003, 0.001])
def test_min_calibration_size_is_tight(alpha):
    m = min_calibration_size(alpha)
    conformal_quantile(np.zeros(m), alpha)
    with pytest.raises(ValueError):
        conformal_quantile(np.zeros(m - 1), alpha)


def test_conformal_coverage_on_exchangeable_scores():
    rng = np.random.default_rng(0)
    alpha, m, reps = 0.1, 200, 400
    covered = []
    for _ in range(reps):
        e = rng.standard_normal(m + 1)
        covered.append(e[-1] <= conformal_quantile(e[:-1], alpha))
    # E[coverage] ≥ 1 − α = 0.9; 400 reps give a standard error of 0.015.
    assert np.mean(covered) >= 0.9 - 3 * 0.015


def test_pac_rank_matches_its_definition():
    from scipy.stats import binom

    from rrise.calibration import conformal_rank

    m, alpha, delta = 3000, 0.01, 0.05
    k = conformal_rank(m, alpha, delta)
    assert binom.sf(k - 1, m, 1 - alpha) <= delta < binom.sf(k - 2, m, 1 - alpha)
    assert k > conformal_rank(m, alpha)  # PAC asks for a higher order statistic


def test_pac_quantile_holds_conditionally_on_the_calibration_draw():
    from rrise.calibration import conformal_rank

    rng = np.random.default_rng(3)
    alpha, delta, m, reps = 0.1, 0.1, 300, 400
    k = conformal_rank(m, alpha, delta)
    # With uniform scores, coverage given the calibration is the k-th order statistic itself.
    coverage = np.sort(rng.uniform(size=(reps, m)), axis=1)[:, k - 1]
    bad = np.mean(coverage < 1 - alpha)
    assert bad <= delta + 3 * np.sqrt(delta * (1 - delta) / reps)
    plain = np.sort(rng.uniform(size=(reps, m)), axis=1)[:, conformal_rank(m, alpha) - 1]
    assert np.mean(plain < 1 - alpha) > bad  # the marginal rank fails more often


def test_pac_minimum_size_is_tight():
    m = min_calibration_size(0.01, delta=0.1)
    assert m == int(np.ceil(np.log(0.1) / np.log(0.99)))
    conformal_quantile(np.zeros(m), 0.01, delta=0.1)
    with pytest.raises(ValueError, match=f"m={m}"):
        conformal_quantile(np.zeros(m - 1), 0.01, delta=0.1)


def test_mondrian_quantiles_are_per_bin_conformal_quantiles():
    from rrise.calibration import mondrian_quantiles
    from rrise.scores import confidence_bin

    rng = np.random.default_rng(5)
    s = rng.uniform(0.5, 1.0, 1000)
    e = rng.normal(size=1000) * (1.5 - s)  # less confident → larger scores
    edges = (0.7, 0.9)
    q = mondrian_quantiles(e, s, edges, 0.05)
    which = confidence_bin(s, edges)
    for g in range(3):
        assert q[g] == conformal_quantile(e[which == g], 0.05)
    assert q[2] < q[0]


def test_mondrian_refuses_a_bin_with_too_few_inputs_and_names_it():
    from rrise.calibration import mondrian_quantiles

    s = np.r_[np.full(200, 0.6), np.full(50, 0.99)]
    with pytest.raises(ValueError, match=r"confidence bin 1 .*holds 50 .*at least 99"):
        mondrian_quantiles(np.zeros(250), s, (0.9,), 0.01)


def test_binned_calibration_uses_each_inputs_bin():
    c = cal(0.8, bin_edges=(0.99,), bin_quantiles=(0.8, 0.1))
    low = certify_from_probs(probs_with_top(0.95), c)
    high = certify_from_probs(probs_with_top(0.999), c)
    assert low.radius == pytest.approx(SIGMA * (norm.ppf(0.95) - 0.8))
    assert high.radius == pytest.approx(SIGMA * (norm.ppf(0.999) - 0.1))
    d = c.to_dict()
    assert Calibration(**d) == c


def test_infinite_bin_quantile_round_trips_through_json_and_abstains():
    import json

    c = cal(0.8, bin_edges=(0.9,), bin_quantiles=(np.inf, 0.2))
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert d["bin_quantiles"] == [None, 0.2]
    back = Calibration(**d)
    assert back == c
    assert certify_from_probs(probs_with_top(0.85), back).abstain


def test_bad_bins_are_refused():
    with pytest.raises(ValueError, match="bin quantiles"):
        cal(0.5, n_mc=100, m=100, bin_edges=(0.9,), bin_quantiles=(0.5,))
    with pytest.raises(ValueError, match="increase"):
        cal(0.5, n_mc=100, m=100, bin_edges=(0.9, 0.8), bin_quantiles=(0.5, 0.4, 0.3))
