"""The written report of `rrise evaluate`: ``metrics.json``, ``report.md`` and the figures, from the
metrics :mod:`rrise.calibrate.evaluating` gathers.

Numpy and matplotlib only, so a report can be rebuilt from ``metrics.json`` anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from rrise.fileio import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["format_markdown_table", "reliability_plot", "write_report"]


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
    """Write ``metrics.json``, ``report.md`` and ``certified_accuracy.png`` into ``report_dir``
    (the adaptive section's figure is drawn by :mod:`rrise.calibrate.adaptive_workdir`)."""
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
            out = f" — excluded: {row['excluded']}" if row.get("excluded") else ""
            lines.append(
                f"| {name} ({row['rule']}){out} | {cells} | {row['mean_certified_accuracy']:.2f} | "
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


def _adaptive_lines(section: dict[str, Any] | None) -> list[str]:
    """The adaptive mode beside the surrogate alone and Cohen: certified accuracy, abstentions, mean
    and p95 base-model draws per query and their ratio to Cohen's, time and break-even (queries, the
    draws counted) and violations."""
    if not section:
        return []
    radii, show = section["radii"], [r for r in (0.0, 0.25, 0.5, 0.75, 1.0) if r in section["radii"]]
    lines = ["## Adaptive certification: the surrogate first, draws where it falls short", ""]
    lines += [section.get("note", ""), ""]
    lines += [
        "| row | "
        + " | ".join(f"r={r:g}" for r in show)
        + " | abstain | mean draws | p95 draws | ÷ Cohen's | per query | break-even | violations |",
        "|---" * (len(show) + 8) + "|",
    ]
    for name, row in section["rows"].items():
        ca = " | ".join(_pct(row["certified_accuracy"][radii.index(r)]) for r in show)
        v = row.get("violations")
        t = row.get("per_query_s")
        lines.append(
            f"| {name} | {ca} | {_pct(row['abstain_rate'])}% | {row['mean_draws']:g} | "
            f"{row['p95_draws']:g} | {row['draws_ratio_to_cohen']:.4f} | "
            f"{'—' if t is None else _fmt_seconds(t)} | {_or_dash(row.get('break_even_queries'))} | "
            f"{'—' if v is None else str(v['violations']) + '/' + str(v['certified'])} |"
        )
    lines += ["", *[f"- {name}: not run: {why}" for name, why in section.get("not_run", {}).items()]]
    rule = section.get("bundled_routing")
    if rule:
        score = "any ŝ" if rule["score_below"] is None else f"ŝ < {rule['score_below']:g}"
        lines += [
            "",
            f"Routing rule in the bundle (`adaptive.routing`, chosen on the {rule['chosen_on']} split): "
            f"draws where the surrogate radius < {rule['target_radius']:g} and {score}, at budget "
            f"{rule['mc_budget']}, within {rule['max_mean_draws']:g} mean draws per query "
            f"({100 * rule['max_draws_fraction']:g} % of Cohen's n0 + n); on its "
            f"{rule['selection_inputs']} selection inputs it spent {rule['selection_mean_draws']:g}."
            + (f" Its row above: {section['bundled_row']}." if section.get("bundled_row") else ""),
        ]
    return [*lines, "", f"![cost and accuracy]({section['figure']})", ""]


def _images_lines(record: dict[str, Any] | None) -> list[str]:
    """The user's images (``data_splits.json`` of `rrise build`): how many each split got, how many
    no split used (per split), and what the loader and the split left out."""
    if not record:
        return []
    sizes = ", ".join(f"{s} {n:,}" for s, n in record["sizes"].items())
    lines = ["## Your images", "", f"Splits: {sizes} (seed {record['seed']})."]
    if "used" in record:
        lines.append(f"{record['used']:,} of {record['images']:,} images used.")
        unused = {s: n for s, n in (record.get("unused") or {}).items() if n}
        if unused:
            lines.append(
                "Not used: "
                + ", ".join(
                    f"{n:,} in the {s} split's hash share" if s != "none" else f"{n:,} in none"
                    for s, n in unused.items()
                )
                + " (a split uses its images of smallest hash key up to the size it needs; none: "
                "beyond every split's size, or left out as duplicates or images the model trained on)."
            )
    return [*lines, "", *[f"- {note}" for note in record.get("notes", [])], ""]


def _or_dash(v: Any) -> str:
    return "—" if v is None else f"{v:,}"


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
        *_adaptive_lines(metrics.get("adaptive")),
        *_images_lines(metrics.get("images")),
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
    agreement = metrics.get("agreement", {})
    if agreement:
        lines += ["", "## Surrogate against the smoothed base classifier", ""]
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in agreement.items()]
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
