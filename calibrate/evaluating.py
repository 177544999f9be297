"""`rrise evaluate`: RRISE beside Cohen's MC baseline and Accelerated Smoothing on the same test inputs.

The RRISE row is the calibration the bundle gets (``calibration.json``: its rule, α, β, δ, score and
quantiles), applied to the work folder's surrogate; rows for other rules or α are recomputed for
comparison and say so. The metrics and figures are written by :mod:`rrise.calibrate.report`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rrise.bundle import GUARANTEE
from rrise.calibration import Calibration, conformalize
from rrise.certificate import certify_from_probs
from rrise.fileio import load_npz, read_json
from rrise.runtime.backends import OnnxRuntimeBackend
from rrise.stats import norm_ppf

from .adaptive_eval import EvalSplit
from .adaptive_workdir import adaptive_section
from .calibrating import (
    CalibrateSettings,
    chosen_rule,
    load_calibration,
    load_calibration_npz,
    model_hashes,
    rule_spec,
    selection_data,
    surrogate_probs,
)
from .cohen import COHEN_NPZ, cohen_from_counts
from .counts import (
    CALIBRATION_STORE,
    CAP_STORE,
    REFERENCE_STORE,
    RULE_CAP_STORE,
    RULE_STORE,
    TARGET_STORES,
    load_store_counts,
    prepare_base_model,
)
from .fit import FRESH_COST
from .mc import certify
from .measures import DEFAULT_RADII, detection_limit, method_metrics, pseudo_count_certify, violation_stats
from .report import reliability_plot, write_report
from .rules import RULES, get_rule
from .workdir import Workdir

__all__ = ["stage_evaluate"]

RECOMPUTED = "recomputed for comparison"
# Every report sets RRISE and Cohen side by side at each of these α (and the profile's own).
REPORT_ALPHAS = (0.01, 0.001)


class _Violations:
    """Violations of certified p̃ against a reference: the high-budget store of `rrise reference`
    (N_ref draws on the first test inputs) when it exists, else Cohen's estimation draws on every
    test input; both independent of everything RRISE and the baseline were trained and calibrated on."""

    def __init__(self, w: Workdir, cohen: dict[str, np.ndarray]):
        idx = cohen["index"]
        self.cohen_counts = cohen["counts"]
        self.counts, self.rows = self.cohen_counts, np.arange(len(idx))
        self.high_budget = (w.path(REFERENCE_STORE) / "manifest.json").exists()
        if self.high_budget:
            ref_index, self.counts = load_store_counts(w, REFERENCE_STORE)
            self.rows = np.searchsorted(idx, ref_index)
            if not np.array_equal(idx[np.minimum(self.rows, len(idx) - 1)], ref_index):
                raise ValueError(f"{w.path(REFERENCE_STORE)} holds inputs that are not among the test inputs")

    def __call__(self, pred: np.ndarray, p_low: np.ndarray) -> dict[str, Any]:
        out = violation_stats(pred[self.rows], p_low[self.rows], self.counts)
        if self.high_budget:
            out["against Cohen's estimation draws on every test input"] = violation_stats(
                pred, p_low, self.cohen_counts
            )
        return out

    def note(self, p_cap: float) -> str:
        """What the two violation columns count, against which reference, and what they cannot see."""
        n_ref, level = int(self.counts[0].sum()), 0.001
        at = [0.9, 0.99, p_cap]
        limits = ", ".join(
            f"{d:.4f} at p̃ = {q:.4g}" for q, d in zip(at, detection_limit(np.array(at), n_ref, level))
        )
        source = (
            f"`rrise reference`'s {n_ref} fresh MC draws"
            if self.high_budget
            else f"Cohen's {n_ref} estimation draws (run `rrise reference` for a reported run)"
        )
        return (
            f"Violations, against {source} on each of {len(self.rows)} test inputs (independent of "
            "calibration). **violations**: certified p̃ above the one-sided 99.9% Clopper–Pearson upper "
            "bound of the reference frequency of the certified class, among certified inputs; it sees "
            f"an excess of p̃ over the truth only from the detection limit up ({limits}), so it "
            "undercounts. **p̃ > p̂_ref**: certified p̃ above the reference point estimate, divided by "
            "ALL inputs, with the upper end of its 95% Clopper–Pearson interval: a true violation is "
            "counted about half the time or more, and a sound p̃ within a standard error of the truth "
            "is sometimes counted too, so it errs towards alarm. RRISE's guarantee bounds the rate over "
            "all inputs by α + β; Cohen's bounds each input's by α."
        )


def _finite(v: float) -> float | None:
    return round(float(v), 6) if math.isfinite(v) else None


def _rrise_row(cal: Calibration, probs: np.ndarray, labels: np.ndarray, violations) -> dict[str, Any]:
    cert = certify_from_probs(probs, cal)
    extra: dict[str, Any] = {"quantile": _finite(cal.quantile)}
    if cal.bin_edges:
        extra["quantile"] = [_finite(q) for q in cal.bin_quantiles]
        extra["bin_edges"] = list(cal.bin_edges)
    if cal.score_map:
        extra["score_map"] = [list(k) for k in cal.score_map]
    if cal.score_scale:
        extra["score_scale"] = [list(k) for k in cal.score_scale]
    if cal.delta is not None:
        extra["delta"] = cal.delta
    return method_metrics(
        cert.radius,
        cert.pred,
        labels,
        per_query_s=None,
        **extra,
        violations=violations(cert.pred, cert.p_lower),
    )


def _label(cal: Calibration, rule: str, tag: str) -> str:
    delta = "" if cal.delta is None else f", δ={cal.delta:g}"
    return f"RRISE ({cal.score}, {get_rule(rule).describe()}, α={cal.alpha:g}{delta}), {tag}"


def _recalibrated(w: Workdir, rule: str, cal: Calibration, calnpz, selection, alpha: float) -> Calibration:
    """``rule`` at ``alpha`` with the bundle's β, δ and score (its transform and clip), on the same
    calibration inputs."""
    levels = CalibrateSettings(
        alpha=alpha,
        beta=cal.beta,
        delta=cal.delta,
        score=cal.score,
        clip_at_abstention=cal.clip_at_abstention,
    )
    spec = rule_spec(w, rule, levels, m=cal.m, selection=selection)
    spec = replace(spec, cap_draws=cal.cap_draws)
    return conformalize(spec, calnpz["probs"], calnpz["counts"], cap_counts=calnpz.get("cap_counts"))


def _rrise_rows(w: Workdir, cal: Calibration, rule: str, probs, labels, violations) -> tuple[dict, ...]:
    """``(methods, rules_test, not_run)``: the bundle's calibration first; then, recomputed for comparison,
    the one-quantile rule and the bundle's rule at the profile's other α, and every rule at the
    bundle's α (``rules_test``: shown for transparency, never used to choose); ``not_run``: the rows
    that could not be computed (e.g. α too small for m), with why."""
    calnpz, selection = load_calibration_npz(w), selection_data(w)
    # the bundle refuses an infinite quantile: such a row is never called the bundle's
    tag = "as bundled" if math.isfinite(cal.quantile) else "NOT bundled (its quantile is infinite)"
    methods = {_label(cal, rule, tag): _rrise_row(cal, probs, labels, violations)}
    rules_test: dict[str, Any] = {}
    not_run: dict[str, str] = {}
    for r in RULES:
        try:
            other = cal if r.name == rule else _recalibrated(w, r.name, cal, calnpz, selection, cal.alpha)
        except ValueError as exc:
            rules_test[r.name] = {"rule": r.describe(), "error": str(exc)}
            continue
        rules_test[r.name] = {"rule": r.describe(), **_rrise_row(other, probs, labels, violations)}
    for alpha in dict.fromkeys([cal.alpha, *w.prof.alphas, *REPORT_ALPHAS]):
        for name in dict.fromkeys([rule, "single"]):
            if (alpha, name) == (cal.alpha, rule):
                continue
            try:
                other = _recalibrated(w, name, cal, calnpz, selection, alpha)
            except ValueError as exc:
                w.log(f"[evaluate] {get_rule(name).describe()} at α={alpha:g}: {exc}")
                not_run[f"RRISE ({get_rule(name).describe()}, α={alpha:g})"] = str(exc)
                continue
            methods[_label(other, name, RECOMPUTED)] = _rrise_row(other, probs, labels, violations)
    return methods, rules_test, not_run


def _side_by_side_query_seconds(
    w: Workdir, images: np.ndarray, cal: Calibration, rounds: int = 5, per_round: int = 200
) -> tuple[float, float]:
    """Median wall time of one query of RRISE (a batch-1 surrogate pass plus the certificate) and of
    Cohen MC (n0 + n base-model draws for one input), timed in alternation in this process, so that
    their ratio does not depend on what else the machine was doing at another moment."""
    p = w.prof
    backend = OnnxRuntimeBackend(w.path("surrogate.onnx"))
    base, _ = prepare_base_model(w, "onnxruntime", "cpu", images[:1], p.n0 + p.n)

    def rrise_query(x: np.ndarray) -> None:
        certify_from_probs(backend.run(x)[0], cal)

    for i in range(100):  # warm-up: thread pools, allocations
        rrise_query(images[i % len(images)][None])
    rrise_s, mc_s = [], []
    for r in range(rounds):
        x = images[r % len(images)][None]
        t0 = time.perf_counter()
        certify(base, x, n0=p.n0, n=p.n, sigma=w.config.sigma, alpha=p.mc_alpha, batch_size=p.batch_size)
        mc_s.append(time.perf_counter() - t0)
        for i in range(per_round):
            xi = images[(r * per_round + i) % len(images)][None]
            t0 = time.perf_counter()
            rrise_query(xi)
            rrise_s.append(time.perf_counter() - t0)
    return float(np.median(rrise_s)), float(np.median(mc_s))


def _cohen_rows(w: Workdir, cohen, labels, mc_per_query: float, violations) -> dict[str, Any]:
    """Cohen's MC baseline at the profile's α, and at every α RRISE is reported at (0.01 and 0.001
    among them), recomputed from the certify stage's stored counts: the same draws, so the rows
    differ only by the confidence they claim."""
    p = w.prof
    rows = {}
    for alpha in dict.fromkeys([p.mc_alpha, *REPORT_ALPHAS, *p.alphas]):
        if alpha == p.mc_alpha:
            pred, radius, p_low = cohen["pred"], cohen["radius"], cohen["p_lower"]
            tag = ""
        else:
            pred, radius, p_low = cohen_from_counts(
                cohen["counts_selection"], cohen["counts"], sigma=w.config.sigma, alpha=alpha
            )
            tag = f", {RECOMPUTED} from the same counts"
        rows[f"Cohen MC (n0={p.n0}, n={p.n}, α={alpha:g}){tag}"] = method_metrics(
            radius,
            pred,
            labels,
            per_query_s=mc_per_query,
            guarantee_kind="per input",
            # against its own estimation draws p̲ could never exceed k/n: only an independent reference counts
            violations=violations(pred, p_low) if violations.high_budget else None,
        )
    return rows


def _baseline_rows(w: Workdir, cohen, images, labels, per_query: float, mc_per_query: float, violations):
    """Cohen's MC baseline and, when trained, Accelerated Smoothing (no calibration, no guarantee)."""
    p = w.prof
    rows = _cohen_rows(w, cohen, labels, mc_per_query, violations)
    if w.path("baseline_js.onnx").exists():
        js_probs = surrogate_probs(w.path("baseline_js.onnx"), images)
        pred, radius, p_low = pseudo_count_certify(js_probs, p.n, w.config.sigma, p.mc_alpha)
        rows[f"Accelerated Smoothing (JS, ⌊{p.n}·ŝ⌋, no calibration)"] = method_metrics(
            radius, pred, labels, per_query_s=per_query, violations=violations(pred, p_low)
        )
    return rows


def one_time_evaluations(w: Workdir) -> dict[str, int]:
    """Base-model evaluations each one-time stage spent, read from what the work folder holds: every
    count store the product needs (surrogate targets and their selection split, rule selection,
    calibration) and the fresh draws of surrogate training (``FRESH_COST``). Cohen's baseline and
    the reference are evaluation, not part of the product's cost, and are left out."""
    out: dict[str, int] = {}
    for what, name in (
        ("surrogate targets", TARGET_STORES["targets"]),
        ("surrogate selection", TARGET_STORES["selection"]),
        ("rule selection", RULE_STORE),
        ("rule selection at the cap", RULE_CAP_STORE),
        ("calibration", CALIBRATION_STORE),
        ("calibration at the cap", CAP_STORE),
    ):
        meta = read_json(w.path(name) / "meta.json") or {}
        if meta:
            out[what] = int(meta.get("n", 0)) * int(meta.get("num_inputs", 0))
    fresh = read_json(w.path(FRESH_COST)) or {}
    if fresh.get("base_evaluations"):
        out["fresh surrogate targets"] = int(fresh["base_evaluations"])
    return out


def _cost(w: Workdir, cohen, per_query: float, mc_per_query: float) -> dict[str, Any]:
    """One-time cost at the MC rate measured side by side (seconds per draw of a single query), so
    that it compares with the per-query times; stage wall times are kept apart as recorded. Every
    one-time base-model evaluation is counted, rule selection included."""
    p = w.prof
    parts = one_time_evaluations(w)
    one_time_evals = sum(parts.values())
    one_time_mc_s = one_time_evals * mc_per_query / (p.n0 + p.n)
    one_time_s = one_time_mc_s + w.stage_seconds().get("train-surrogate", 0.0)
    return {
        "one-time base-model evaluations": one_time_evals,
        **{f"  of which {k}": v for k, v in parts.items()},
        "one-time MC seconds at the measured MC rate": round(one_time_mc_s, 1),
        "one-time seconds (that MC + surrogate training)": round(one_time_s, 1),
        "MC per query (s)": round(mc_per_query, 6),
        "RRISE per query (s)": round(per_query, 7),
        "speedup per query": round(mc_per_query / per_query, 1),
        "per-query times": (
            "medians timed in alternation in one process: 5 MC queries (n0 + n draws, batched "
            "onnxruntime) and 1,000 RRISE queries (batch 1, certificate included)"
        ),
        "MC per query over the whole certify stage (s)": round(
            float(cohen["seconds"]) / len(cohen["index"]), 6
        ),
        "break-even queries": int(np.ceil(one_time_s / max(mc_per_query - per_query, 1e-12))),
        "break-even in evaluations (one-time evaluations / (n0 + n))": int(
            np.ceil(one_time_evals / (p.n0 + p.n))
        ),
    }


def _adaptive(w: Workdir, cal: Calibration, probs, cohen, violations: _Violations, cost) -> dict[str, Any]:
    """The adaptive mode's rows on the test inputs (Cohen's stored draws replayed), each with its
    per-query time and break-even counting its draws; the break-even of the bundle's routing rule's
    row (the surrogate alone's where there is no rule) added to ``cost``."""
    p = w.prof
    test = EvalSplit(
        certify_from_probs(probs, cal), cohen["labels"], cohen["counts"], cohen["counts_selection"]
    )
    mc_s = cost["MC per query (s)"]
    costs = {
        "rrise_s": cost["RRISE per query (s)"],
        "cohen_s": mc_s,
        "draw_s": mc_s / (p.n0 + p.n),
        "cohen_draws": p.n0 + p.n,
        "one_time_s": cost["one-time seconds (that MC + surrogate training)"],
        "one_time_evaluations": cost["one-time base-model evaluations"],
    }
    reference = (violations.rows, violations.counts) if violations.high_budget else None
    section = adaptive_section(w, cal, test, reference, costs)
    row = section["rows"].get(section["bundled_row"]) or next(iter(section["rows"].values()))
    which = "the bundle's routing rule" if section["bundled_row"] else "the surrogate alone"
    cost[f"break-even queries, adaptive with {which} (its draws counted)"] = row["break_even_queries"]
    cost[f"break-even in evaluations, adaptive with {which}"] = row["break_even_in_evaluations"]
    return section


def agreement_summary(calnpz: dict[str, np.ndarray]) -> dict[str, Any]:
    """How often the surrogate's top class is the smoothed base classifier's on the calibration
    inputs (the Monte Carlo count vector's largest entry; a tie counts as agreement when the
    surrogate's class is among the tied), overall and among inputs where that class holds more than
    half the draws (the ones MC could certify)."""
    counts, probs = calnpz["counts"], calnpz["probs"]
    if not len(counts):
        return {}
    rows = np.arange(len(counts))
    ours = counts[rows, probs.argmax(axis=1)]
    agree = ours == counts.max(axis=1)
    confident = counts.max(axis=1) > counts.sum(axis=1) / 2
    out: dict[str, Any] = {"calibration inputs": len(counts)}
    out["top class agrees"] = round(float(agree.mean()), 4)
    if confident.any():
        out["top class agrees where MC's top class holds > 1/2 of the draws"] = round(
            float(agree[confident].mean()), 4
        )
    return out


def _cap_summary(calnpz: dict[str, np.ndarray], cal: Calibration) -> dict[str, Any]:
    """How much the MC budget limits the radii: the share of calibration inputs whose every draw
    voted for the surrogate's class (their p̲ is at the first stage's cap), and the radius the cap
    allows; with draws at the cap, the share still at the raised cap β^(1/N₂)."""
    counts, probs = calnpz["counts"], calnpz["probs"]
    top = probs.argmax(axis=1)
    rows = np.arange(len(top))
    at_cap = counts[rows, top] == cal.n_mc
    share = round(float(at_cap.mean()), 4)
    out: dict[str, Any] = {"calibration inputs with every draw on the surrogate's class": share}
    if cal.cap_draws is not None and "cap_counts" in calnpz:
        still = at_cap & (calnpz["cap_counts"][rows, top] == cal.cap_draws)
        out[f"of those, every one of N₂ = {cal.cap_draws} further draws too"] = round(float(still.mean()), 4)
        out["p_cap = β^(1/N₂)"] = round(cal.p_cap, 8)
    else:
        out["p_cap = β^(1/N_cal)"] = round(cal.p_cap, 8)
    out["largest radius σ·Φ⁻¹(p_cap) (at q̂ = 0)"] = round(cal.sigma * float(norm_ppf(cal.p_cap)), 4)
    return out


def _config(w: Workdir, cal: Calibration, rule: str, n_test: int) -> dict[str, Any]:
    p = w.prof
    delta = "" if cal.delta is None else f", δ = {cal.delta:g}"
    return {
        "profile": p.name,
        "dataset": w.config.dataset,
        "sigma": w.config.sigma,
        "seed": w.config.seed,
        **w.config.model_spec.describe(p),
        "surrogate targets": (
            f"fresh: {p.steps} steps × {p.fresh_batch} images × {p.draws} draws"
            if p.steps
            else f"{p.n_targets} inputs × {p.target_draws} draws"
        ),
        "calibration": (
            f"m = {cal.m}, N_cal = {cal.n_mc}, α = {cal.alpha:g}, β = {cal.beta:g}{delta}, "
            f"score = {cal.score}, rule = {rule}"
            + ("" if cal.cap_draws is None else f", N₂ = {cal.cap_draws} draws at the cap")
        ),
        "test inputs": n_test,
        "Cohen MC": f"n0 = {p.n0}, n = {p.n}, α = {p.mc_alpha}",
    }


def _reliability(w: Workdir, calnpz: dict[str, np.ndarray]) -> None:
    probs, counts = calnpz["probs"], calnpz["counts"]
    top = probs.argmax(1)
    rows = np.arange(len(top))
    mc_freq = counts[rows, top] / counts[0].sum()
    w.path("report").mkdir(exist_ok=True)
    reliability_plot(probs[rows, top], mc_freq, w.path("report/reliability.png"))


def stage_evaluate(w: Workdir) -> list[Path]:
    """RRISE beside Cohen MC and Accelerated Smoothing on the same test inputs → report/."""
    cal, record = load_calibration(w)  # refuses a calibration made with other models
    rule = record.get("rule") or chosen_rule(w)
    cohen = load_npz(
        w.path(COHEN_NPZ),
        ("index", "labels", "pred", "radius", "p_lower", "counts", "counts_selection", "seconds"),
        "Cohen",
    )
    idx, labels = cohen["index"], cohen["labels"]
    images = w.data("test").images[idx]
    violations = _Violations(w, cohen)
    probs = surrogate_probs(w.path("surrogate.onnx"), images)
    methods, rules_test, not_run = _rrise_rows(w, cal, rule, probs, labels, violations)
    per_query, mc_per_query = _side_by_side_query_seconds(w, images, cal)
    for m in (*methods.values(), *(r for r in rules_test.values() if "error" not in r)):
        m["per_query_s"] = per_query
    methods.update(_baseline_rows(w, cohen, images, labels, per_query, mc_per_query, violations))
    cost = _cost(w, cohen, per_query, mc_per_query)
    adaptive = _adaptive(w, cal, probs, cohen, violations, cost)
    calnpz = load_calibration_npz(w)
    _reliability(w, calnpz)
    metrics = {
        "dataset": w.config.dataset,
        "sigma": w.config.sigma,
        "profile": w.prof.name,
        "profile_note": w.prof.note,
        "radii": list(DEFAULT_RADII),
        "methods": methods,
        "methods_not_run": not_run,
        "guarantee": GUARANTEE,
        "calibration": record,
        "models": model_hashes(w),
        "rules": {
            "chosen": chosen_rule(w),
            "used": rule,
            "selection": read_json(w.path("rules.json")),
            "test": rules_test,
        },
        "violation_note": violations.note(cal.p_cap),
        "config": _config(w, cal, rule, len(idx)),
        "cost": cost,
        "adaptive": adaptive,
        "images": read_json(w.path("data_splits.json")),  # `rrise build`'s images (None otherwise)
        "cap": _cap_summary(calnpz, cal),
        "agreement": agreement_summary(calnpz),
        "stage_seconds": w.stage_seconds(),
    }
    return list(write_report(w.path("report"), metrics).values())
