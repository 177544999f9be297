"""How long a build will take, from rates measured on this machine, and the sizes that fit a time
budget (``rrise build --budget-minutes``).

Two rates decide almost all of a build's time (measured on the user's models by
:func:`rrise.calibrate.building.measure_rates`): noisy base-model evaluations per second (every
Monte Carlo stage, and the surrogate's fresh targets) and the seconds of one surrogate training step
(forward, backward and optimizer on one batch). :func:`stage_seconds` turns a profile and the split
sizes into seconds per stage of `rrise build`; it leaves out what is small beside them (rule fitting,
the report, the bundle: the last two took 24 s of a 12-minute build on a Fashion-MNIST model) and
the base model's import.

:func:`size_to_budget` scales the two sizes that set both cost and quality together, by one factor
``f``: the surrogate's fresh-target ``steps`` (its fit to the smoothed classifier), and the draws
per calibration and test input, ``N_cal = n`` (kept equal, so that neither method's largest
certifiable radius is capped below the other's; docs/CERTIFICATE.md). ``f`` runs from a floor
(:data:`MIN_STEPS`, :data:`MIN_DRAWS`) to the full profile's sizes, and the largest ``f`` whose
estimate fits the budget wins. Split sizes (m, test inputs) follow the data, not the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .profiles import PROFILES, Profile

__all__ = [
    "HARD_PROBE_DRAWS",
    "MIN_DRAWS",
    "MIN_STEPS",
    "Rates",
    "SplitSizes",
    "Sizing",
    "monte_carlo_evaluations",
    "size_to_budget",
    "stage_seconds",
    "training_seconds",
]

MIN_STEPS = 50  # fewer fresh-target steps leave the surrogate barely moved from its start
MIN_DRAWS = 500  # N_cal = n below this caps every radius near σ·Φ⁻¹(0.001^(1/500)) ≈ 2.2σ
HARD_PROBE_DRAWS = 16  # draws per pool image that find hard examples (fit.py's probe)
_BISECTIONS = 40


@dataclass(frozen=True)
class Rates:
    """Measured on this machine: noisy base-model ``evaluations_per_s``, and ``train_step_s``
    seconds per surrogate training step on a batch of ``train_batch`` images."""

    evaluations_per_s: float
    train_step_s: float
    train_batch: int = 128

    def __post_init__(self) -> None:
        if not (self.evaluations_per_s > 0 and self.train_step_s > 0 and self.train_batch > 0):
            raise ValueError(f"rates must be positive, got {self}")


@dataclass(frozen=True)
class SplitSizes:
    """How many inputs each split holds; ``pool``: the images fresh targets are drawn from (None
    when unknown: taken as at least one batch, and the hard-example probe is not counted)."""

    targets: int
    selection: int
    rules: int
    calibration: int
    test: int
    pool: int | None = None

    @classmethod
    def of(cls, splits: Mapping[str, Any], pool: int | None = None) -> SplitSizes:
        """From a work folder's split indices (``Workdir.splits()``)."""
        return cls(
            pool=pool, **{k: len(splits[k]) for k in ("targets", "selection", "rules", "calibration", "test")}
        )


def monte_carlo_evaluations(prof: Profile, sizes: SplitSizes) -> dict[str, int]:
    """Base-model evaluations per stage, every stage counted as if none had run."""
    pool = prof.fresh_batch if sizes.pool is None else sizes.pool
    batch = min(prof.fresh_batch, pool)
    fresh = (prof.steps * prof.draws + prof.distil_steps) * batch if prof.steps else 0
    probe = HARD_PROBE_DRAWS * (sizes.pool or 0) if prof.steps and prof.hard_fraction > 0 else 0
    return {
        "targets": (sizes.targets + sizes.selection) * prof.target_draws,
        "train-surrogate": fresh + probe,
        "select-rule": sizes.rules * prof.n_cal if prof.n_rule else 0,
        # with cap draws, at most every calibration input gets N₂ more (only those at the cap do)
        "calibrate": sizes.calibration * (prof.n_cal + prof.cap_draws),
        "certify": sizes.test * (prof.n0 + prof.n),
    }


def _training_steps(prof: Profile, sizes: SplitSizes, rates: Rates, store_epochs: int) -> int:
    """The surrogate's training steps: fresh targets (``steps``, after ``distil_steps`` steps on
    single votes) or epochs over the fixed store."""
    if prof.steps:
        return prof.distil_steps + prof.steps
    return store_epochs * math.ceil(sizes.targets / rates.train_batch)


def training_seconds(prof: Profile, sizes: SplitSizes, rates: Rates, store_epochs: int) -> float:
    """Estimated seconds of the surrogate's training steps (its draws not included)."""
    return _training_steps(prof, sizes, rates, store_epochs) * rates.train_step_s


def stage_seconds(prof: Profile, sizes: SplitSizes, rates: Rates, store_epochs: int) -> dict[str, float]:
    """Estimated seconds per stage: evaluations at ``rates.evaluations_per_s`` plus training steps
    at ``rates.train_step_s`` (``store_epochs``: the epochs a fixed-store fit takes)."""
    seconds = {k: v / rates.evaluations_per_s for k, v in monte_carlo_evaluations(prof, sizes).items()}
    seconds["train-surrogate"] += training_seconds(prof, sizes, rates, store_epochs)
    return seconds


@dataclass(frozen=True)
class Sizing:
    """What :func:`size_to_budget` chose: the profile ``overrides``, the scale ``factor`` and the
    estimated ``seconds`` per stage."""

    overrides: dict[str, int]
    factor: float
    seconds: dict[str, float]

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def _scaled(prof: Profile, f: float) -> dict[str, int]:
    """The profile's steps and ``N_cal = n`` scaled by ``f``, each clamped to [floor, full]."""
    full = PROFILES["full"]

    def clamp(value: float, low: int, high: int) -> int:
        return int(min(max(round(value), min(low, high)), high))

    draws = clamp(prof.n_cal * f / 100, MIN_DRAWS // 100, max(full.n_cal, prof.n_cal) // 100) * 100
    out = {"n_cal": draws, "n": draws}
    if prof.steps:
        out["steps"] = clamp(prof.steps * f, min(MIN_STEPS, prof.steps), max(full.steps, prof.steps))
        if prof.distil_steps:  # the first phase keeps its share of the steps
            out["distil_steps"] = max(1, round(prof.distil_steps * out["steps"] / prof.steps))
    return out


def size_to_budget(
    prof: Profile, sizes: SplitSizes, rates: Rates, minutes: float, store_epochs: int
) -> Sizing:
    """The largest sizes (one factor on ``steps`` and ``N_cal = n``, see the module) whose estimated
    build time fits ``minutes``. ValueError naming ``--budget-minutes`` (and the budget the smallest
    sizes need) when even they do not fit."""
    if not (isinstance(minutes, int | float) and math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"--budget-minutes must be a positive number of minutes, got {minutes!r}")

    def at(f: float) -> Sizing:
        overrides = _scaled(prof, f)
        return Sizing(overrides, f, stage_seconds(replace(prof, **overrides), sizes, rates, store_epochs))

    lo, hi = 1e-6, max(PROFILES["full"].n_cal / prof.n_cal, PROFILES["full"].steps / max(prof.steps, 1), 1.0)
    smallest = at(lo)
    if smallest.total_s > 60 * minutes:
        raise ValueError(
            f"--budget-minutes {minutes:g} is too short: the smallest sizes (steps {MIN_STEPS}, N_cal = n = "
            f"{MIN_DRAWS}) need about {math.ceil(smallest.total_s / 60)} min at the measured rates "
            f"({rates.evaluations_per_s:,.0f} base-model evaluations/s); raise it"
        )
    if at(hi).total_s <= 60 * minutes:
        return at(hi)
    for _ in range(_BISECTIONS):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if at(mid).total_s <= 60 * minutes else (lo, mid)
    return at(lo)
