"""Evaluation: certified accuracy curves, ACR, abstain rates, cost, and the written report.

Numpy and matplotlib only, so a report can be rebuilt from ``metrics.json`` anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_RADII",
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


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def format_markdown_table(metrics: dict[str, Any], radii: tuple[float, ...] | None = None) -> str:
    """Certified accuracy (%) at each radius, one row per method, plus ACR, abstain and time."""
    all_radii = metrics["radii"]
    show = list(radii) if radii is not None else all_radii
    cols = [all_radii.index(r) for r in show]
    head = "| method | " + " | ".join(f"r={r:g}" for r in show) + " | ACR | abstain | per query |"
    sep = "|---" * (len(show) + 4) + "|"
    rows = [head, sep]
    for name, m in metrics["methods"].items():
        ca = [_pct(m["certified_accuracy"][c]) for c in cols]
        t = m.get("per_query_s")
        t_txt = "—" if t is None else _fmt_seconds(t)
        rows.append(
            f"| {name} | " + " | ".join(ca) + f" | {m['acr']:.3f} | {_pct(m['abstain_rate'])}% | {t_txt} |"
        )
    return "\n".join(rows)


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
        ax.plot(radii, [100 * v for v in m["certified_accuracy"]], marker="o", label=name)
    ax.set_xlabel("ℓ2 radius (in [0,1]-pixel units)")
    ax.set_ylabel("certified accuracy (%)")
    title = f"{metrics['dataset']}, σ = {metrics['sigma']:g}"
    if metrics.get("profile") != "full":
        title += f" ({metrics.get('profile')} profile)"
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report_dir: str | os.PathLike, metrics: dict[str, Any]) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and ``certified_accuracy.png`` into ``report_dir``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": report_dir / "metrics.json",
        "report": report_dir / "report.md",
        "plot": report_dir / "certified_accuracy.png",
    }
    tmp = paths["metrics"].with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, paths["metrics"])
    _plot(metrics, paths["plot"])
    paths["report"].write_text(_markdown(metrics))
    return paths


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
        "![certified accuracy](certified_accuracy.png)",
        "",
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
    stages = metrics.get("stage_seconds", {})
    if stages:
        lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in stages.items()]
    lines.append("")
    return "\n".join(lines)
