"""The scalar statistics against scipy and statsmodels."""

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from rrise.stats import (
    binom_test_two_sided,
    clopper_pearson_lower,
    clopper_pearson_upper,
    norm_cdf,
    norm_ppf,
)


def test_norm_ppf_matches_scipy_across_the_range():
    p = np.concatenate([np.linspace(1e-12, 1 - 1e-12, 20001), np.logspace(-300, -1, 300)])
    np.testing.assert_allclose(norm_ppf(p), norm.ppf(p), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(norm_ppf(1 - p[-300:]), norm.ppf(1 - p[-300:]), rtol=1e-12)


def test_norm_ppf_edges_and_scalars():
    assert norm_ppf(0.5) == 0.0
    assert norm_ppf(0.0) == -np.inf and norm_ppf(1.0) == np.inf
    assert np.isnan(norm_ppf(-0.1)) and np.isnan(norm_ppf(1.5))
    assert isinstance(norm_ppf(0.9), float)


def test_norm_cdf_matches_scipy_and_inverts_ppf():
    x = np.linspace(-37, 8, 4001)
    np.testing.assert_allclose(norm_cdf(x), norm.cdf(x), rtol=1e-12, atol=0)
    p = np.linspace(0.001, 0.999, 999)
    np.testing.assert_allclose(norm_cdf(norm_ppf(p)), p, rtol=1e-14)


@pytest.mark.parametrize("n", [1, 10, 100, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_matches_statsmodels(n, alpha):
    k = np.unique(np.linspace(0, n, 25).astype(int))
    # statsmodels' two-sided interval at level 2α has the one-sided α bounds as its ends.
    lo, hi = proportion_confint(k, n, alpha=2 * alpha, method="beta")
    np.testing.assert_allclose(clopper_pearson_lower(k, n, alpha), np.nan_to_num(lo), atol=1e-12)
    np.testing.assert_allclose(clopper_pearson_upper(k, n, alpha), np.nan_to_num(hi, nan=1.0), atol=1e-12)


def test_clopper_pearson_edge_cases():
    assert clopper_pearson_lower(0, 100, 0.001) == 0.0
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))
    assert clopper_pearson_upper(100, 100, 0.001) == 1.0
    assert clopper_pearson_upper(0, 100, 0.001) == pytest.approx(1 - 0.001 ** (1 / 100))
    with pytest.raises(ValueError):
        clopper_pearson_lower(11, 10, 0.05)
    with pytest.raises(ValueError):
        clopper_pearson_lower(5, 10, 1.5)


def test_clopper_pearson_lower_covers_at_its_level():
    rng = np.random.default_rng(0)
    p, n, alpha = 0.8, 50, 0.05
    k = rng.binomial(n, p, size=20_000)
    miss = np.mean(clopper_pearson_lower(k, n, alpha) > p)
    assert miss <= alpha


def test_binom_test_matches_scipy():
    for k, n in [(0, 0), (3, 10), (50, 100), (99, 100)]:
        expected = 1.0 if n == 0 else binomtest(k, n, 0.5).pvalue
        assert binom_test_two_sided(k, n) == pytest.approx(expected)
    np.testing.assert_allclose(
        binom_test_two_sided(np.array([3, 50]), np.array([10, 100])),
        [binomtest(3, 10).pvalue, binomtest(50, 100).pvalue],
    )


def test_scalar_fast_paths_match_the_array_paths():
    for p in [1e-300, 1e-10, 0.001, 0.3, 0.5, 0.7, 0.999, 1 - 1e-12]:
        assert norm_ppf(p) == pytest.approx(float(norm_ppf(np.array([p]))[0]), rel=1e-13)
    assert norm_ppf(0.0) == -np.inf and norm_ppf(1.0) == np.inf and np.isnan(norm_ppf(2.0))
    for x in [-30.0, -3.0, 0.0, 1.5, 8.0]:
        assert norm_cdf(x) == pytest.approx(norm.cdf(x), rel=1e-13)
