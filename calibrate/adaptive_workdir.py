"""Adaptive certification in a work folder: the routing rule the bundle states and the evaluation's
adaptive rows, both from draws the pipeline already stored (no base-model evaluation here).

The routing rule (which frames get base-model draws when ``rrise run --mc-budget N`` is given no
``--require-radius``) is chosen on the rule-selection inputs of the selection split, with their own
full-size counts (the ``select-rule`` store), never on calibration or test inputs: at a budget of
:data:`ROUTING_BUDGET` draws (capped at the draws stored per selection input and at Cohen's ``n``)
and an allowance of :data:`ROUTING_DRAWS_FRACTION` of Cohen's ``n0 + n`` draws per query on
average. The bundle stage writes it into the manifest (``adaptive`` → ``routing``), the evaluation
states it beside its rows (``bundled_row``: its routed row on the test inputs).
A profile without rule-selection inputs (``digits``) has no routing rule: its bundle runs adaptive
only with ``--require-radius``.

The evaluation's rows (:func:`adaptive_section`) replay Cohen's stored draws exactly
(:mod:`rrise.calibrate.adaptive_eval`): the surrogate alone, the routed mode at each budget of
:data:`~rrise.calibrate.adaptive_eval.DEFAULT_BUDGETS` capped at the stored ``n``, one row per
required radius, and Cohen at the same α. Violations are counted only against the independent draws
of `rrise reference`, never against the replayed ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rrise.calibration import Calibration
from rrise.certificate import certify_from_probs
from rrise.runtime.adaptive import McOptions
from rrise.sequential import DEFAULT_MC_BATCH, stated_stopping

from .adaptive_eval import (
    EvalSplit,
    RoutingRule,
    RoutingSearch,
    RowPlan,
    adaptive_rows,
    choose_routing_rule,
    plot_cost_accuracy,
    reference_violations_check,
    stored_draws,
)
from .calibrating import selection_data
from .measures import DEFAULT_RADII
from .workdir import Workdir

__all__ = [
    "ADAPTIVE_FIGURE",
    "ROUTING_BUDGET",
    "ROUTING_DRAWS_FRACTION",
    "adaptive_section",
    "bundle_adaptive",
    "routing_rule",
    "selection_split",
]

# The budget the bundled routing rule is chosen for (the demo runs it), and the mean draws per query
# it may spend on the selection split, as a share of Cohen's n0 + n (5 %: 52 draws at the quick
# profile's n0 + n = 1,050, 505 at the full profile's 10,100).
ROUTING_BUDGET = 1_000
ROUTING_DRAWS_FRACTION = 0.05
ADAPTIVE_FIGURE = "adaptive_cost.png"
CHOSEN_ON = "selection"


def selection_split(w: Workdir, cal: Calibration) -> EvalSplit | None:
    """The rule-selection inputs (selection split) with their surrogate certificates under ``cal``,
    labels and own full-size counts; None when the profile samples none (``n_rule`` 0)."""
    sel = selection_data(w)
    if "counts" not in sel:
        return None
    return EvalSplit(certify_from_probs(sel["probs"], cal), sel["labels"], sel["counts"])


def _routing_mc(budget: int, mc_alpha: float) -> McOptions:
    return McOptions(mc_budget=budget, mc_alpha=mc_alpha, mc_batch=min(DEFAULT_MC_BATCH, budget))


def routing_rule(w: Workdir, selection: EvalSplit) -> RoutingRule:
    """The routing rule the bundle states: chosen on ``selection`` at :data:`ROUTING_BUDGET` draws
    (capped at those stored per input and at Cohen's ``n``, so that the evaluation has its routed
    row) within :data:`ROUTING_DRAWS_FRACTION` of ``n0 + n`` draws per query, at Cohen's level (the
    profile's ``mc_alpha``)."""
    p = w.prof
    budget = min(ROUTING_BUDGET, stored_draws(selection.counts), p.n)
    search = RoutingSearch(max_mean_draws=ROUTING_DRAWS_FRACTION * (p.n0 + p.n), seed=0)
    return choose_routing_rule(
        selection.certificates,
        selection.labels,
        selection.counts,
        w.config.sigma,
        _routing_mc(budget, p.mc_alpha),
        search,
    )


def _manifest_routing(rule: RoutingRule, mc_alpha: float) -> dict[str, Any]:
    return {
        **rule.to_dict(),
        "chosen_on": CHOSEN_ON,
        "max_draws_fraction": ROUTING_DRAWS_FRACTION,
        "mc_alpha": mc_alpha,
    }


def bundle_adaptive(w: Workdir, cal: Calibration) -> dict[str, Any] | None:
    """The manifest's ``adaptive`` entry: ``routing`` (:meth:`RoutingRule.to_dict` with ``chosen_on``,
    the draws allowance and the MC level) and ``sequential`` (the stopping rule the rule was chosen
    with, :func:`rrise.sequential.stated_stopping`), or None without rule-selection counts."""
    selection = selection_split(w, cal)
    if selection is None:
        return None
    rule = routing_rule(w, selection)
    stopping = stated_stopping(_routing_mc(rule.mc_budget or ROUTING_BUDGET, w.prof.mc_alpha).sequential())
    return {"routing": _manifest_routing(rule, w.prof.mc_alpha), "sequential": stopping}


def _violations(reference: tuple[np.ndarray, np.ndarray] | None):
    """Against the `rrise reference` store's independent draws when there is one; else None (Cohen's
    estimation counts are the replayed draws themselves, so they cannot judge these rows)."""
    return None if reference is None else reference_violations_check(*reference)


def _with_cost(rows: dict[str, Any], rates: dict[str, float]) -> None:
    """Per-query seconds counting the draws (the surrogate's query plus ``mean_draws`` at the
    measured seconds per base-model draw) and the break-even against Cohen's per-query time; the
    break-even in evaluations: the one-time evaluations over the draws saved per query."""
    for row in rows.values():
        per_query = rates["rrise_s"] + row["mean_draws"] * rates["draw_s"]
        row["per_query_s"] = per_query
        saved = rates["cohen_s"] - per_query
        row["break_even_queries"] = int(np.ceil(rates["one_time_s"] / saved)) if saved > 0 else None
        saved_draws = rates["cohen_draws"] - row["mean_draws"]
        row["break_even_in_evaluations"] = (
            int(np.ceil(rates["one_time_evaluations"] / saved_draws)) if saved_draws > 0 else None
        )


def adaptive_section(
    w: Workdir,
    cal: Calibration,
    test: EvalSplit,
    reference: tuple[np.ndarray, np.ndarray] | None,
    costs: dict[str, float],
) -> dict[str, Any]:
    """The evaluation's ``adaptive`` section and its figure (``report/adaptive_cost.png``).

    ``cal``: the bundle's calibration; ``test``: the test inputs' certificates under it, labels
    and Cohen's stored draws; ``reference``: ``(rows, counts)``, the test rows `rrise reference`
    drew on and its counts, or None; ``costs``: ``rrise_s`` and ``cohen_s`` (per-query seconds
    measured side by side), ``draw_s`` (seconds per base-model draw), ``cohen_draws`` (its
    ``n0 + n``), ``one_time_s`` and ``one_time_evaluations``."""
    p = w.prof
    selection = selection_split(w, cal)
    plan = RowPlan(
        mc_alpha=p.mc_alpha, max_draws_fraction=ROUTING_DRAWS_FRACTION, radii=DEFAULT_RADII, seed=0
    )
    result = adaptive_rows(test, selection, w.config.sigma, plan, violations=_violations(reference))
    _with_cost(result["rows"], costs)
    w.path("report").mkdir(exist_ok=True)
    plot_cost_accuracy(result, w.path(f"report/{ADAPTIVE_FIGURE}"))
    bundled = None if selection is None else routing_rule(w, selection)
    same = [k for k, r in result["rows"].items() if bundled and r.get("routing") == bundled.to_dict()]
    return {
        **result,
        "bundled_routing": None if bundled is None else _manifest_routing(bundled, p.mc_alpha),
        "bundled_row": same[0] if same else None,
        "figure": ADAPTIVE_FIGURE,
        "note": _note(p.n0 + p.n, reference is not None, bundled),
    }


def _note(cohen_draws: int, has_reference: bool, rule: RoutingRule | None) -> str:
    violations = (
        "violations against `rrise reference`'s independent draws"
        if has_reference
        else "no violations column: only `rrise reference`'s independent draws can judge these rows"
    )
    routing = (
        f"the bundle's routing rule is the routed row's at budget {rule.mc_budget}"
        if rule is not None
        else "no rule-selection counts in this profile, so no routing rule: routed rows are not run"
    )
    return (
        "Adaptive certification replayed exactly on Cohen's stored draws (no new base-model "
        f"evaluations); draws per query compared with Cohen's n0 + n = {cohen_draws}; routing rules "
        f"chosen on the selection split within {100 * ROUTING_DRAWS_FRACTION:g} % of those draws; "
        f"{routing}; {violations}. Per-query time counts the draws at the measured MC rate."
    )
