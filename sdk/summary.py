"""What ``rrise demo`` prints at the end: the certified-accuracy table and a few received records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHOWN_RADII = (0.0, 0.25, 0.5, 0.75)


def _time(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t:.3f} s" if t >= 0.1 else f"{t * 1e3:.2f} ms"


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def print_demo_summary(root: Path, result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    metrics, stream = result["metrics"], result["stream"]
    radii = metrics["radii"]
    title = (
        f"Certified accuracy (%), {metrics['dataset']}, σ = {metrics['sigma']:g}, "
        f"{metrics['profile']} profile"
    )
    table = Table(title=title)
    table.add_column("method")
    for r in SHOWN_RADII:
        table.add_column(f"r = {r:g}", justify="right")
    table.add_column("per query", justify="right")
    for name, m in metrics["methods"].items():
        cells = [f"{100 * m['certified_accuracy'][radii.index(r)]:.1f}" for r in SHOWN_RADII]
        table.add_row(name, *cells, _time(m.get("per_query_s")))
    console.print(table)
    _print_adaptive_rows(console, result.get("adaptive") or {}, radii)
    cost = metrics.get("cost", {})
    if "speedup per query" in cost:
        console.print(f"RRISE answers {cost['speedup per query']:,.0f}× faster per query than MC.")
    if metrics.get("profile_note"):
        console.print(f"[yellow]{metrics['profile']} profile:[/] {metrics['profile_note']}")
    stages = metrics.get("stage_seconds", {})
    if stages:
        console.print("Wall time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
    run = stream.get("summary") or {}
    if run.get("published") is not None:
        console.print(
            f"\nPublisher: {run['published']} records, {run['subscribers_peak']} subscriber(s) at most, "
            f"{run['published_unheard']} published while none was connected."
        )
    for warning in run.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(
        f"\nRuntime: {stream['sent']} frames of {stream['video']} published on {stream['endpoint']}; "
        f"{stream['received']} records received by `rrise subscribe` in another process "
        f"({stream['correct']} correct predictions). A few of them:"
    )
    for rec in stream["records"][:5]:
        console.print(
            f"  seq={rec['seq']} pred={rec['pred']} label={rec['label']!r} abstain={rec['abstain']} "
            f"radius={rec['radius']:.3f} score={_round(rec['score'])} "
            f"latency={rec['latency_ms']:.2f} ms"
        )
    adaptive = stream.get("adaptive")
    if adaptive:
        console.print(
            f"Adaptive run ({adaptive['routing']}, --mc-budget {adaptive['mc_budget']}): "
            f"{adaptive['mc_frames']} of {adaptive['frames']} frames got base-model draws, "
            f"{adaptive['mc_draws']} draws in all; certified by the surrogate "
            f"{adaptive['certified_by']['surrogate']}, by MC {adaptive['certified_by']['mc']}, "
            f"abstained {adaptive['abstained']}."
        )
    console.print(f"\nReport: {root / 'report' / 'report.md'}\nBundle: {root / 'bundle'}")


def _print_adaptive_rows(console: Any, rows: dict[str, Any], radii: list[float]) -> None:
    """The surrogate alone, adaptive certification and Cohen on the same test inputs, with the mean
    base-model evaluations each spends per query (from the evaluation's adaptive rows)."""
    from rich.table import Table

    if not rows:
        return
    table = Table(title="Cost and accuracy (%), same test inputs")
    table.add_column("method")
    for r in SHOWN_RADII:
        table.add_column(f"r = {r:g}", justify="right")
    table.add_column("draws", justify="right")
    table.add_column("÷ Cohen's", justify="right")
    for name, m in rows.items():
        cells = [f"{100 * m['certified_accuracy'][radii.index(r)]:.1f}" for r in SHOWN_RADII]
        table.add_row(name, *cells, f"{m['mean_draws']:g}", f"{m['draws_ratio_to_cohen']:.3f}")
    console.print(table)
    for name, m in rows.items():
        if m.get("setting"):
            console.print(f"{name}: {m['setting']}; draws are base-model evaluations per query.")
