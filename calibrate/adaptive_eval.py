"""Offline evaluation of adaptive certification (the surrogate first, base-model draws where it falls
short), like for like with Cohen's Monte Carlo baseline on the same test inputs and the same draws.

Why it is exact and cheap. Cohen's baseline stage stores, for every test input, the full class-count
vector of its ``n`` estimation draws (``certify.npz``: ``counts`` ``[n_test, K]``, beside the ``n0``
selection draws ``counts_selection``). Given the total count ``k`` of a class ``Â`` among ``n``
i.i.d. draws, the order of the outcomes is a uniformly random permutation of ``k`` successes and
``n − k`` failures. So drawing the sequential test's batches WITHOUT replacement from those ``n``
outcomes (one hypergeometric draw per batch, seeded) reproduces exactly the law of fresh i.i.d.
base-model draws ``1{f(x + ε) = Â}``, for any stopping rule and any budget up to ``n``: the first ``m``
of a uniformly permuted i.i.d. sequence are ``m`` i.i.d. draws. ``Â`` is the surrogate's class, fixed
before any draw, as at run time. The test that consumes them is :func:`rrise.sequential.sequential_test`,
the code the runtime runs (:mod:`rrise.runtime.adaptive`). No model is run, and the adaptive mode is
compared with Cohen on the very draws Cohen used. A budget above the ``n`` stored draws would need
draws that were never made: it is refused, naming ``--mc-budget``.

Everything here takes arrays and returns arrays or dicts: :func:`adaptive_certify_offline` (per-input
records), :func:`choose_routing_rule` (the routing rule for runs without a required radius, chosen on
the selection split), :func:`adaptive_rows` and :func:`cohen_row` (report rows), and
:func:`plot_cost_accuracy` (certified accuracy against base-model evaluations per query). The
evaluation stage and the bundle's routing rule take them from a work folder in
:mod:`rrise.calibrate.adaptive_workdir`, in a few lines::

    test = EvalSplit(certify_from_probs(probs, cal), labels, cohen["counts"], cohen["counts_selection"])
    selection = selection_split(w, cal)  # the rule-selection inputs: their own full-size counts
    result = adaptive_rows(test, selection, sigma, RowPlan(mc_alpha=p.mc_alpha), violations=check)
    plot_cost_accuracy(result, report / "adaptive_cost.png")

Violations must be counted against draws independent of the replayed ones (the `rrise reference`
store, :func:`reference_violations_check`), never against Cohen's estimation counts: the adaptive
bound is computed from those very draws.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from rrise.certificate import CertificateBatch
from rrise.fileio import atomic_path
from rrise.runtime.adaptive import McOptions
from rrise.sequential import (
    DEFAULT_MC_ALPHA,
    DEFAULT_MC_BATCH,
    SequentialOptions,
    check_required_radius,
    radius_from_lower_bound,
    sequential_test,
)

from .measures import method_metrics, violation_stats

__all__ = [
    "BY_MC",
    "BY_SURROGATE",
    "DEFAULT_BUDGETS",
    "KIND_ADAPTIVE",
    "KIND_COHEN",
    "KIND_REQUIRED",
    "KIND_SURROGATE",
    "ROW_RADII",
    "ZERO_RADIUS",
    "AdaptiveRecords",
    "EvalSplit",
    "RoutingRule",
    "RoutingSearch",
    "RowPlan",
    "adaptive_certify_offline",
    "adaptive_rows",
    "choose_routing_rule",
    "cohen_row",
    "plot_cost_accuracy",
    "reference_violations_check",
    "replayed_draws",
    "stored_draws",
]

BY_SURROGATE, BY_MC = "surrogate", "mc"
# The radii the routing rule is chosen for, and those the required-radius rows ask for.
ROW_RADII = (0.0, 0.25, 0.5, 0.75)
DEFAULT_BUDGETS = (0, 100, 1_000, 10_000)
# A required radius of 0 asks for a certified prediction at all (p̲ > 1/2); the sequential test needs a
# positive radius, so it runs as this one (Φ(1e-6/σ) − 1/2 is about 4e-7/σ).
ZERO_RADIUS = 1e-6
# What each row is (the figure draws the surrogate alone, the routed adaptive rows and Cohen).
KIND_SURROGATE, KIND_ADAPTIVE, KIND_REQUIRED, KIND_COHEN = "surrogate", "adaptive", "required", "cohen"
# ŝ thresholds of the routing grid: 0 routes nothing, inf every frame whose radius is short.
DEFAULT_SCORE_GRID = (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, math.inf)
DEFAULT_TARGET_GRID = (0.25, 0.5, 0.75, 1.0)

Violations = Callable[[np.ndarray, np.ndarray], dict[str, Any]]


# --- the draws ---------------------------------------------------------------------------------


def replayed_draws(successes: int, total: int, rng: np.random.Generator) -> Callable[[int], int]:
    """A ``draw_batch`` for :func:`~rrise.sequential.sequential_test` that replays ``total`` stored
    draws, ``successes`` of them votes for the tested class, in a uniformly random order: each batch
    of ``m`` is a hypergeometric draw without replacement from what is left. Asking for more than
    is left raises ValueError."""
    if not 0 <= successes <= total:
        raise ValueError(f"stored draws need 0 <= successes <= total, got {successes} of {total}")
    left = [int(successes), int(total) - int(successes)]

    def draw_batch(m: int) -> int:
        if m > left[0] + left[1]:
            raise ValueError(
                f"a batch of {m} draws asks for more than the {left[0] + left[1]} stored draws left"
            )
        k = int(rng.hypergeometric(left[0], left[1], m)) if m else 0
        left[0] -= k
        left[1] -= m - k
        return k

    return draw_batch


def stored_draws(counts: np.ndarray) -> int:
    """The draws stored for every input (the smallest row sum of ``counts`` ``[N, K]``)."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or not len(counts) or np.any(counts < 0):
        raise ValueError(f"stored counts must be a non-negative [N, K] array, got shape {counts.shape}")
    return int(counts.sum(axis=1).min())


def _check_budget(budget: int, counts: np.ndarray) -> None:
    n = stored_draws(counts)
    if budget > n:
        raise ValueError(
            f"--mc-budget {budget} is above the {n} draws stored per input: the offline evaluation "
            "replays stored draws and cannot make new ones (lower the budget)"
        )


def _sequential_options(mc: McOptions) -> SequentialOptions:
    if mc.mc_deadline_ms is not None:
        raise ValueError("--mc-deadline-ms has no meaning offline (stored draws are replayed, not timed)")
    return mc.sequential()


@dataclass(frozen=True)
class _McRun:
    """Per input (all inputs; 0 where no draws were spent): the bound, the draws and why they stopped."""

    p_lower: np.ndarray
    draws: np.ndarray
    stop: np.ndarray


def _idle(n_inputs: int) -> _McRun:
    """No draws on any input."""
    return _McRun(np.zeros(n_inputs), np.zeros(n_inputs, dtype=np.int64), np.full(n_inputs, "", dtype=object))


def _run_mc(
    top: np.ndarray, counts: np.ndarray, rows: np.ndarray, required_p: float, seq, seed: int
) -> _McRun:
    """The sequential test of ``top[i]`` on input ``i`` for each ``i`` in ``rows``; input ``i``'s draw
    order depends only on ``(seed, i)``, so which other inputs are routed never changes its result."""
    n_in = len(top)
    p_lower, draws = np.zeros(n_in), np.zeros(n_in, dtype=np.int64)
    stop = np.full(n_in, "", dtype=object)
    totals = counts.sum(axis=1)
    for i in np.flatnonzero(rows):
        draw = replayed_draws(int(counts[i, top[i]]), int(totals[i]), np.random.default_rng([seed, int(i)]))
        r = sequential_test(draw, required_p, seq, clock=lambda: 0.0)
        p_lower[i], draws[i], stop[i] = r.lower_bound, r.draws, r.stop
    return _McRun(p_lower, draws, stop)


# --- per-input records -------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptiveRecords:
    """Per input, as the runtime's records would have it: ``pred`` (``Â`` or −1 = abstain), the
    record's ``radius`` (the larger of the surrogate's and the MC certificate), the ``p_lower`` behind
    it (the surrogate's calibrated p̃ or the MC bound), ``certified_by`` (``"surrogate"``, ``"mc"`` or
    None), ``mc_draws`` (0 where none were spent) and ``mc_stop`` (why the draws stopped; "" where
    none)."""

    top_class: np.ndarray
    pred: np.ndarray
    radius: np.ndarray
    p_lower: np.ndarray
    certified_by: np.ndarray
    mc_draws: np.ndarray
    mc_stop: np.ndarray

    def __len__(self) -> int:
        return len(self.pred)


def _surrogate_radius(surrogate: CertificateBatch) -> np.ndarray:
    """``R_s``: the surrogate's calibrated radius, 0 where it abstains."""
    return np.where(surrogate.abstain, 0.0, np.asarray(surrogate.radius, dtype=np.float64))


def _combine(surrogate: CertificateBatch, mc: _McRun, routed: np.ndarray, sigma: float) -> AdaptiveRecords:
    s_radius = _surrogate_radius(surrogate)
    mc_radius = np.array(
        [radius_from_lower_bound(p, sigma) if r else 0.0 for p, r in zip(mc.p_lower, routed)]
    )
    by_mc = routed & (mc_radius > s_radius)
    by_surrogate = ~by_mc & ~np.asarray(surrogate.abstain, dtype=bool)
    certified = by_mc | by_surrogate
    top = np.asarray(surrogate.top_class, dtype=np.int64)
    by = np.full(len(top), None, dtype=object)
    by[by_surrogate], by[by_mc] = BY_SURROGATE, BY_MC
    return AdaptiveRecords(
        top_class=top,
        pred=np.where(certified, top, -1),
        radius=np.where(by_mc, mc_radius, s_radius),
        p_lower=np.where(by_mc, mc.p_lower, np.asarray(surrogate.p_lower, dtype=np.float64)),
        certified_by=by,
        mc_draws=np.where(routed, mc.draws, 0),
        mc_stop=np.where(routed, mc.stop, ""),
    )


def _check_inputs(surrogate: CertificateBatch, counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    stored_draws(counts)
    top = np.asarray(surrogate.top_class)
    if len(top) != len(counts):
        raise ValueError(f"{len(top)} surrogate certificates but {len(counts)} rows of stored counts")
    if len(top) and (top.min() < 0 or top.max() >= counts.shape[1]):
        raise ValueError(f"surrogate classes must index the {counts.shape[1]} count columns")
    return counts


def adaptive_certify_offline(
    surrogate: CertificateBatch,
    counts: np.ndarray,
    sigma: float,
    mc: McOptions,
    route: RoutingRule | None = None,
    seed: int = 0,
) -> AdaptiveRecords:
    """The adaptive mode on inputs whose ``counts`` ``[N, K]`` hold stored i.i.d. base-model draws.

    ``surrogate``: the surrogate's certificates (its class ``Â`` in ``top_class`` also where it
    abstains, its calibrated radius ``R_s``). ``mc.mc_budget`` 0: the surrogate's certificates,
    unchanged. With ``mc.require_radius`` ``R``, draws only where ``R_s < R``, stopping on success for
    ``R``, futility or the budget; without it, ``route`` (a :class:`RoutingRule` chosen on the
    selection split) decides. The draws test ``Â`` alone, replayed from the stored counts
    (:func:`replayed_draws`). Refuses a budget above the stored draws, naming ``--mc-budget``."""
    counts = _check_inputs(surrogate, counts)
    if not mc.enabled:
        return _combine(surrogate, _idle(len(counts)), np.zeros(len(counts), dtype=bool), sigma)
    seq = _sequential_options(mc)
    _check_budget(seq.budget, counts)
    if mc.require_radius is not None:
        target = mc.require_radius
        routed = _surrogate_radius(surrogate) < target
    elif route is None:
        raise ValueError("without --require-radius the offline evaluation needs a routing rule")
    else:
        target = route.target_radius
        routed = route.routes(surrogate)
        seq = replace(seq, step_down=route.step_down)
        if not routed.any():  # a rule that routes nothing spends no draw, whatever its target
            return _combine(surrogate, _idle(len(counts)), routed, sigma)
    required_p = check_required_radius(target, sigma, seq)
    top = np.asarray(surrogate.top_class, dtype=np.int64)
    return _combine(surrogate, _run_mc(top, counts, routed, required_p, seq, seed), routed, sigma)


# --- the routing rule --------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingRule:
    """Which frames get base-model draws when no radius is required: those whose surrogate radius is
    below ``target_radius`` and whose top-class probability ``ŝ`` is below ``score_below`` (abstaining
    frames, radius 0, included when their ``ŝ`` is); their draws stop on success for ``target_radius``,
    futility or the budget (with ``step_down``, futility aims at half the radius, then at any radius
    before it stops). Chosen on the selection split (:func:`choose_routing_rule`), never on
    calibration or test inputs; the other fields record how.

    The rule affects only cost and power, never validity: the MC bound holds at level ``A``
    (``--mc-alpha``) for every frame, whichever frames are routed and on whatever grounds (the routing
    depends on the frame alone and the draws are fresh), so the union bound with the surrogate's
    marginal guarantee gives ``1 − α − β − A`` whatever the rule."""

    score_below: float
    target_radius: float
    step_down: bool = False
    mc_budget: int | None = None
    max_mean_draws: float | None = None
    selection_inputs: int | None = None
    selection_mean_draws: float | None = None
    selection_certified_accuracy: tuple[float, ...] | None = None

    def routes(self, surrogate: CertificateBatch) -> np.ndarray:
        """Which of ``surrogate``'s frames the rule sends to Monte Carlo."""
        return (_surrogate_radius(surrogate) < self.target_radius) & (
            np.asarray(surrogate.score) < self.score_below
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingRule:
        """The rule :meth:`to_dict` wrote (a manifest's or a report's); ValueError naming a bad key."""
        try:
            score = data["score_below"]
            rule = cls(
                score_below=math.inf if score is None else float(score),
                target_radius=float(data["target_radius"]),
                step_down=data.get("step_down") is True,
                mc_budget=data.get("mc_budget"),
                max_mean_draws=data.get("max_mean_draws"),
                selection_inputs=data.get("selection_inputs"),
                selection_mean_draws=data.get("selection_mean_draws"),
                selection_certified_accuracy=None
                if data.get("selection_certified_accuracy") is None
                else tuple(data["selection_certified_accuracy"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a routing rule needs score_below and target_radius numbers: {exc!r}") from None
        if not rule.target_radius > 0 or not rule.score_below >= 0:
            raise ValueError(f"a routing rule needs target_radius > 0 and score_below >= 0, got {dict(data)}")
        return rule

    def to_dict(self) -> dict[str, Any]:
        """For the bundle manifest and the report (``score_below`` None: no ŝ condition)."""
        return {
            "rule": "draws where the surrogate radius < target_radius and ŝ < score_below",
            "score_below": None if math.isinf(self.score_below) else self.score_below,
            "target_radius": self.target_radius,
            "step_down": self.step_down,
            "chosen_on": "selection split",
            "mc_budget": self.mc_budget,
            "max_mean_draws": self.max_mean_draws,
            "selection_inputs": self.selection_inputs,
            "selection_mean_draws": self.selection_mean_draws,
            "selection_certified_accuracy": None
            if self.selection_certified_accuracy is None
            else list(self.selection_certified_accuracy),
            "validity": "the rule moves cost and power only; the MC bound holds at --mc-alpha on every frame",
        }


@dataclass(frozen=True, kw_only=True)
class RoutingSearch:
    """The grid a routing rule is chosen from and what it must respect: the rule maximises mean
    certified accuracy over ``radii`` on the selection split subject to at most ``max_mean_draws``
    base-model draws per query (ties: the fewer draws)."""

    max_mean_draws: float = field(metadata={"help": "Mean base-model draws per query the rule may spend."})
    score_grid: tuple[float, ...] = field(
        default=DEFAULT_SCORE_GRID, metadata={"help": "ŝ thresholds tried."}
    )
    target_grid: tuple[float, ...] = field(
        default=DEFAULT_TARGET_GRID, metadata={"help": "Target radii tried."}
    )
    radii: tuple[float, ...] = field(
        default=ROW_RADII, metadata={"help": "Radii the objective averages over."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the replayed draws."})

    def __post_init__(self) -> None:
        if not (isinstance(self.max_mean_draws, int | float) and self.max_mean_draws >= 0):
            raise ValueError(f"--max-mean-draws must be a number >= 0, got {self.max_mean_draws!r}")
        if not self.score_grid or not self.target_grid or any(t <= 0 for t in self.target_grid):
            raise ValueError("the routing grid needs ŝ thresholds and positive target radii")


def _objective(records: AdaptiveRecords, labels: np.ndarray, radii: tuple[float, ...]) -> np.ndarray:
    ok = (records.pred >= 0) & (records.pred == np.asarray(labels))
    return np.array([np.mean(ok & (records.radius >= r)) for r in radii])


def _rule_with(
    rule: RoutingRule, records: AdaptiveRecords, labels, radii
) -> tuple[tuple[float, float], RoutingRule]:
    """The rule annotated with what it did on the selection inputs, and its rank (accuracy, −draws)."""
    draws = float(records.mc_draws.mean())
    acc = _objective(records, labels, radii)
    annotated = replace(
        rule,
        selection_mean_draws=round(draws, 3),
        selection_certified_accuracy=tuple(round(float(a), 6) for a in acc),
    )
    return (float(acc.mean()), -draws), annotated


def choose_routing_rule(
    surrogate: CertificateBatch,
    labels: np.ndarray,
    counts: np.ndarray,
    sigma: float,
    mc: McOptions,
    search: RoutingSearch,
) -> RoutingRule:
    """The routing rule for ``mc``'s budget, chosen on SELECTION inputs only (their surrogate
    certificates, labels and their own full-size stored counts): every (``ŝ`` threshold, target
    radius, step-down or not) of ``search``'s grid is replayed, targets the budget cannot certify
    are skipped, and the rule of highest mean certified accuracy within ``search.max_mean_draws``
    wins. The rule that
    routes nothing (``score_below`` 0) is always a candidate, so a rule always exists."""
    counts = _check_inputs(surrogate, counts)
    seq = _sequential_options(replace(mc, require_radius=None))
    _check_budget(seq.budget, counts)
    top = np.asarray(surrogate.top_class, dtype=np.int64)
    best = _rule_with(
        RoutingRule(score_below=0.0, target_radius=min(search.target_grid)),
        _combine(surrogate, _idle(len(counts)), np.zeros(len(counts), dtype=bool), sigma),
        labels,
        search.radii,
    )
    for target, step_down in itertools.product(search.target_grid, (False, True)):
        try:
            required_p = check_required_radius(target, sigma, seq)
        except ValueError:
            continue  # beyond what this budget can ever certify
        routed = _surrogate_radius(surrogate) < target
        run = _run_mc(top, counts, routed, required_p, replace(seq, step_down=step_down), search.seed)
        for t in search.score_grid:
            rule = RoutingRule(score_below=t, target_radius=target, step_down=step_down)
            records = _combine(surrogate, run, rule.routes(surrogate), sigma)
            if records.mc_draws.mean() <= search.max_mean_draws:
                best = max(best, _rule_with(rule, records, labels, search.radii), key=lambda c: c[0])
    return replace(
        best[1], mc_budget=seq.budget, max_mean_draws=search.max_mean_draws, selection_inputs=len(counts)
    )


# --- report rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSplit:
    """One split's inputs: the surrogate's ``certificates``, the true ``labels`` and the stored
    base-model ``counts`` ``[N, K]`` (for the test split, Cohen's estimation counts, with his selection
    counts ``counts_selection`` ``[N, K]`` beside them)."""

    certificates: CertificateBatch
    labels: np.ndarray
    counts: np.ndarray
    counts_selection: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class RowPlan:
    """Which rows :func:`adaptive_rows` computes: routed rows at each of ``budgets`` (capped at the
    stored draws; 0 is the surrogate alone), required-radius rows at each of ``required_radii`` with
    ``require_budget`` draws (default: the largest budget), at level ``mc_alpha`` in batches of
    ``mc_batch``; routing rules may spend ``max_draws_fraction`` of Cohen's ``n0 + n`` draws per
    query on the selection split. ``radii``: where certified accuracy is reported."""

    budgets: tuple[int, ...] = field(default=DEFAULT_BUDGETS, metadata={"help": "Draw budgets per query."})
    required_radii: tuple[float, ...] = field(default=ROW_RADII, metadata={"help": "Required radii."})
    require_budget: int | None = field(default=None, metadata={"help": "Budget of the required-radius rows."})
    mc_alpha: float = field(
        default=DEFAULT_MC_ALPHA, metadata={"help": "Level of the MC bound and of Cohen."}
    )
    mc_batch: int = field(default=DEFAULT_MC_BATCH, metadata={"help": "Draws per batch."})
    max_draws_fraction: float = field(
        default=0.05, metadata={"help": "Mean draws a routing rule may spend, as a share of Cohen's n0 + n."}
    )
    radii: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 0.75, 1.0), metadata={"help": "Report radii."})
    seed: int = field(default=0, metadata={"help": "Seed of the replayed draws."})

    def __post_init__(self) -> None:
        if not self.budgets or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in self.budgets
        ):
            raise ValueError(f"--budgets must be integers >= 0, got {self.budgets!r}")
        if any(not (isinstance(r, int | float) and r >= 0) for r in self.required_radii):
            raise ValueError(f"--required-radii must be numbers >= 0, got {self.required_radii!r}")
        if not (isinstance(self.max_draws_fraction, int | float) and self.max_draws_fraction >= 0):
            raise ValueError(f"--max-draws-fraction must be >= 0, got {self.max_draws_fraction!r}")
        McOptions(mc_alpha=self.mc_alpha, mc_batch=self.mc_batch)  # one-line errors naming the flag


def reference_violations_check(rows: np.ndarray, reference_counts: np.ndarray) -> Violations:
    """Violations as the evaluation counts them for RRISE rows
    (:func:`rrise.calibrate.measures.violation_stats`): a record certifying ``Â`` with ``p_lower``
    is a violation when the reference counts of input ``rows[j]`` (independent draws, e.g. the
    ``N_ref`` of `rrise reference` on the first test inputs) say ``p_Â`` is below it."""
    rows, ref = np.asarray(rows), np.asarray(reference_counts)
    if len(rows) != len(ref):
        raise ValueError(f"{len(rows)} reference rows but {len(ref)} reference count vectors")
    return lambda pred, p_lower: violation_stats(np.asarray(pred)[rows], np.asarray(p_lower)[rows], ref)


def _draw_stats(draws: np.ndarray, cohen_draws: float) -> dict[str, Any]:
    mean = float(np.mean(draws))
    return {
        "mean_draws": round(mean, 3),
        "p95_draws": round(float(np.percentile(draws, 95)), 3),
        "draws_ratio_to_cohen": round(mean / cohen_draws, 6),
    }


def _record_row(
    records: AdaptiveRecords, split: EvalSplit, plan: RowPlan, cohen_draws: float, violations, **extra: Any
) -> dict[str, Any]:
    by = records.certified_by
    stops, counts = np.unique(records.mc_stop[records.mc_stop != ""].astype(str), return_counts=True)
    return method_metrics(
        records.radius,
        records.pred,
        split.labels,
        radii=plan.radii,
        **extra,
        **_draw_stats(records.mc_draws, cohen_draws),
        certified_by={k: round(float(np.mean(by == k)), 6) for k in (BY_SURROGATE, BY_MC)},
        mc_frames=int(np.count_nonzero(records.mc_draws)),
        mc_stops={str(s): int(c) for s, c in zip(stops, counts)},
        violations=None if violations is None else violations(records.pred, records.p_lower),
    )


def cohen_row(
    split: EvalSplit, sigma: float, plan: RowPlan, violations: Violations | None = None
) -> dict[str, Any]:
    """Cohen's CERTIFY at ``plan.mc_alpha`` from the split's stored draws (``counts_selection`` picks
    ``Â``, ``counts`` bound it), with its ``n0 + n`` draws per query."""
    from .cohen import cohen_from_counts

    if split.counts_selection is None:
        raise ValueError("Cohen's row needs the test split's selection counts (certify.npz counts_selection)")
    pred, radius, p_low = cohen_from_counts(
        split.counts_selection, split.counts, sigma=sigma, alpha=plan.mc_alpha
    )
    draws = np.asarray(split.counts_selection).sum(axis=1) + np.asarray(split.counts).sum(axis=1)
    return method_metrics(
        radius,
        pred,
        split.labels,
        radii=plan.radii,
        kind=KIND_COHEN,
        mc_budget=int(draws.max()),
        **_draw_stats(draws, float(np.mean(draws))),
        violations=None if violations is None else violations(pred, p_low),
    )


def _row_budgets(plan: RowPlan, test: EvalSplit, selection: EvalSplit | None) -> tuple[int, ...]:
    cap = stored_draws(test.counts)
    if selection is not None:
        cap = min(cap, stored_draws(selection.counts))
    return tuple(sorted({min(b, cap) for b in plan.budgets}))


def _mc(plan: RowPlan, budget: int, require_radius: float | None = None) -> McOptions:
    batch = min(plan.mc_batch, budget) if budget else plan.mc_batch
    return McOptions(mc_budget=budget, mc_alpha=plan.mc_alpha, mc_batch=batch, require_radius=require_radius)


def _routed_rows(test, selection, sigma, plan, budgets, cohen_draws, violations) -> tuple[dict, dict]:
    rows: dict[str, Any] = {}
    not_run: dict[str, str] = {}
    for b in budgets:
        if b == 0:
            records = adaptive_certify_offline(test.certificates, test.counts, sigma, McOptions())
            name = "RRISE alone (the surrogate, no draws)"
            rows[name] = _record_row(
                records, test, plan, cohen_draws, violations, kind=KIND_SURROGATE, mc_budget=0
            )
            continue
        name = f"Adaptive (budget {b}, routing rule chosen on the selection split, α_MC={plan.mc_alpha:g})"
        if selection is None:
            not_run[name] = "no selection inputs with stored counts to choose the routing rule on"
            continue
        mc = _mc(plan, b)
        search = RoutingSearch(max_mean_draws=plan.max_draws_fraction * cohen_draws, seed=plan.seed)
        rule = choose_routing_rule(
            selection.certificates, selection.labels, selection.counts, sigma, mc, search
        )
        records = adaptive_certify_offline(
            test.certificates, test.counts, sigma, mc, route=rule, seed=plan.seed
        )
        rows[name] = _record_row(
            records,
            test,
            plan,
            cohen_draws,
            violations,
            kind=KIND_ADAPTIVE,
            mc_budget=b,
            routing=rule.to_dict(),
        )
    return rows, not_run


def _required_rows(test, sigma, plan, budget, cohen_draws, violations) -> tuple[dict, dict]:
    rows: dict[str, Any] = {}
    not_run: dict[str, str] = {}
    for r in plan.required_radii:
        name = f"Adaptive (--require-radius {r:g}, budget {budget}, α_MC={plan.mc_alpha:g})"
        try:
            mc = _mc(plan, budget, r or ZERO_RADIUS)
            records = adaptive_certify_offline(test.certificates, test.counts, sigma, mc, seed=plan.seed)
        except ValueError as exc:
            not_run[name] = str(exc)
            continue
        rows[name] = _record_row(
            records,
            test,
            plan,
            cohen_draws,
            violations,
            kind=KIND_REQUIRED,
            mc_budget=budget,
            require_radius=r,
        )
    return rows, not_run


def adaptive_rows(
    test: EvalSplit,
    selection: EvalSplit | None,
    sigma: float,
    plan: RowPlan,
    violations: Violations | None = None,
) -> dict[str, Any]:
    """Report rows of the adaptive mode beside Cohen's on the same test inputs and draws:
    ``{"radii", "rows": {name: row}, "not_run": {name: why}}``. Rows: the surrogate alone (budget
    0); the adaptive mode at each budget of ``plan`` with its routing rule, chosen on ``selection``
    (never on ``test``); the adaptive mode with each required radius; Cohen at the same α. Each row
    has certified accuracy at ``plan.radii``, the abstain rate, mean and p95 draws per query and their
    ratio to Cohen's ``n0 + n``, and, given ``violations`` (``(pred, p_lower) → dict``, e.g.
    :func:`reference_violations_check`; it must count against draws independent of the replayed
    ones, so not Cohen's estimation counts), the violations against it."""
    cohen = cohen_row(test, sigma, plan, violations)
    cohen_draws = float(cohen["mean_draws"])
    budgets = _row_budgets(plan, test, selection)
    rows, not_run = _routed_rows(test, selection, sigma, plan, budgets, cohen_draws, violations)
    more, more_not_run = _required_rows(
        test, sigma, plan, plan.require_budget or max(budgets), cohen_draws, violations
    )
    rows |= more
    n0 = int(np.asarray(test.counts_selection).sum(axis=1).max())
    rows[f"Cohen MC (n0={n0}, n={stored_draws(test.counts)}, α={plan.mc_alpha:g})"] = cohen
    return {"radii": list(plan.radii), "rows": rows, "not_run": not_run | more_not_run}


# --- the figure --------------------------------------------------------------------------------

LINE_STYLES = ("-", "--", ":", "-.")
POINT_MARKERS = {KIND_COHEN: "*", KIND_SURROGATE: "s", KIND_REQUIRED: "^"}
CAPTION = (
    "Certified accuracy against base-model evaluations per query (mean over the test inputs). The "
    "surrogate alone sits at 0: its one-time cost (targets, calibration, training) is left out. "
    "Adaptive: routing rule chosen on the selection split, draws replayed from Cohen's stored draws."
)


def _legend_keys(ax: Any, allowances: list[Any], required: bool) -> None:
    """Grey legend entries for what the line styles and markers mean (colours are the radii)."""
    for g, allowance in enumerate(allowances):
        style = LINE_STYLES[g % len(LINE_STYLES)]
        ax.plot(
            [], [], ls=style, color="grey", label=f"adaptive, rule ≤ {allowance:g} draws/query on selection"
        )
    ax.scatter([], [], marker="*", color="grey", label="Cohen MC (n0 + n draws)")
    ax.scatter([], [], marker="s", color="grey", label="the surrogate alone (0 draws)")
    if required:
        ax.scatter([], [], marker="^", color="grey", label="adaptive, --require-radius (one per radius)")


def plot_cost_accuracy(
    result: Mapping[str, Any], path: str | Path, radii: tuple[float, ...] = ROW_RADII
) -> Path:
    """One line per radius in ``radii``: certified accuracy of the surrogate alone (at 0 draws) and of
    the adaptive mode at each budget against mean base-model evaluations per query (symmetric log x,
    linear below 1), with Cohen's point at its ``n0 + n`` and a point per required-radius row; from
    :func:`adaptive_rows`' result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_radii = list(result["radii"])
    rows = list(result["rows"].values())
    alone = [r for r in rows if r["kind"] == KIND_SURROGATE]
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        if r["kind"] == KIND_ADAPTIVE:
            groups.setdefault(r["routing"]["max_mean_draws"], []).append(r)
    fig, ax = plt.subplots(figsize=(8.4, 4.4), dpi=120)
    for j, radius in enumerate(radii):
        if radius not in all_radii:
            raise ValueError(f"radius {radius} is not among the rows' radii {all_radii}")
        col, color = all_radii.index(radius), f"C{j}"
        for g, (_, group) in enumerate(sorted(groups.items(), key=lambda kv: kv[0] or 0.0)):
            line = alone + sorted(group, key=lambda r: r["mean_draws"])
            ax.plot(
                [r["mean_draws"] for r in line],
                [100 * r["certified_accuracy"][col] for r in line],
                marker="o",
                ls=LINE_STYLES[g % len(LINE_STYLES)],
                color=color,
            )
        for c in (r for r in rows if r["kind"] in POINT_MARKERS):
            ax.scatter(
                [c["mean_draws"]],
                [100 * c["certified_accuracy"][col]],
                marker=POINT_MARKERS[c["kind"]],
                s=70 if c["kind"] != KIND_REQUIRED else 30,
                color=color,
            )
        ax.plot([], [], marker="o", color=color, label=f"r = {radius:g}")
    _legend_keys(ax, sorted(groups, key=lambda a: a or 0.0), any(r["kind"] == KIND_REQUIRED for r in rows))
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("base-model evaluations per query (0 = the surrogate alone)")
    ax.set_ylabel("certified accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.text(0.01, 0.01, CAPTION, fontsize=6, wrap=True)
    fig.subplots_adjust(bottom=0.22, right=0.66)
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    return path
