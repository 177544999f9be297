"""Evaluation: certified accuracy curves, ACR, abstain rates, cost, and the written report.

Numpy and matplotlib only, so a report can be rebuilt from ``metrics.json`` anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from rrise.fileio import atomic_path, atomic_write_json, atomic_write_text

__all__ = [
    "DEFAULT_RADII",
    "pseudo_count_certify",
    "detection_limit",
    "reference_violations",
    "reliability_plot",
    "violation_stats",
    "certified_accuracy",
    "average_certified_radius",
    "method_metrics",
    "write_report",
    "format_markdown_table",
]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def certified_accuracy(
    radius: np.ndarray, pred: np.ndarray, labels: np.ndarray, radii: tuple[float, ...] | np.ndarray
) -> np.ndarray:
    """Fraction of inputs predicted correctly (not abstaining, ``pred >= 0``) with radius ≥ r, per r."""
    radius, pred, labels = np.asarray(radius), np.asarray(pred), np.asarray(labels)
    ok = (pred >= 0) & (pred == labels)
    return np.array([np.mean(ok & (radius >= r)) for r in radii], dtype=np.float64)


def average_certified_radius(radius: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> float:
    """ACR: mean radius over all inputs, counting 0 for wrong or abstained ones."""
    radius, pred, labels = np.asarray(radius), np.asarray(pred), np.asarray(labels)
    ok = (pred >= 0) & (pred == labels)
    return float(np.mean(np.where(ok, radius, 0.0)))


def method_metrics(
    radius: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray,
    *,
    radii: tuple[float, ...] = DEFAULT_RADII,
    per_query_s: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The numbers the report keeps for one certification method."""
    pred = np.asarray(pred)
    return {
        "n": int(len(pred)),
        "certified_accuracy": [round(float(v), 6) for v in certified_accuracy(radius, pred, labels, radii)],
        "acr": round(average_certified_radius(radius, pred, labels), 6),
        "abstain_rate": round(float(np.mean(pred < 0)), 6),
        "per_query_s": per_query_s,
        **extra,
    }


def pseudo_count_certify(
    probs: np.ndarray, n: int, sigma: float, alpha: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Accelerated Smoothing radius (arXiv 2402.07498): Clopper–Pearson on pseudo-counts ⌊n·ŝ⌋.

    No calibration and NO guarantee: the surrogate's ŝ is treated as if it were an MC frequency.
    Returns ``(pred with -1 = abstain, radius, p_lower)``.
    """
    from rrise.stats import clopper_pearson_lower, norm_ppf

    p = np.asarray(probs, dtype=np.float64)
    top = p.argmax(1)
    k = np.floor(n * p[np.arange(len(p)), top]).astype(np.int64)
    p_low = np.atleast_1d(clopper_pearson_lower(k, n, alpha))
    certified = p_low > 0.5
    radius = np.where(certified, sigma * np.asarray(norm_ppf(np.where(certified, p_low, 0.5))), 0.0)
    return np.where(certified, top, -1), radius, p_low


def reference_violations(
    classes: np.ndarray, certified: np.ndarray, p_lower: np.ndarray, ref_counts: np.ndarray, *, level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input: the reference count ``k`` of ``classes``, its one-sided (1 − ``level``)
    Clopper–Pearson upper bound, and whether a certified ``p_lower`` lies above that bound."""
    from rrise.stats import clopper_pearson_upper

    ref = np.asarray(ref_counts)
    n_ref = int(ref[0].sum()) if len(ref) else 0
    k = ref[np.arange(len(ref)), np.asarray(classes)]
    upper = np.atleast_1d(clopper_pearson_upper(k, n_ref, level))
    return k, upper, np.asarray(certified) & (np.asarray(p_lower) > upper)


def detection_limit(p: np.ndarray | float, n_ref: int, level: float) -> np.ndarray:
    """The smallest excess ``d`` of a claimed ``p`` over the truth ``p − d`` that a reference of
    ``n_ref`` draws flags at least half the time with the one-sided (1 − ``level``) upper-bound test.

    The test flags ``p`` when ``clopper_pearson_upper(k, n_ref, level) < p``, i.e. when
    ``k ≤ k*(p)``; a truth ``t`` puts the median of ``k`` at about ``n_ref·t``, so ``d = p − k*/n_ref``
    (``p`` itself when no count can flag it). Smaller excesses go unseen more often than not.
    """
    from rrise.stats import clopper_pearson_upper

    p = np.atleast_1d(np.asarray(p, dtype=np.float64))
    upper = np.atleast_1d(clopper_pearson_upper(np.arange(n_ref + 1), n_ref, level))  # increasing in k
    k_star = np.searchsorted(upper, p, side="left") - 1  # largest k whose upper bound is below p
    return np.where(k_star >= 0, p - np.maximum(k_star, 0) / n_ref, p)


def _rate(v: int, n: int) -> dict[str, Any]:
    """A count out of ``n`` with its rate and two-sided 95% Clopper–Pearson interval."""
    from rrise.stats import clopper_pearson_lower, clopper_pearson_upper

    lo = float(clopper_pearson_lower(v, n, 0.025)) if n else 0.0
    hi = float(clopper_pearson_upper(v, n, 0.025)) if n else 1.0
    return {"count": v, "of": n, "rate": round(v / n, 6) if n else 0.0, "ci95": [round(lo, 6), round(hi, 6)]}


def violation_stats(
    pred: np.ndarray, p_lower: np.ndarray, ref_counts: np.ndarray, *, level: float = 0.001
) -> dict[str, Any]:
    """How often a certified ``p_lower`` exceeds what a high-budget reference MC run supports.

    Two tests against the reference counts ``[B, K]`` (independent draws):

    * ``violations`` (kept for comparison with older reports): certified ``p_lower`` above the
      one-sided (1 − ``level``) Clopper–Pearson upper bound of ``p_Â``; it misses excesses below the
      ``detection_limit`` and so undercounts.
    * ``above_point_estimate``: certified ``p_lower`` above the reference frequency ``k/N_ref``,
      divided by ALL inputs (the guarantee bounds P(certified and wrong) ≤ α + β over all inputs). A
      true violation is counted with probability about 1/2 or more; a sound ``p_lower`` within a
      standard error of the truth is sometimes counted too, so this rate errs towards alarm.

    ``rate`` and ``ci95`` (95% Clopper–Pearson) of the first test are among certified inputs.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref_counts)
    n_ref = int(ref[0].sum()) if len(ref) else 0
    cert = pred >= 0
    k, _, violation = reference_violations(np.where(cert, pred, 0), cert, p_lower, ref, level=level)
    v, c = int(violation.sum()), int(cert.sum())
    above = cert & (np.asarray(p_lower) > k / max(n_ref, 1))
    cert_p = np.asarray(p_lower)[cert]
    limit = detection_limit(cert_p, n_ref, level) if c and n_ref else np.zeros(0)
    upper_test = _rate(v, c)
    return {
        "violations": v,
        "certified": c,
        "rate": v / c if c else 0.0,
        "ci95": upper_test["ci95"],
        "n_ref": n_ref,
        "level": level,
        "inputs": int(len(pred)),
        "above_point_estimate": _rate(int(above.sum()), int(len(pred))),
        "above_upper_bound_over_all_inputs": _rate(v, int(len(pred))),
        "detection_limit": {
            "median over certified p̃": round(float(np.median(limit)), 6) if len(limit) else None,
            "largest over certified p̃": round(float(np.max(limit)), 6) if len(limit) else None,
        },
    }


def reliability_plot(top_prob: np.ndarray, mc_freq: np.ndarray, path: Path, bins: int = 12) -> None:
    """Surrogate ŝ against the MC frequency of the same class, binned on ŝ (calibration inputs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, f = np.asarray(top_prob), np.asarray(mc_freq)
    edges = np.unique(np.quantile(s, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, max(len(edges) - 2, 0))
    groups = [which == b for b in range(max(len(edges) - 1, 1)) if np.any(which == b)]
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.scatter(s, f, s=3, alpha=0.15, label="calibration inputs")
    ax.plot(
        [s[g].mean() for g in groups],
        [f[g].mean() for g in groups],
        marker="o",
        color="C3",
        label="binned mean",
    )
    ax.set_xlabel("surrogate top-class probability ŝ")
    ax.set_ylabel("MC frequency of that class")
    ax.set_title("Reliability of the surrogate")
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def format_markdown_table(metrics: dict[str, Any], radii: tuple[float, ...] | None = None) -> str:
    """Certified accuracy (%) at each radius, one row per method, plus ACR, abstain, the two
    violation counts (above the reference's upper bound among certified inputs; above its point
    estimate among all inputs, with the 95% upper end) and time."""
    all_radii = metrics["radii"]
    show = list(radii) if radii is not None else all_radii
    cols = [all_radii.index(r) for r in show]
    head = (
        "| method | "
        + " | ".join(f"r={r:g}" for r in show)
        + " | ACR | abstain | violations | p̃ > p̂_ref (all inputs) | per query |"
    )
    sep = "|---" * (len(show) + 6) + "|"
    rows = [head, sep]
    for name, m in metrics["methods"].items():
        ca = [_pct(m["certified_accuracy"][c]) for c in cols]
        t = m.get("per_query_s")
        t_txt = "—" if t is None else _fmt_seconds(t)
        v = m.get("violations")
        v_txt = m.get("guarantee_kind", "—") if v is None else f"{v['violations']}/{v['certified']}"
        rows.append(
            f"| {name} | "
            + " | ".join(ca)
            + f" | {m['acr']:.3f} | {_pct(m['abstain_rate'])}% | {v_txt} | {_point_rate(v)} | {t_txt} |"
        )
    return "\n".join(rows)


def _point_rate(v: dict[str, Any] | None) -> str:
    """``count/inputs (rate %, 95% upper end %)`` of p̃ above the reference point estimate."""
    pt = (v or {}).get("above_point_estimate")
    if not pt:
        return "—"
    return f"{pt['count']}/{pt['of']} ({_pct(pt['rate'])}%, ≤ {_pct(pt['ci95'][1])}%)"


def _fmt_seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.0f} µs"


def _plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    radii = metrics["radii"]
    for name, m in metrics["methods"].items():
        # a step: certified accuracy at r counts radii ≥ r, so it is constant up to the next grid point
        ax.step(radii, [100 * v for v in m["certified_accuracy"]], where="post", marker="o", label=name)
    ax.set_xlabel("ℓ2 radius (in [0,1]-pixel units)")
    ax.set_ylabel("certified accuracy (%)")
    title = f"{metrics['dataset']}, σ = {metrics['sigma']:g}"
    if metrics.get("profile") != "full":
        title += f" ({metrics.get('profile')} profile)"
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def write_report(report_dir: str | os.PathLike, metrics: dict[str, Any]) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and ``certified_accuracy.png`` into ``report_dir``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": report_dir / "metrics.json",
        "report": report_dir / "report.md",
        "plot": report_dir / "certified_accuracy.png",
    }
    if (report_dir / "reliability.png").exists():
        paths["reliability"] = report_dir / "reliability.png"
    atomic_write_json(paths["metrics"], metrics)
    _plot(metrics, paths["plot"])
    atomic_write_text(paths["report"], _markdown(metrics))
    return paths


def _error_row(name: str, row: dict[str, Any], cells: int) -> str:
    """A rule that could not run: its name, the reason, and empty cells so the row has every column."""
    return f"| {name} ({row['rule']}) | could not run: {row['error']} |" + " |" * (cells - 1)


def _rules_section(rules: dict[str, Any] | None) -> list[str]:
    """Each calibration rule tried: on the selection split (where the choice is made) and on test."""
    if not rules:
        return []
    lines = ["## Calibration rules", ""]
    sel = rules.get("selection") or {}
    radii = [f"{r:g}" for r in sel.get("radii", [0.0, 0.25, 0.5, 0.75])]
    if sel.get("rules"):
        lines += [
            f"Chosen on the selection split ({sel['inputs']} inputs with N = {sel['n_mc']} MC draws, "
            f"α = {sel['alpha']:g}; {sel['split']}; mean certified accuracy over r = "
            f"{', '.join(radii)}; {sel.get('criterion', 'best mean')}): **{rules['chosen']}**.",
            "",
            "| rule | "
            + " | ".join(f"r={r}" for r in radii)
            + " | mean | behind best (SE) | ACR | abstain | miss rate |",
            "|---" * (len(radii) + 6) + "|",
        ]
        for name, row in sel["rules"].items():
            if "error" in row:
                lines.append(_error_row(name, row, len(radii) + 5))
                continue
            cells = " | ".join(f"{row['certified_accuracy'][r]:.1f}" for r in radii)
            lines.append(
                f"| {name} ({row['rule']}) | {cells} | {row['mean_certified_accuracy']:.2f} | "
                f"{row.get('behind_best', 0):.2f} ({row.get('behind_best_se', 0):.2f}) | "
                f"{row['acr']:.3f} | {row['abstain_pct']:.1f}% | {row['miss_rate']:.4f} |"
            )
        lines.append("")
    elif sel.get("note"):
        lines += [f"{sel['note'].rstrip('.')}. Rule used: **{rules.get('used', rules['chosen'])}**.", ""]
    if sel.get("rules") and rules.get("used", rules["chosen"]) != rules["chosen"]:
        lines += [
            f"The bundle's calibration uses rule **{rules['used']}** instead (`rrise calibrate --rule`).",
            "",
        ]
    test = rules.get("test") or {}
    if test:
        lines += [
            "Every rule on the test inputs, for transparency (not used to choose):",
            "",
            "| rule | r=0 | r=0.25 | r=0.5 | r=0.75 | ACR | abstain | violations |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in test.items():
            if "error" in row:
                lines.append(_error_row(name, row, 7))
                continue
            ca = row["certified_accuracy"]
            v = row.get("violations") or {}
            lines.append(
                f"| {name} ({row['rule']}) | "
                + " | ".join(_pct(ca[i]) for i in range(4))
                + f" | {row['acr']:.3f} | {_pct(row['abstain_rate'])}% | "
                f"{v.get('violations', '—')}/{v.get('certified', '—')} |"
            )
        lines.append("")
    return lines


def _not_run_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per row the report could not compute (e.g. an α too small for m), with why."""
    return [
        f"- {name}: not computable here: {why}"
        for name, why in (metrics.get("methods_not_run") or {}).items()
    ]


def _markdown(metrics: dict[str, Any]) -> str:
    cfg = metrics["config"]
    lines = [f"# RRISE evaluation: {metrics['dataset']}, σ = {metrics['sigma']:g}", ""]
    if metrics.get("profile_note"):
        lines += [f"> **{metrics['profile']} profile.** {metrics['profile_note']}", ""]
    lines += [
        "## Certified accuracy (%)",
        "",
        format_markdown_table(metrics),
        "",
        *[
            f"- {name}: not computable here: {why}"
            for name, why in metrics.get("methods_not_run", {}).items()
        ],
        "",
        "![certified accuracy](certified_accuracy.png)",
        "",
        metrics.get("violation_note", ""),
        "",
        "![reliability](reliability.png)",
        "",
        *_rules_section(metrics.get("rules")),
        "## Guarantee",
        "",
        metrics["guarantee"],
        "",
        "## Set-up",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in cfg.items()]
    cost = metrics.get("cost", {})
    if cost:
        lines += ["", "## Cost", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in cost.items()]
    cap = metrics.get("cap", {})
    if cap:
        lines += ["", "## The Monte Carlo cap", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in cap.items()]
    stages = metrics.get("stage_seconds", {})
    if stages:
        lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in stages.items()]
    lines.append("")
    return "\n".join(lines)
