"""An anytime-valid lower confidence bound on a Bernoulli mean, and the sequential test built on it.

Adaptive certification (docs/CERTIFICATE.md, "Adaptive certification") spends base-model draws on a
frame until its class probability ``p`` is shown to exceed what a required radius needs, or the
budget or the deadline runs out. A fixed-n bound (Clopper–Pearson) looked at after every batch is
no longer a ``1 − α`` bound; this module's bound is valid at every sample size at once, so any
stopping rule keeps it.

The bound: Robbins' beta-binomial mixture. For a prior ``Beta(a, b)`` on the alternative ``q``,

    M_n(p0) = ∫ Π_i (q/p0)^X_i ((1−q)/(1−p0))^(1−X_i) dπ(q) = B(a+k, b+n−k) / (B(a, b) p0^k (1−p0)^(n−k))

is a nonnegative martingale with mean 1 when the draws are Bernoulli(p0), so by Ville's inequality
``P(∃ n: M_n(p) ≥ 1/α) ≤ α``. The bound is ``L_n = inf {p0 : M_n(p0) < 1/α}`` (``M_n`` decreases on
``(0, k/n]``, so that set's lower part is an interval), and its running maximum is reported. Only
``math.lgamma`` and numpy: no scipy.

When to stop is free to choose, and two choices set the cost. Batches grow from ``first_batch``
to ``batch_size`` (doubling), so a frame that is plainly out of reach stops after a few dozen
draws. Futility is cost-aware: a frame stops once even an optimistic remainder of its budget (every
draw left succeeding at the Chernoff upper bound of ``p``, level ``futility_alpha``) could not lift
the bound to the requirement. Neither touches the level: only the bound decides what is certified.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import norm_cdf, norm_ppf

__all__ = [
    "DEFAULT_MC_ALPHA",
    "DEFAULT_FIRST_BATCH",
    "DEFAULT_FUTILITY_ALPHA",
    "DEFAULT_MC_BATCH",
    "DEFAULT_PRIOR",
    "STOP_BUDGET",
    "STOP_DEADLINE",
    "STOP_FUTILITY",
    "STOP_SUCCESS",
    "ConfidenceSequence",
    "SequentialOptions",
    "SequentialResult",
    "batch_schedule",
    "check_required_radius",
    "chernoff_upper_bound",
    "fallback_rungs",
    "largest_certifiable_radius",
    "stated_stopping",
    "with_stated_stopping",
    "lower_bound",
    "radius_from_lower_bound",
    "required_probability",
    "sequential_test",
    "upper_bound",
]

DEFAULT_MC_ALPHA = 0.001
DEFAULT_MC_BATCH = 256
# The first batch of a frame; later ones double up to the batch size. Most routed frames whose p is
# far below the requirement are given up after it (measured on the selection split, docs/RESULTS.md).
DEFAULT_FIRST_BATCH = 64
# The futility rule's level: the upper bound on p it projects the remaining budget with. It costs
# power, never validity: the lower bound holds at every stopping time.
DEFAULT_FUTILITY_ALPHA = 0.01
# Beta(1, 0.1): density 0.1·(1−q)^(−0.9), 93% of its mass above 1/2 and half of it above 0.999, where
# the frames worth certifying at a large radius lie; it costs little at the cap (all draws succeed).
DEFAULT_PRIOR = (1.0, 0.1)

STOP_SUCCESS = "success"  # the bound reached the required probability
STOP_FUTILITY = "futility"  # even an optimistic remainder of the budget cannot lift the bound to it
STOP_BUDGET = "budget"  # every draw of the budget was spent
STOP_DEADLINE = "deadline"  # the next batch would not finish before the deadline

_BISECTIONS = 64
_lgamma = np.frompyfunc(math.lgamma, 1, 1)


def _lbeta(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray(_lgamma(x) + _lgamma(y) - _lgamma(x + y), dtype=np.float64)


def _check_prior(prior: tuple[float, float]) -> tuple[float, float]:
    a, b = (float(v) for v in prior)
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise ValueError(f"the mixture prior Beta(a, b) needs a > 0 and b > 0, got {prior}")
    return a, b


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, int | float) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"--mc-alpha must be in (0, 1), got {alpha}")
    return float(alpha)


def _rejection_level(k: np.ndarray | float, n: np.ndarray | float, prior: tuple[float, float], alpha: float):
    """``log(1/α) − log(B(a+k, b+n−k)/B(a, b))``: ``M_n(p0) ≥ 1/α`` exactly when
    ``−k·log p0 − (n−k)·log(1−p0)`` reaches it."""
    a, b = prior
    log_prior_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    if isinstance(k, float):
        x, y = a + k, b + n - k
        return math.log(1.0 / alpha) - (math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y) - log_prior_norm)
    return math.log(1.0 / alpha) - (_lbeta(a + k, b + n - k) - log_prior_norm)


def _bisect_scalar(k: float, n: float, level: float) -> float:
    lo, hi = 0.0, k / n
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        tail = (n - k) * math.log1p(-mid) if n > k else 0.0
        if -k * math.log(mid) - tail >= level:
            lo = mid
        else:
            hi = mid
    return lo


def lower_bound(
    successes: np.ndarray | int,
    trials: np.ndarray | int,
    alpha: float,
    prior: tuple[float, float] = DEFAULT_PRIOR,
) -> np.ndarray | float:
    """The mixture bound ``L_n = inf {p0 : M_n(p0) < 1/α}`` for ``successes`` of ``trials`` (arrays
    broadcast). Valid simultaneously at every ``trials``: ``P(∃ n: L_n > p) ≤ α``. 0 when
    ``successes`` is 0; never above ``successes/trials``. Computed by bisection and rounded down."""
    alpha = _check_alpha(alpha)
    prior = _check_prior(prior)
    k, n = np.broadcast_arrays(np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64))
    if np.any(k < 0) or np.any(k > n) or np.any(k != np.floor(k)):
        raise ValueError("counts must be integers with 0 <= successes <= trials")
    if k.ndim == 0:  # the per-batch path: the same bisection in plain floats, ~20x faster
        kf, nf = float(k), float(n)
        return _bisect_scalar(kf, nf, _rejection_level(kf, nf, prior, alpha)) if kf > 0 else 0.0
    level = _rejection_level(k, n, prior, alpha)
    lo = np.zeros_like(k)
    hi = np.divide(k, n, out=np.zeros_like(k), where=n > 0)
    fails = n - k
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            tail = np.where(fails > 0, fails * np.log1p(-mid), 0.0)
            rejected = -k * np.log(mid) - tail >= level
            lo = np.where(rejected, mid, lo)
            hi = np.where(rejected, hi, mid)
    return np.where(k > 0, lo, 0.0)


def upper_bound(
    successes: np.ndarray | int,
    trials: np.ndarray | int,
    alpha: float,
    prior: tuple[float, float] = DEFAULT_PRIOR,
) -> np.ndarray | float:
    """The upper end of the same confidence sequence, ``sup {p0 : M_n(p0) < 1/α}``: ``M_n`` is
    unchanged when successes and failures, ``p0`` and ``1 − p0``, ``a`` and ``b`` trade places, so it
    is ``1 −`` :func:`lower_bound` of the failures. ``P(∃ n: U_n < p) ≤ α``."""
    k, n = np.asarray(successes), np.asarray(trials)
    return 1.0 - lower_bound(n - k, n, alpha, (prior[1], prior[0]))


def chernoff_upper_bound(successes: int, trials: int, alpha: float) -> float:
    """The fixed-n Chernoff upper bound ``sup {q ≥ k/n : n·KL(k/n ‖ q) ≤ log(1/α)}`` on a Bernoulli
    mean (``P(bound < p) ≤ α`` at one pre-set ``n``; 1 when every draw succeeded, or with no draws).
    Not a confidence sequence: the futility rule uses it only to decide when to give up, never to
    certify."""
    k, n = int(successes), int(trials)
    if not 0 <= k <= n:
        raise ValueError(f"counts must satisfy 0 <= successes <= trials, got {k} of {n}")
    if k == n:
        return 1.0
    p_hat, level = k / n, math.log(1.0 / _check_alpha(alpha)) / n
    lo, hi = p_hat, 1.0
    for _ in range(_BISECTIONS):
        q = 0.5 * (lo + hi)
        kl = (p_hat * math.log(p_hat / q) if k else 0.0) + (1.0 - p_hat) * math.log((1.0 - p_hat) / (1.0 - q))
        if kl > level:
            hi = q
        else:
            lo = q
    return hi


def radius_from_lower_bound(p_lower: float, sigma: float) -> float:
    """Cohen's radius ``σ·Φ⁻¹(p̲)`` when ``p̲ > 1/2``, else 0 (no certificate)."""
    return float(sigma) * float(norm_ppf(float(p_lower))) if p_lower > 0.5 else 0.0


def required_probability(radius: float, sigma: float) -> float:
    """The lower bound a radius needs: ``Φ(R/σ)``."""
    return float(norm_cdf(float(radius) / float(sigma)))


@dataclass(frozen=True)
class SequentialOptions:
    """How many draws, how long and at what level: ``budget`` (``--mc-budget``, draws per frame),
    ``deadline_ms`` (``--mc-deadline-ms``, None: no deadline), ``alpha`` (``--mc-alpha``),
    ``batch_size`` (draws per batch; a frame's first batch has ``first_batch`` draws and each next
    one twice as many, up to ``batch_size``), the mixture ``prior`` and ``futility_alpha`` (the level
    of the upper bound the futility rule projects with). ``step_down``: when the requirement is
    shown out of reach, aim at the next rung of :func:`fallback_rungs` (half the radius, then any
    radius) instead of stopping. Bad values raise a one-line ValueError naming the option."""

    budget: int
    deadline_ms: float | None = None
    alpha: float = DEFAULT_MC_ALPHA
    batch_size: int = DEFAULT_MC_BATCH
    prior: tuple[float, float] = DEFAULT_PRIOR
    futility_alpha: float = DEFAULT_FUTILITY_ALPHA
    step_down: bool = False
    first_batch: int = DEFAULT_FIRST_BATCH

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if not (isinstance(self.futility_alpha, int | float) and 0.0 < self.futility_alpha < 1.0):
            raise ValueError(f"the futility level must be in (0, 1), got {self.futility_alpha!r}")
        _check_prior(self.prior)
        if not isinstance(self.step_down, bool):
            raise ValueError(f"step_down must be True or False, got {self.step_down!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--mc-batch must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < self.batch_size:
            raise ValueError(
                f"--mc-budget must be an integer of at least one batch (--mc-batch {self.batch_size}), "
                f"got {self.budget!r}"
            )
        if (
            isinstance(self.first_batch, bool)
            or not isinstance(self.first_batch, int)
            or self.first_batch < 1
        ):
            raise ValueError(f"the first batch must be a positive integer of draws, got {self.first_batch!r}")
        if self.deadline_ms is not None and not (
            isinstance(self.deadline_ms, int | float)
            and math.isfinite(self.deadline_ms)
            and self.deadline_ms > 0
        ):
            raise ValueError(
                f"--mc-deadline-ms must be a positive number of milliseconds, got {self.deadline_ms!r}"
            )


class ConfidenceSequence:
    """The running lower bound on a Bernoulli mean: ``update(successes, trials)`` adds a batch,
    ``lower_bound()`` is the largest :func:`lower_bound` seen so far (an intersection of the
    sequence's intervals, so still valid at level α at every time, whatever decides when to stop)."""

    def __init__(self, alpha: float, prior: tuple[float, float] = DEFAULT_PRIOR) -> None:
        self.alpha = _check_alpha(alpha)
        self.prior = _check_prior(prior)
        self.successes = 0
        self.trials = 0
        self._best = 0.0

    def update(self, successes: int, trials: int) -> float:
        """Add ``successes`` out of ``trials`` new draws; returns the updated bound."""
        if not 0 <= int(successes) <= int(trials):
            raise ValueError(f"a batch needs 0 <= successes <= trials, got {successes} of {trials}")
        self.successes += int(successes)
        self.trials += int(trials)
        bound = float(lower_bound(self.successes, self.trials, self.alpha, self.prior))
        self._best = max(self._best, bound)
        return self._best

    def lower_bound(self) -> float:
        return self._best

    def reachable(self, more_trials: int, rate: float = 1.0) -> float:
        """The bound after ``more_trials`` further draws of which a share ``rate`` succeeds (rounded
        up): with ``rate`` 1, the most it can become. (The bound increases with the successes and
        along an all-success path; a test checks both.)"""
        more = int(more_trials)
        k, n = self.successes + min(more, math.ceil(rate * more)), self.trials + more
        return max(self._best, float(lower_bound(k, n, self.alpha, self.prior)))


@dataclass(frozen=True)
class SequentialResult:
    """``lower_bound`` on ``p`` at level ``alpha`` after ``draws`` draws (``successes`` of them
    successes), why it stopped (``stop``: one of the ``STOP_*`` words) and the seconds it took."""

    lower_bound: float
    successes: int
    draws: int
    stop: str
    alpha: float
    elapsed_s: float


def _verdict(cs: ConfidenceSequence, required_p: float | None, options: SequentialOptions) -> str | None:
    """``success``, ``budget``, ``futility`` or None (draw on). Futility: even if the rest of the
    budget succeeded at ``u``, the Chernoff upper bound on ``p`` at level ``futility_alpha`` (1 before
    any draw), the bound would stay below ``required_p``."""
    if required_p is not None and cs.lower_bound() >= required_p:
        return STOP_SUCCESS
    if cs.trials >= options.budget:
        return STOP_BUDGET
    if required_p is None:
        return None
    u = chernoff_upper_bound(cs.successes, cs.trials, options.futility_alpha)
    if u < required_p or cs.reachable(options.budget - cs.trials, u) < required_p:
        return STOP_FUTILITY
    return None


def batch_schedule(options: SequentialOptions) -> list[int]:
    """The batch sizes a frame's draws come in: ``first_batch`` (at most ``batch_size``), doubling up
    to ``batch_size``, the last one cut to the budget; they add up to ``options.budget``.

    >>> batch_schedule(SequentialOptions(budget=1000, batch_size=256, first_batch=64))
    [64, 128, 256, 256, 256, 40]
    """
    sizes, total, size = [], 0, min(options.first_batch, options.batch_size)
    while total < options.budget:
        sizes.append(min(size, options.budget - total))
        total += sizes[-1]
        size = min(2 * size, options.batch_size)
    return sizes


def fallback_rungs(required_p: float) -> tuple[float, ...]:
    """The requirements a step-down test aims at in turn: ``required_p`` (radius ``R``), then the
    probability of radius ``R/2`` (``Φ(Φ⁻¹(p)/2)``), then any radius at all (``p > 1/2``).

    >>> [round(p, 4) for p in fallback_rungs(float(norm_cdf(2.0)))]
    [0.9772, 0.8413, 0.5]
    """
    any_radius = math.nextafter(0.5, 1.0)
    rungs = [required_p]
    if required_p < 1.0:
        half = float(norm_cdf(float(norm_ppf(required_p)) / 2.0))
        if any_radius < half < required_p:
            rungs.append(half)
    if any_radius < required_p:
        rungs.append(any_radius)
    return tuple(rungs)


def sequential_test(
    draw_batch: Callable[[int], int],
    required_p: float | None,
    options: SequentialOptions,
    clock: Callable[[], float] = time.monotonic,
) -> SequentialResult:
    """Draw batches (``draw_batch(m)`` returns the successes among ``m`` fresh Bernoulli draws) and
    stop on success (the bound reaches ``required_p``), futility (see :func:`_verdict`), the budget,
    or the deadline (a batch starts only if it still fits before it at the slowest rate per draw
    seen so far). Batches follow :func:`batch_schedule`. With
    ``options.step_down``, futility moves the requirement down :func:`fallback_rungs` (stopping on
    success at any rung, or futility at the last). With ``required_p`` None it runs to the budget or
    the deadline. The bound holds at every sample size at once, so ``P(lower_bound > p) ≤ α``
    whatever stops it (the rungs, like the futility rule, only decide when to stop); futility only
    decides how often a frame that could have been certified is given up, a loss of power."""
    if required_p is not None and not 0.0 < required_p <= 1.0:  # 1: a radius beyond any budget, Φ(R/σ) = 1
        raise ValueError(f"the required probability must be in (0, 1], got {required_p}")
    rungs = [required_p] if required_p is None or not options.step_down else list(fallback_rungs(required_p))
    cs = ConfidenceSequence(options.alpha, options.prior)
    batches = iter(batch_schedule(options))
    start, per_draw = clock(), 0.0
    deadline = None if options.deadline_ms is None else options.deadline_ms / 1000.0
    while (stop := _verdict(cs, rungs[0], options)) is None or (stop == STOP_FUTILITY and len(rungs) > 1):
        if stop is not None:  # futility at this rung: aim at the next one
            rungs.pop(0)
            continue
        m = next(batches)
        before = clock()
        if deadline is not None and before - start + per_draw * m > deadline:
            stop = STOP_DEADLINE
            break
        cs.update(int(draw_batch(m)), m)
        per_draw = max(per_draw, (clock() - before) / m)
    return SequentialResult(cs.lower_bound(), cs.successes, cs.trials, stop, cs.alpha, clock() - start)


BOUND_NAME = "beta-binomial mixture"
FUTILITY_NAME = "chernoff projection"


def stated_stopping(options: SequentialOptions) -> dict[str, Any]:
    """How the test bounds and stops, as a bundle states it (manifest ``adaptive.sequential``): the
    bound and its ``prior``, the futility rule and its level, the first batch. The routing rule's
    selection-split numbers were measured with these; the runtime runs them
    (:func:`with_stated_stopping`)."""
    return {
        "bound": BOUND_NAME,
        "prior": [float(v) for v in options.prior],
        "futility": FUTILITY_NAME,
        "futility_alpha": float(options.futility_alpha),
        "first_batch": int(options.first_batch),
    }


def with_stated_stopping(options: SequentialOptions, stated: Mapping[str, Any] | None) -> SequentialOptions:
    """``options`` with a bundle's stated stopping rule (:func:`stated_stopping`; None: as they are,
    an older bundle). ValueError naming ``adaptive.sequential`` for a bound or futility rule this
    version does not run."""
    if not stated:
        return options
    for key, name in (("bound", BOUND_NAME), ("futility", FUTILITY_NAME)):
        if stated.get(key) != name:
            raise ValueError(
                f"the bundle's adaptive.sequential.{key} is {stated.get(key)!r}; this version runs {name!r}"
            )
    return dataclasses.replace(
        options,
        prior=tuple(float(v) for v in stated["prior"]),
        futility_alpha=float(stated["futility_alpha"]),
        first_batch=int(stated["first_batch"]),
    )


def largest_certifiable_radius(sigma: float, options: SequentialOptions) -> float:
    """The largest radius ``options.budget`` draws can ever certify at ``options.alpha``: every draw
    succeeding. 0 when even that bound stays at or below 1/2."""
    n = options.budget
    return radius_from_lower_bound(float(lower_bound(n, n, options.alpha, options.prior)), sigma)


def check_required_radius(require_radius: float, sigma: float, options: SequentialOptions) -> float:
    """Refuse (one-line ValueError naming ``--require-radius``) a radius that is not positive or that
    the budget can never certify; returns the probability it needs, ``Φ(R/σ)``."""
    if not (isinstance(require_radius, int | float) and math.isfinite(require_radius) and require_radius > 0):
        raise ValueError(f"--require-radius must be a positive number, got {require_radius!r}")
    top = largest_certifiable_radius(sigma, options)
    if require_radius > top:
        raise ValueError(
            f"--require-radius {require_radius:g} is above the largest radius {top:.4f} that "
            f"--mc-budget {options.budget} can certify at --mc-alpha {options.alpha:g} (sigma {sigma:g}): "
            "lower the radius or raise the budget"
        )
    return required_probability(require_radius, sigma)
