"""A build's time from measured rates, and the sizes `--budget-minutes` chooses."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from rrise.calibrate.profiles import get_profile
from rrise.calibrate.sizing import (
    MIN_DRAWS,
    MIN_STEPS,
    Rates,
    SplitSizes,
    monte_carlo_evaluations,
    size_to_budget,
    stage_seconds,
)

SIZES = SplitSizes(targets=1_500, selection=500, rules=500, calibration=1_200, test=200, pool=3_000)
RATES = Rates(evaluations_per_s=20_000.0, train_step_s=0.05, train_batch=128)
EPOCHS = 4


def test_the_estimate_is_evaluations_at_the_rate_plus_training_steps() -> None:
    # fresh targets: 400 steps × 128 images × 16 draws; a built-in base's surrogate does not distil first
    quick = replace(get_profile("quick"), distil_steps=0)
    evals = monte_carlo_evaluations(quick, SIZES)
    assert evals == {
        "targets": (1_500 + 500) * 64,
        "train-surrogate": 400 * 128 * 16,
        "select-rule": 500 * 1_000,
        "calibrate": 1_200 * 1_000,
        "certify": 200 * (50 + 1_000),
    }
    seconds = stage_seconds(quick, SIZES, RATES, EPOCHS)
    assert seconds["train-surrogate"] == pytest.approx(400 * 128 * 16 / 20_000 + 400 * 0.05)
    store = stage_seconds(replace(quick, steps=0), SIZES, RATES, EPOCHS)["train-surrogate"]
    assert store == pytest.approx(EPOCHS * math.ceil(1_500 / 128) * 0.05)  # epochs over the fixed store
    assert set(seconds) == set(evals)  # the stages `rrise build` runs (no baseline)
    assert seconds["calibrate"] == pytest.approx(1_200_000 / 20_000)
    # the hard-example probe (16 draws on every pool image) counts where the profile draws hard examples
    hard = monte_carlo_evaluations(replace(quick, hard_fraction=0.5), SIZES)["train-surrogate"]
    assert hard == 400 * 128 * 16 + 16 * 3_000
    # a pool smaller than a batch: every pool image every step
    assert monte_carlo_evaluations(quick, replace(SIZES, pool=100))["train-surrogate"] == 400 * 100 * 16


def test_the_estimate_counts_the_distil_first_steps_and_the_budget_keeps_their_share() -> None:
    quick = replace(get_profile("quick"), distil_steps=400)  # a copy of your own model's default
    plain = replace(quick, distil_steps=0)
    evals = monte_carlo_evaluations(quick, SIZES)["train-surrogate"]
    assert evals == 400 * 128 * 16 + 400 * 128 * 1  # one vote per image a distil step
    seconds = stage_seconds(quick, SIZES, RATES, EPOCHS)["train-surrogate"]
    assert seconds == pytest.approx(evals / 20_000 + (400 + 400) * 0.05)
    assert seconds > stage_seconds(plain, SIZES, RATES, EPOCHS)["train-surrogate"]
    # a fixed-store fit has no distil phase: nothing counted
    assert monte_carlo_evaluations(replace(quick, steps=0), SIZES)["train-surrogate"] == 0
    s = size_to_budget(quick, SIZES, RATES, 2.0, EPOCHS)
    assert s.overrides["distil_steps"] == round(400 * s.overrides["steps"] / 400)
    assert "distil_steps" not in size_to_budget(plain, SIZES, RATES, 2.0, EPOCHS).overrides


def test_the_budget_gets_the_largest_sizes_that_fit() -> None:
    quick = get_profile("quick")
    at_quick = sum(stage_seconds(quick, SIZES, RATES, EPOCHS).values()) / 60
    chosen = []
    for minutes in (0.5 * at_quick, at_quick, 2 * at_quick, 5 * at_quick):
        s = size_to_budget(quick, SIZES, RATES, minutes, EPOCHS)
        assert s.total_s <= 60 * minutes
        assert s.overrides["n_cal"] == s.overrides["n"] and s.overrides["n_cal"] % 100 == 0
        # the largest: a few percent more of both sizes would not fit (unless already at the full sizes)
        steps = math.ceil(s.overrides["steps"] * 1.05) + 1
        bigger = replace(quick, steps=steps, distil_steps=steps, n_cal=s.overrides["n"] + 300)  # 1:1 in quick
        bigger = replace(bigger, n=bigger.n_cal)
        assert sum(stage_seconds(bigger, SIZES, RATES, EPOCHS).values()) > 60 * minutes
        chosen.append((s.overrides["steps"], s.overrides["n"]))
    assert chosen == sorted(chosen)  # more time, never smaller sizes
    assert chosen[1] == pytest.approx((400, 1_000), rel=0.05)  # the profile's own time: about its own sizes


def test_sizes_stay_between_the_floor_and_the_full_profile() -> None:
    quick, full = get_profile("quick"), get_profile("full")
    huge = size_to_budget(quick, SIZES, RATES, 1e6, EPOCHS)
    share = quick.distil_steps / quick.steps  # the distil-first phase keeps its share of the steps
    assert huge.overrides == {
        "steps": full.steps, "distil_steps": round(share * full.steps), "n_cal": full.n_cal, "n": full.n
    }  # fmt: skip
    floor = size_to_budget(
        quick, SIZES, replace(RATES, evaluations_per_s=1e9, train_step_s=1e-9), 1e-3, EPOCHS
    )
    assert floor.overrides["steps"] >= MIN_STEPS and floor.overrides["n"] >= MIN_DRAWS
    # a fixed-store profile (no fresh steps) scales only the draws
    store = size_to_budget(get_profile("smoke"), SIZES, RATES, 30, EPOCHS)
    assert set(store.overrides) == {"n_cal", "n"}


@pytest.mark.parametrize("minutes", [0.01, -1.0, 0.0, math.nan, math.inf])
def test_a_budget_too_short_or_not_a_number_is_refused_naming_the_flag(minutes: float) -> None:
    with pytest.raises(ValueError, match="--budget-minutes") as err:
        size_to_budget(get_profile("quick"), SIZES, RATES, minutes, EPOCHS)
    if minutes == 0.01:
        smallest = replace(get_profile("quick"), steps=MIN_STEPS, n_cal=MIN_DRAWS, n=MIN_DRAWS)
        need = math.ceil(sum(stage_seconds(smallest, SIZES, RATES, EPOCHS).values()) / 60)
        assert f"need about {need} min" in str(err.value)
