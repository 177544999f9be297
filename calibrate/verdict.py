"""The verdict `rrise build` ends with: RRISE as bundled beside Cohen's MC, and what to do next.

Read from the evaluation's ``metrics.json`` (:func:`verdict_lines`): certified accuracy at a few
radii for the bundle's RRISE row and Cohen's MC row at the same α on the same test inputs, both
abstain rates, and, when RRISE falls more than :data:`FAR_BEHIND` behind Cohen at any of those radii,
the next steps (more data, a larger profile, the adaptive mode with its numbers from the report).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FAR_BEHIND", "VERDICT_RADII", "verdict_lines"]

VERDICT_RADII = (0.0, 0.25, 0.5)
# certified-accuracy gap (a fraction) beyond which the verdict says what to do next
FAR_BEHIND = 0.05
AS_BUNDLED = ", as bundled"


def _row_at(metrics: dict[str, Any], row: dict[str, Any], radii: tuple[float, ...]) -> list[float]:
    return [row["certified_accuracy"][metrics["radii"].index(r)] for r in radii]


def _pct(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}%" for v in values)


def _cohen_row(metrics: dict[str, Any], alpha: float) -> tuple[str, dict[str, Any]] | None:
    """Cohen's MC row at level ``alpha`` (the RRISE row's), the one computed from the certify draws."""
    for name, row in metrics["methods"].items():
        if name.startswith("Cohen MC") and f"α={alpha:g})" in name:
            return name, row
    return None


def _adaptive_row(metrics: dict[str, Any], radii: tuple[float, ...]) -> dict[str, Any] | None:
    """The adaptive row to quote: of the routed and required-radius rows, the one of highest mean
    certified accuracy at ``radii`` (fewer mean draws on a tie); None without an adaptive section."""
    section = metrics.get("adaptive") or {}
    at = [section.get("radii", []).index(r) for r in radii if r in section.get("radii", [])]
    rows = [r for r in (section.get("rows") or {}).values() if r.get("kind") in ("adaptive", "required")]
    if not rows or not at:
        return None
    return max(rows, key=lambda r: (sum(r["certified_accuracy"][i] for i in at), -r["mean_draws"]))


def _command(row: dict[str, Any]) -> str:
    """The `rrise run` flags of an adaptive row."""
    flags = f"--mc-budget {row['mc_budget']}"
    if row.get("require_radius") is not None:
        flags += f" --require-radius {row['require_radius']:g}"
    return f"`rrise run {flags}`"


def _next_steps(metrics: dict[str, Any], radii: tuple[float, ...]) -> str:
    advice = "more images (calibration and surrogate targets), a larger --profile, or the adaptive mode"
    row = _adaptive_row(metrics, radii)
    if row is None:
        return f"{advice} (`rrise run --mc-budget N`: base-model draws where the surrogate falls short)"
    section = metrics["adaptive"]
    at = [row["certified_accuracy"][section["radii"].index(r)] for r in radii if r in section["radii"]]
    return (
        f"{advice}: on these test inputs {_command(row)} certifies {_pct(at)} with {row['mean_draws']:g} "
        "mean base-model draws per query (report/report.md, adaptive section)"
    )


def verdict_lines(metrics: dict[str, Any], radii: tuple[float, ...] = VERDICT_RADII) -> list[str]:
    """Three lines: certified accuracy at ``radii`` of RRISE as bundled and of Cohen's MC at the same
    α (same test inputs), both abstain rates, and the next step (what to try when RRISE is more
    than :data:`FAR_BEHIND` behind at any radius; otherwise that the bundle is ready)."""
    radii = tuple(r for r in radii if r in metrics["radii"])
    bundled = [(n, r) for n, r in metrics["methods"].items() if n.endswith(AS_BUNDLED)]
    if not bundled:
        return ["[verdict] no RRISE row was bundled: see report/report.md"]
    name, rrise = bundled[0]
    alpha = float((metrics.get("calibration") or {}).get("alpha", 0.0))
    cohen = _cohen_row(metrics, alpha)
    where = f"r = {' / '.join(f'{r:g}' for r in radii)}"
    ours = _row_at(metrics, rrise, radii)
    if cohen is None:
        return [
            f"[verdict] RRISE as bundled certifies {_pct(ours)} at {where} ({rrise['n']} test inputs)",
            f"[verdict] abstains: RRISE {100 * rrise['abstain_rate']:.1f}%; no Cohen MC row at α={alpha:g}",
            "[verdict] next: see report/report.md",
        ]
    theirs = _row_at(metrics, cohen[1], radii)
    gap = max(t - o for o, t in zip(ours, theirs, strict=True))
    first = (
        f"[verdict] certified accuracy at {where} on the same {rrise['n']} test inputs, α={alpha:g}: "
        f"RRISE as bundled {_pct(ours)}, Cohen MC {_pct(theirs)}"
    )
    second = (
        f"[verdict] abstains: RRISE {100 * rrise['abstain_rate']:.1f}%, "
        f"Cohen MC {100 * cohen[1]['abstain_rate']:.1f}%"
    )
    if gap > FAR_BEHIND:
        third = (
            f"[verdict] RRISE is {100 * gap:.1f} points behind Cohen MC; next: {_next_steps(metrics, radii)}"
        )
    else:
        third = (
            f"[verdict] RRISE is within {100 * FAR_BEHIND:g} points of Cohen MC at every one of these "
            "radii, at one surrogate pass per query: the bundle is ready (`rrise run`)"
        )
    return [first, second, third]
