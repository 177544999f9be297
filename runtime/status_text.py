"""One line of text for a status record (what a terminal, the Foxglove app and ROS diagnostics show),
and how serious it is."""

from __future__ import annotations

from typing import Any

__all__ = ["live_note", "record_text", "status_level", "status_line"]


def status_line(status: dict[str, Any], last: dict[str, Any] | None = None) -> str:
    """E.g. ``"24.8 fps · 3 drops · abstain 12% · p99 6.1 ms · last: coat r=0.41"``; ``last`` is the
    latest frame record (its label and radius, or its error)."""
    parts = [f"{float(status.get('fps') or 0.0):.1f} fps", f"{int(status.get('drops') or 0)} drops"]
    rate = status.get("abstain_rate")
    parts.append("abstain –" if rate is None else f"abstain {rate:.0%}")
    if status.get("errors"):
        parts.append(f"{status['errors']} errors")
    if status.get("latency_p99_ms") is not None:
        parts.append(f"p99 {status['latency_p99_ms']:.1f} ms")
    if status.get("source_state") not in (None, "open"):
        parts.append(f"source {status['source_state']}")
    if status.get("alarm"):
        parts.append(f"ALARM {status['alarm']}")
    if last is not None:
        parts.append(f"last: {record_text(last)}")
    return " · ".join(parts)


def record_text(record: dict[str, Any]) -> str:
    """``"coat r=0.41"``, ``"abstain"`` or ``"error: …"`` for one frame record."""
    if record.get("error"):
        return f"error: {record['error']}"
    if record.get("abstain"):
        return "abstain"
    return f"{record.get('label') or record.get('pred')} r={float(record.get('radius') or 0.0):.3f}"


def status_level(status: dict[str, Any]) -> str:
    """``"error"`` (the source is not delivering), ``"warning"`` (a shift alarm, or frames that could
    not be certified) or ``"ok"``."""
    if status.get("source_state") not in (None, "open"):
        return "error"
    if status.get("alarm") or status.get("errors"):
        return "warning"
    return "ok"


def live_note(frames: int, abstained: int, errors: int, drops: int, last: dict[str, Any] | None) -> str:
    """What ``rrise run`` shows beside its progress bar on a terminal: drops, abstain rate, errors,
    the last frame's label and radius (the bar itself shows frames and fps)."""
    parts = [f"{drops} drops", f"abstain {abstained / frames:.0%}" if frames else "abstain –"]
    if errors:
        parts.append(f"{errors} errors")
    if last is not None:
        parts.append(f"last: {record_text(last)}" + (f" ALARM {last['alarm']}" if last.get("alarm") else ""))
    return " · ".join(parts)
