"""Calibration rules and their comparison on a selection split (never on calibration or test).

A rule says what is fixed before calibration: confidence-bin edges (Mondrian quantiles), a learned
probit score map and/or a score scale (rrise.calibrate.score_map), or none of them. Every rule
keeps split conformal's guarantee because its choices come from data disjoint from the calibration
inputs.

:func:`compare_rules` scores each rule on repeated random three-way splits of the selection inputs
that have full-size MC counts: fit the rule's choices on one part, calibrate on the second, certify
the third. The simplest rule within one standard error of the best mean certified accuracy over the
target radii wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rrise.calibration import CalibrationSpec, conformalize, mc_lower_bounds, min_calibration_size
from rrise.certificate import certify_from_probs

from .score_map import fit_score_map, fit_score_scale

__all__ = ["RULES", "Comparison", "Rule", "compare_rules", "confidence_bin_edges", "fit_rule", "get_rule"]

TARGET_RADII = (0.0, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Rule:
    """``bins``: Mondrian quantiles over up to this many confidence bins (1 = one quantile);
    ``map_tau``: fit a probit score map at this quantile level (None = no map); ``scale``: normalize
    the score by a learned scale (one pooled q̂ spread by the residual's size)."""

    name: str
    bins: int = 1
    map_tau: float | None = None
    scale: bool = False

    def describe(self) -> str:
        parts = []
        if self.map_tau is not None:
            parts.append(f"score map τ={self.map_tau:g}")
        if self.scale:
            parts.append("normalized score")
        if self.bins > 1:
            parts.append(f"≤{self.bins} confidence bins")
        return ", ".join(parts) or "one quantile"


RULES: tuple[Rule, ...] = (
    Rule("single"),
    Rule("bins", bins=4),
    Rule("map", map_tau=0.1),
    Rule("map-tau0.05", map_tau=0.05),
    Rule("map-tau0.5", map_tau=0.5),
    Rule("map+bins", bins=4, map_tau=0.1),
    Rule("scale", scale=True),
    Rule("map-tau0.5+scale", map_tau=0.5, scale=True),
)


def get_rule(name: str) -> Rule:
    for rule in RULES:
        if rule.name == name:
            return rule
    raise ValueError(f"unknown calibration rule {name!r}; expected one of {', '.join(r.name for r in RULES)}")


def confidence_bin_edges(
    selection_top_prob: np.ndarray, m: int, alpha: float, *, max_bins: int = 4, delta: float | None = None
) -> tuple[float, ...]:
    """Inner edges of up to ``max_bins`` equal-mass confidence bins, from a SELECTION split's ŝ.

    The number of bins G keeps about 1.5× the minimum calibration size per bin at ``m`` calibration
    inputs (at δ/G per bin for a PAC calibration). Choose the edges on data disjoint from
    calibration, or the guarantee is void.
    """
    s = np.asarray(selection_top_prob, dtype=np.float64)
    bins = 1
    for g in range(max(1, max_bins), 1, -1):
        need = min_calibration_size(alpha, None if delta is None else delta / g)
        if m // math.ceil(1.5 * need) >= g:
            bins = g
            break
    if bins == 1 or len(s) == 0:
        return ()
    edges = np.unique(np.quantile(s, np.arange(1, bins) / bins))
    return tuple(float(e) for e in edges if 0.0 < e <= 1.0)


def fit_rule(
    rule: Rule,
    sel_probs: np.ndarray,
    sel_counts: np.ndarray | None,
    *,
    m: int,
    bin_probs: np.ndarray | None = None,
    settings: CalibrationSpec | None = None,
    **given: Any,
) -> CalibrationSpec:
    """The :class:`rrise.CalibrationSpec` of ``rule``, its choices fitted on SELECTION data: the score
    map from the surrogate's ``sel_probs`` and full-size MC ``sel_counts`` (``n_mc`` draws per input),
    the bin edges from the ŝ of ``bin_probs`` (default ``sel_probs``: bins need no MC), sized for ``m``
    calibration inputs. ``settings`` (a :class:`~rrise.CalibrationSpec`), or its fields as keywords
    (``sigma``, ``n_mc``, ``alpha``, ``beta``, ``delta``, ``score``): what the rule calibrates at.
    Never pass calibration inputs here: the guarantee needs the choices fixed before calibration."""
    base = settings if settings is not None else CalibrationSpec(**given)
    if settings is not None and given:
        base = replace(base, **given)
    n_mc, beta = base.n_mc, base.beta
    score_map = scale = None
    if (rule.map_tau is not None or rule.scale) and sel_counts is None:
        raise ValueError(f"rule {rule.name!r} needs full-size MC counts on the selection split")
    if rule.map_tau is not None:
        score_map = fit_score_map(sel_probs, sel_counts, n_mc=n_mc, beta=beta, tau=rule.map_tau)
    if rule.scale:
        scale = fit_score_scale(sel_probs, sel_counts, n_mc=n_mc, beta=beta, score_map=score_map)
    edges: tuple[float, ...] = ()
    if rule.bins > 1:
        top_prob = np.asarray(sel_probs if bin_probs is None else bin_probs).max(axis=1)
        edges = confidence_bin_edges(top_prob, m, base.alpha, max_bins=rule.bins, delta=base.delta)
    return replace(
        base,
        bin_edges=edges,
        score_map_x=() if score_map is None else score_map[0],
        score_map_y=() if score_map is None else score_map[1],
        score_scale_x=() if scale is None else scale[0],
        score_scale_y=() if scale is None else scale[1],
    )


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """How :func:`compare_rules` compares the rules.

    ``n_mc``, ``sigma``, ``alpha``, ``beta``: the calibration the rules are compared at (``n_mc``:
    the full-size MC draws behind the counts); ``rules`` and the target ``radii``; ``repeats``
    random fit/calibrate/test splits (``seed``) in the shares ``fit_share``/``calibrate_share``;
    ``deploy_m``: the calibration size the chosen rule will get; ``cap_counts``/``cap_draws``: the
    second stage at the cap (both None: off); ``clip_at_abstention``: the scores as `rrise calibrate`
    computes them (:class:`rrise.CalibrationSpec`).
    """

    n_mc: int
    sigma: float
    alpha: float
    beta: float
    rules: tuple[Rule, ...] = RULES
    radii: tuple[float, ...] = TARGET_RADII
    repeats: int = 50
    seed: int = 0
    fit_share: float = 0.25
    calibrate_share: float = 0.5
    deploy_m: int | None = None
    cap_counts: np.ndarray | None = None
    cap_draws: int | None = None
    clip_at_abstention: bool = True

    def calibration_settings(self) -> dict[str, Any]:
        """What the rules calibrate at, as :func:`fit_rule`'s keywords."""
        return {
            "sigma": self.sigma, "n_mc": self.n_mc, "alpha": self.alpha, "beta": self.beta,
            "clip_at_abstention": self.clip_at_abstention,
        }  # fmt: skip


def compare_rules(
    probs: np.ndarray,
    counts: np.ndarray,
    labels: np.ndarray,
    comparison: Comparison | None = None,
    **given: Any,
) -> dict[str, Any]:
    """Mean certified accuracy (%) of each rule over ``repeats`` random fit/calibrate/test splits of
    SELECTION inputs (``probs``: surrogate outputs, ``counts``: fresh MC with ``n_mc`` draws, ``labels``).
    ``comparison`` (:class:`Comparison`), or its fields as keywords, says how.

    ``deploy_m``: the calibration size the chosen rule will get. A calibrate part smaller than that
    is resampled with replacement to ``deploy_m`` inputs, so that each rule is compared at the
    quantile level (and, for bins, the bin count) it will run at: the finite-sample index of a
    smaller part sits higher and would penalize the rules that split their budget.

    ``cap_counts`` (``[n, K]``, ``cap_draws`` further draws on each input whose ``n_mc`` draws all
    fell on one class, zeros elsewhere): the rules are calibrated with the two-stage bound, as
    `rrise calibrate --cap-draws` runs them, and tested against it. The rules' own choices (maps,
    scales) are fitted on the first-stage counts.

    Per rule also ACR, abstain rate and miss rate (test inputs whose p̃ exceeds their own MC lower
    bound p̲, which the conformal step bounds by α in expectation); a rule that cannot run at this
    size is reported with its reason. Winner: the simplest rule (earliest in ``rules``) within one
    paired standard error of the best mean certified accuracy over ``radii`` (the one-SE rule).
    """
    c = replace(comparison, **given) if comparison is not None else Comparison(**given)
    p, k, y = np.asarray(probs, dtype=np.float64), np.asarray(counts), np.asarray(labels)
    splits, sizes = _draw_splits(len(p), c)
    runs, errors = _run_splits(c, splits, p, k, y)
    table = {
        r.name: {"rule": r.describe(), "error": errors[r.name]}
        if r.name in errors
        else _summary(r, runs[r.name], c.radii)
        for r in c.rules
    }
    ran = [r.name for r in c.rules if r.name not in errors]
    if not ran:
        raise ValueError(
            f"no calibration rule could run on this selection split: {'; '.join(errors.values())}"
        )
    ranked, excluded = _bundleable(ran, runs, len(splits))
    for name, why in excluded.items():
        table[name]["excluded"] = why
    winner = _one_standard_error_winner(c.rules, ranked, runs, table)
    return {
        "alpha": c.alpha,
        "beta": c.beta,
        "n_mc": c.n_mc,
        "inputs": len(p),
        "split": sizes,
        "deploy_m": c.deploy_m,
        "cap_draws": c.cap_draws,
        "criterion": "simplest rule within one paired standard error of the best mean certified accuracy",
        "radii": list(c.radii),
        "rules": table,
        "excluded": excluded,
        "winner": winner,
    }


def _bundleable(
    ran: list[str], runs: dict[str, list[dict[str, Any]]], n_splits: int
) -> tuple[list[str], dict[str, str]]:
    """``(candidates, excluded)``: the rules the winner may be taken from, and why each other one is
    not. A rule whose conformal quantile came out infinite on some calibrate part (every certificate
    would abstain, which the bundle refuses) is excluded while a rule with fewer such parts is left;
    when none is finite on every part, those with the fewest infinite ones stay candidates."""
    inf = {name: sum(not r["bundleable"] for r in runs[name]) for name in ran}
    fewest = min(inf.values())
    excluded = {
        name: f"its calibration quantile was infinite on {inf[name]} of {n_splits} calibrate parts: "
        "it cannot be bundled"
        for name in ran
        if inf[name] > fewest
    }
    return [name for name in ran if name not in excluded], excluded


def _draw_splits(n: int, c: Comparison) -> tuple[list, str]:
    """``c.repeats`` random (fit, calibrate, test) splits of ``n`` inputs, and their sizes in words;
    a calibrate part smaller than ``c.deploy_m`` is resampled with replacement to that size."""
    fit_size, cal_size = int(n * c.fit_share), int(n * c.calibrate_share)
    if not (fit_size > 0 and cal_size > 0 and fit_size + cal_size < n):
        raise ValueError(
            f"fit_share {c.fit_share} and calibrate_share {c.calibrate_share} leave no test inputs"
        )
    rng = np.random.default_rng(c.seed)
    resample = c.deploy_m is not None and c.deploy_m > cal_size
    splits = []
    for _ in range(c.repeats):
        perm = rng.permutation(n)
        cal = perm[fit_size : fit_size + cal_size]
        if resample:
            cal = rng.choice(cal, size=c.deploy_m, replace=True)
        splits.append((perm[:fit_size], cal, perm[fit_size + cal_size :]))
    sizes = (
        f"{c.repeats} random splits: fit {fit_size}, calibrate {cal_size}"
        + (f" (resampled to m = {c.deploy_m})" if resample else "")
        + f", test {n - fit_size - cal_size}"
    )
    return splits, sizes


def _run_splits(
    c: Comparison, splits: list, p: np.ndarray, k: np.ndarray, y: np.ndarray
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Each rule fitted, calibrated and tested on every (fit, calibrate, test) split; a rule that
    raises ValueError (too few inputs per bin, say) is dropped with its reason."""
    n2, k2 = c.cap_draws, None if c.cap_draws is None else np.asarray(c.cap_counts)
    p_low = mc_lower_bounds(k, p.argmax(axis=1), c.n_mc, c.beta, cap_counts=k2, cap_draws=n2)
    settings = c.calibration_settings()
    runs: dict[str, list[dict[str, Any]]] = {r.name: [] for r in c.rules}
    errors: dict[str, str] = {}
    for fit, cal, test in splits:
        for rule in (r for r in c.rules if r.name not in errors):
            try:
                spec = replace(fit_rule(rule, p[fit], k[fit], m=len(cal), **settings), cap_draws=n2)
                calibration = conformalize(spec, p[cal], k[cal], cap_counts=None if k2 is None else k2[cal])
            except ValueError as exc:
                errors[rule.name] = str(exc)
                continue
            metrics = _test_metrics(p[test], y[test], p_low[test], calibration, c.radii)
            runs[rule.name].append({**metrics, "bundleable": math.isfinite(calibration.quantile)})
    return runs, errors


def _test_metrics(
    probs: np.ndarray, labels: np.ndarray, p_low: np.ndarray, calibration, radii: tuple[float, ...]
) -> dict[str, Any]:
    """One split's test metrics: certified accuracy (%) at ``radii``, ACR, abstain (%), miss rate."""
    cert = certify_from_probs(probs, calibration)
    correct = (cert.pred == labels) & ~cert.abstain
    return {
        "acc": [100.0 * np.mean(correct & (cert.radius >= r)) for r in radii],
        "acr": float(np.mean(np.where(correct, cert.radius, 0.0))),
        "abstain": 100.0 * float(np.mean(cert.abstain)),
        "miss": float(np.mean(~cert.abstain & (cert.p_lower > p_low))),
    }


def _summary(rule: Rule, runs: list[dict[str, Any]], radii: tuple[float, ...]) -> dict[str, Any]:
    a = np.asarray([r["acc"] for r in runs])
    return {
        "rule": rule.describe(),
        "certified_accuracy": {f"{r:g}": round(float(v), 2) for r, v in zip(radii, a.mean(axis=0))},
        "mean_certified_accuracy": round(float(a.mean()), 3),
        "acr": round(float(np.mean([r["acr"] for r in runs])), 4),
        "abstain_pct": round(float(np.mean([r["abstain"] for r in runs])), 2),
        "miss_rate": round(float(np.mean([r["miss"] for r in runs])), 4),
        # Each split's mean over ``radii``, in split order: pairs two comparisons made on the same
        # splits (the same inputs and seed), e.g. two surrogates of one base model.
        "split_means": [round(float(v), 3) for v in a.mean(axis=1)],
    }


def _one_standard_error_winner(
    rules: tuple[Rule, ...], ranked: list[str], runs: dict[str, list[dict[str, Any]]], table: dict[str, Any]
) -> str:
    """The simplest (earliest) rule whose mean is within one paired standard error of the best one's,
    so that noise between near-equal rules does not pick the complex one. Adds each rule's
    ``behind_best`` and ``behind_best_se`` to ``table``."""
    per_repeat = {name: np.asarray([r["acc"] for r in runs[name]]).mean(axis=1) for name in ranked}
    best = max(ranked, key=lambda name: per_repeat[name].mean())
    for name in ranked:
        diff = per_repeat[best] - per_repeat[name]
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        table[name]["behind_best"] = round(float(diff.mean()), 3)
        table[name]["behind_best_se"] = round(se, 3)
    return min(
        (name for name in ranked if table[name]["behind_best"] <= table[name]["behind_best_se"]),
        key=lambda name: _rank(rules, name),
    )


def _rank(rules: tuple[Rule, ...], name: str) -> int:
    """Order of a rule in ``rules``: ties go to the simpler (earlier) rule."""
    return next(i for i, r in enumerate(rules) if r.name == name)
