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
