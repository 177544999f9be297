"""The anytime-valid bound of rrise.sequential: its level under optional stopping (by simulation, with
a deliberately invalid bound in the same harness to show the check can fail), its power, its shape and
the refusal of bad options."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from rrise.sequential import (
    DEFAULT_PRIOR,
    STOP_BUDGET,
    STOP_DEADLINE,
    STOP_FUTILITY,
    STOP_SUCCESS,
    ConfidenceSequence,
    SequentialOptions,
    batch_schedule,
    check_required_radius,
    chernoff_upper_bound,
    fallback_rungs,
    largest_certifiable_radius,
    lower_bound,
    radius_from_lower_bound,
    required_probability,
    sequential_test,
    upper_bound,
)
from rrise.stats import clopper_pearson_lower, clopper_pearson_upper, norm_cdf, norm_ppf

SEQUENCES = 20_000
LOOK_ALPHA = 0.05  # large enough that 20,000 sequences resolve the crossing rate around it
BATCH, LOOKS = 10, 40


def _crossing_rate(bound, p: float, seed: int, p_true: float | None = None) -> float:
    """The share of SEQUENCES Bernoulli(p_true) sequences (default p) whose bound, looked at after
    every batch, ever exceeds p: the error of a user who stops the first time it does (the worst
    optional stopping)."""
    rng = np.random.default_rng(seed)
    k = np.zeros(SEQUENCES, dtype=np.int64)
    crossed = np.zeros(SEQUENCES, dtype=bool)
    for look in range(1, LOOKS + 1):
        k += rng.binomial(BATCH, p if p_true is None else p_true, size=SEQUENCES)
        crossed |= bound(k, look * BATCH) > p
    return float(crossed.mean())


def _tolerance(rate: float) -> float:
    return 3.0 * math.sqrt(rate * (1.0 - rate) / SEQUENCES)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_level_holds_under_optional_stopping(p):
    rate = _crossing_rate(lambda k, n: lower_bound(k, n, LOOK_ALPHA), p, seed=int(p * 1000))
    assert rate <= LOOK_ALPHA + _tolerance(LOOK_ALPHA), f"p = {p}: crossing rate {rate:.4f} > α"


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_the_harness_catches_a_fixed_n_bound_rechecked_after_every_batch(p):
    """Clopper–Pearson at fixed n is exact for one look; looked at 40 times it is not a 95% bound."""
    rate = _crossing_rate(lambda k, n: clopper_pearson_lower(k, n, LOOK_ALPHA), p, seed=int(p * 1000))
    assert rate > LOOK_ALPHA + _tolerance(LOOK_ALPHA) + 0.02, f"p = {p}: rate {rate:.4f}"


def _bernoulli_draws(p: float, seed: int):
    rng = np.random.default_rng(seed)
    return lambda m: int(rng.binomial(m, p))


def test_power_at_p_099_against_required_09():
    options = SequentialOptions(budget=10_000, alpha=0.001, batch_size=32)
    results = [sequential_test(_bernoulli_draws(0.99, s), 0.9, options) for s in range(200)]
    assert all(r.stop == STOP_SUCCESS for r in results)
    assert all(r.lower_bound >= 0.9 for r in results)
    draws = np.array([r.draws for r in results])
    assert draws.mean() <= 320, draws.mean()  # 134 measured (seeds 0-199); about 110 draw by draw


@pytest.mark.parametrize("p", [0.5, 0.99])
def test_upper_end_used_for_futility_holds_its_level(p):
    """Futility gives a frame up when the sequence's upper end falls below the requirement: for a
    frame whose p meets it, that happens with probability at most the futility level."""
    rate = _crossing_rate(lambda k, n: -upper_bound(k, n, LOOK_ALPHA), -p, seed=int(p * 1000) + 1, p_true=p)
    assert rate <= LOOK_ALPHA + _tolerance(LOOK_ALPHA), f"p = {p}: crossing rate {rate:.4f} > α"


def test_upper_end_mirrors_the_lower_end():
    k = np.arange(0, 501)
    up, low = upper_bound(k, 500, 0.01), lower_bound(k, 500, 0.01)
    assert np.all(low <= k / 500) and np.all(k / 500 <= up) and up[-1] == 1.0
    np.testing.assert_allclose(up, 1 - lower_bound(500 - k, 500, 0.01, DEFAULT_PRIOR[::-1]), atol=0)


def test_futility_gives_up_a_hopeless_frame_early():
    """p = 0.8 can never certify radius σ (it needs p ≥ Φ(1) = 0.841); of a 10⁵ budget it spends a
    few thousand draws, where the all-success rule alone would spend most of it."""
    options = SequentialOptions(budget=100_000, alpha=0.001, batch_size=256)
    results = [sequential_test(_bernoulli_draws(0.8, s), float(norm_cdf(1.0)), options) for s in range(20)]
    assert all(r.stop == STOP_FUTILITY and r.lower_bound < 0.8 for r in results)
    assert max(r.draws for r in results) < 10_000


def test_futility_when_the_budget_left_cannot_lift_the_bound():
    """p = 0.6 with 200 draws cannot reach 0.9: it stops once even the rest of the budget at the
    Chernoff upper end of p would leave the bound below 0.9, which the rule's own terms confirm."""
    options = SequentialOptions(budget=200, alpha=0.001, batch_size=50, futility_alpha=0.01)
    r = sequential_test(_bernoulli_draws(0.6, 0), 0.9, options)
    assert r.stop == STOP_FUTILITY and r.draws < options.budget and r.lower_bound < 0.9
    u = chernoff_upper_bound(r.successes, r.draws, options.futility_alpha)
    cs = ConfidenceSequence(0.001)
    cs.update(r.successes, r.draws)
    assert cs.reachable(options.budget - r.draws, u) < 0.9


def test_chernoff_upper_bound_is_the_kl_root_and_holds_at_fixed_n():
    """The bound solves n·KL(k/n ‖ q) = log(1/α) (scipy's root, 1e-9), is never below Clopper–
    Pearson's exact upper bound, and covers p at one fixed n with probability ≥ 1 − α."""
    from scipy.optimize import brentq

    def kl(a: float, b: float) -> float:
        return (a * np.log(a / b) if a else 0.0) + (1 - a) * np.log((1 - a) / (1 - b))

    for k, n, a in ((0, 10, 0.05), (37, 50, 0.01), (995, 1_000, 0.001), (9_800, 10_000, 0.2)):
        root = brentq(
            lambda q, k=k, n=n, a=a: n * kl(k / n, q) - np.log(1 / a), k / n + 1e-15, 1 - 1e-15, xtol=1e-14
        )
        assert chernoff_upper_bound(k, n, a) == pytest.approx(root, abs=1e-9)
        assert chernoff_upper_bound(k, n, a) >= clopper_pearson_upper(k, n, a) - 1e-12
    assert chernoff_upper_bound(5, 5, 0.01) == 1.0 == chernoff_upper_bound(0, 0, 0.01)
    k = np.random.default_rng(3).binomial(200, 0.95, size=SEQUENCES)
    misses = np.mean([chernoff_upper_bound(int(j), 200, LOOK_ALPHA) < 0.95 for j in k])
    assert misses <= LOOK_ALPHA
    with pytest.raises(ValueError, match="successes <= trials"):
        chernoff_upper_bound(3, 2, 0.01)


def test_batches_double_from_the_first_to_the_batch_size():
    assert batch_schedule(SequentialOptions(budget=1_000, batch_size=256)) == [64, 128, 256, 256, 256, 40]
    assert batch_schedule(SequentialOptions(budget=300, batch_size=100, first_batch=500)) == [100, 100, 100]
    assert batch_schedule(SequentialOptions(budget=10, batch_size=10, first_batch=1)) == [1, 2, 4, 3]


def test_a_requirement_above_the_cap_is_futile_before_any_draw():
    options = SequentialOptions(budget=1_000, alpha=0.001, batch_size=100)
    cap = lower_bound(1_000, 1_000, 0.001)

    def never(m: int) -> int:
        raise AssertionError("no draw should be spent")

    r = sequential_test(never, min(0.999999, cap + 1e-4), options)
    assert (r.stop, r.draws, r.lower_bound) == (STOP_FUTILITY, 0, 0.0)


def test_budget_is_spent_exactly_with_a_partial_last_batch():
    """Batches double from the first one up to the batch size; the last one is cut to the budget."""
    options = SequentialOptions(budget=1_050, alpha=0.01, batch_size=100, first_batch=25)
    asked = []
    rng = np.random.default_rng(1)

    def draw(m: int) -> int:
        asked.append(m)
        return int(rng.binomial(m, 0.8))

    r = sequential_test(draw, None, options)
    assert r.stop == STOP_BUDGET and r.draws == 1_050 and sum(asked) == 1_050
    assert asked == batch_schedule(options) == [25, 50] + [100] * 9 + [75]
    assert 0.5 < r.lower_bound < r.successes / r.draws


def test_deadline_with_an_injected_clock():
    """Each batch takes 10 ms of a fake clock; with 35 ms, the fourth batch would end at 40 ms."""
    now = [100.0]

    def draw(m: int) -> int:
        now[0] += 0.010
        return m // 2

    options = SequentialOptions(budget=10_000, deadline_ms=35, alpha=0.01, batch_size=100, first_batch=100)
    r = sequential_test(draw, None, options, clock=lambda: now[0])
    assert r.stop == STOP_DEADLINE and r.draws == 300
    assert r.elapsed_s == pytest.approx(0.030)


def test_deadline_scales_the_next_batch_by_its_size():
    """Each draw takes 0.1 ms: batches of 25, 50, 100, 100 end at 2.5, 7.5, 17.5 and 27.5 ms; the next
    100 would end at 37.5 ms, past the 35 ms deadline, so it is not started."""
    now = [0.0]

    def draw(m: int) -> int:
        now[0] += 1e-4 * m
        return m // 2

    options = SequentialOptions(budget=10_000, deadline_ms=35, alpha=0.01, batch_size=100, first_batch=25)
    r = sequential_test(draw, None, options, clock=lambda: now[0])
    assert (r.stop, r.draws) == (STOP_DEADLINE, 275)
    assert r.elapsed_s == pytest.approx(0.0275)


def test_success_on_the_last_batch_reports_success():
    options = SequentialOptions(budget=200, alpha=0.01, batch_size=100)
    needed = lower_bound(200, 200, 0.01) - 1e-9
    r = sequential_test(lambda m: m, needed, options)
    assert r.stop == STOP_SUCCESS and r.draws == 200


def test_bound_is_monotone_and_never_tighter_than_clopper_pearson_at_fixed_n():
    """At one fixed n the mixture is a valid bound non-decreasing in k, so it cannot beat Clopper–
    Pearson anywhere; it rises with the successes and along an all-success path (which the futility
    rule relies on)."""
    for alpha in (0.001, 0.05):
        for n in (1, 10, 100, 2_000):
            k = np.arange(n + 1)
            lb = lower_bound(k, n, alpha)
            assert np.all(np.diff(lb) >= 0) and lb[0] == 0.0
            assert np.all(lb <= clopper_pearson_lower(k, n, alpha) + 1e-12)
            assert np.all(lb <= k / n)
        for k0, n0 in ((0, 0), (30, 100), (950, 1_000)):
            j = np.arange(3_000)
            assert np.all(np.diff(lower_bound(k0 + j, n0 + j, alpha)) >= 0)


def test_scalar_and_vector_paths_agree():
    k = np.random.default_rng(3).binomial(500, 0.95, size=200)
    vector = lower_bound(k, 500, 0.001)
    scalar = np.array([lower_bound(int(x), 500, 0.001) for x in k])
    np.testing.assert_allclose(scalar, vector, rtol=0, atol=1e-14)


def test_confidence_sequence_keeps_its_running_maximum():
    cs = ConfidenceSequence(0.01)
    first = cs.update(100, 100)
    after_failures = cs.update(0, 100)  # on its own the bound would drop below 1/2
    assert after_failures == first == cs.lower_bound()
    assert lower_bound(100, 200, 0.01) < first
    assert (cs.successes, cs.trials) == (100, 200)
    with pytest.raises(ValueError, match="successes <= trials"):
        cs.update(5, 4)


def test_radius_helpers_and_largest_certifiable_radius():
    assert radius_from_lower_bound(0.5, 0.25) == 0.0
    assert radius_from_lower_bound(0.99, 0.25) == pytest.approx(0.25 * norm_ppf(0.99))
    assert required_probability(0.25 * norm_ppf(0.99), 0.25) == pytest.approx(0.99)
    options = SequentialOptions(budget=10_000, alpha=0.001)
    top = largest_certifiable_radius(0.25, options)
    cp_top = 0.25 * norm_ppf(0.001 ** (1 / 10_000))
    assert 0.95 * cp_top < top < cp_top  # the price of anytime validity at the cap, a few percent
    assert check_required_radius(top * 0.999, 0.25, options) <= lower_bound(10_000, 10_000, 0.001)
    with pytest.raises(ValueError, match=r"--require-radius 2 is above the largest radius 0\.7\d+"):
        check_required_radius(2.0, 0.25, options)
    with pytest.raises(ValueError, match="--require-radius must be a positive number"):
        check_required_radius(-1.0, 0.25, options)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"budget": 1_000, "alpha": 0.0}, "--mc-alpha"),
        ({"budget": 1_000, "alpha": 1.0}, "--mc-alpha"),
        ({"budget": 1_000, "alpha": float("nan")}, "--mc-alpha"),
        ({"budget": 100, "batch_size": 256}, "--mc-budget"),
        ({"budget": 0}, "--mc-budget"),
        ({"budget": 1_000, "deadline_ms": 0}, "--mc-deadline-ms"),
        ({"budget": 1_000, "deadline_ms": float("inf")}, "--mc-deadline-ms"),
        ({"budget": 1_000, "futility_alpha": 0.0}, "the futility level"),
        ({"budget": 1_000, "first_batch": 0}, "the first batch"),
    ],
)
def test_bad_options_are_refused_in_one_line_naming_the_option(kwargs, option):
    with pytest.raises(ValueError) as info:
        SequentialOptions(**kwargs)
    message = str(info.value)
    assert message.startswith(option) and "\n" not in message


def test_bad_prior_and_counts_are_refused():
    with pytest.raises(ValueError, match="prior"):
        lower_bound(1, 2, 0.01, prior=(0.0, 1.0))
    with pytest.raises(ValueError, match="successes <= trials"):
        lower_bound(3, 2, 0.01)
    with pytest.raises(ValueError, match="required probability"):
        sequential_test(lambda m: m, 1.5, SequentialOptions(budget=100, batch_size=10))
    assert DEFAULT_PRIOR[0] > 0 and DEFAULT_PRIOR[1] > 0


def test_imports_neither_scipy_nor_torch():
    code = (
        "import sys, rrise.sequential as s; s.lower_bound(5, 9, 0.01); s.lower_bound([5], 9, 0.01); "
        "bad = [m for m in ('scipy', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_down_certifies_half_the_radius_where_the_full_one_is_out_of_reach():
    """p = 0.9 cannot certify 2σ (it needs Φ(2) = 0.977): stopping there leaves a bound below what
    one σ needs; stepping down to Φ(1) = 0.841 certifies one σ on nearly every frame."""
    required = float(norm_cdf(2.0))
    plain = SequentialOptions(budget=10_000, alpha=0.001, batch_size=64)
    stepped = SequentialOptions(budget=10_000, alpha=0.001, batch_size=64, step_down=True)
    stop = [sequential_test(_bernoulli_draws(0.9, s), required, plain) for s in range(100)]
    step = [sequential_test(_bernoulli_draws(0.9, s), required, stepped) for s in range(100)]
    assert all(r.stop == STOP_FUTILITY for r in stop)
    assert np.mean([r.lower_bound >= norm_cdf(1.0) for r in stop]) < 0.2
    assert np.mean([r.stop == STOP_SUCCESS and r.lower_bound >= norm_cdf(1.0) for r in step]) >= 0.95
    assert all(r.lower_bound < norm_cdf(2.0) for r in step)


def test_step_down_ends_at_any_radius_and_then_futility():
    stepped = SequentialOptions(budget=4_096, alpha=0.001, batch_size=64, step_down=True)
    near_half = [sequential_test(_bernoulli_draws(0.7, s), float(norm_cdf(2.0)), stepped) for s in range(50)]
    assert np.mean([r.stop == STOP_SUCCESS and 0.5 < r.lower_bound < norm_cdf(1.0) for r in near_half]) >= 0.9
    coin = sequential_test(_bernoulli_draws(0.3, 0), float(norm_cdf(2.0)), stepped)
    assert coin.stop == STOP_FUTILITY and coin.lower_bound < 0.5


def test_step_down_keeps_the_level():
    """Whatever rung it stops at, the bound exceeds the true p at most at rate α (α = 0.05 so that
    1,000 frames resolve it). The crossing-rate test above covers every stopping rule at once; this
    one checks that the step-down test reports that same running bound."""
    p = 0.85
    stepped = SequentialOptions(budget=512, alpha=0.05, batch_size=64, step_down=True)
    results = [sequential_test(_bernoulli_draws(p, s), float(norm_cdf(2.0)), stepped) for s in range(1_000)]
    rate = np.mean([r.lower_bound > p for r in results])
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 1_000), rate


def test_fallback_rungs_halve_the_radius_then_ask_for_any():
    rungs = fallback_rungs(float(norm_cdf(2.0)))
    assert rungs[1] == pytest.approx(norm_cdf(1.0)) and 0.5 < rungs[2] < 0.5 + 1e-12
    assert fallback_rungs(1.0)[0] == 1.0 and fallback_rungs(1.0)[-1] < 0.5 + 1e-12
    assert len(fallback_rungs(math.nextafter(0.5, 1.0))) == 1


def test_a_stated_stopping_rule_round_trips_and_an_unknown_one_is_refused():
    from rrise.sequential import stated_stopping, with_stated_stopping

    mine = SequentialOptions(budget=2_048, prior=(3.0, 0.2), futility_alpha=0.02, first_batch=16)
    stated = stated_stopping(mine)
    assert stated == {
        "bound": "beta-binomial mixture",
        "prior": [3.0, 0.2],
        "futility": "chernoff projection",
        "futility_alpha": 0.02,
        "first_batch": 16,
    }
    assert with_stated_stopping(SequentialOptions(budget=2_048), stated) == mine
    assert with_stated_stopping(mine, None) is mine
    with pytest.raises(ValueError, match="adaptive.sequential.futility is 'upper end'"):
        with_stated_stopping(mine, {**stated, "futility": "upper end"})
