"""One progress-bar helper for every long step (rich), quiet when asked to be.

Bars go to stderr, so a command's output on stdout (paths, JSON lines) stays clean when piped. On a
terminal they take its width; written to a log file they keep :data:`LOG_WIDTH` columns (rich
would cut them to 80, dropping the rate, the ETA and the note).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["LOG_WIDTH", "Bar", "console_width", "progress_bar"]

LOG_WIDTH = 160


class Bar:
    """A handle on one bar: ``advance(n)`` and ``note(text)`` (shown after the bar)."""

    def __init__(self, progress, task) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, note=text)


def _rate_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} {unit}/s")

    return RateColumn()


def console_width(stream: Any = None) -> int | None:
    """None (the terminal's own width) on a terminal; else ``$COLUMNS`` if set, else LOG_WIDTH."""
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else LOG_WIDTH


@contextmanager
def progress_bar(total: float | None, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[Bar]:
    """A rich bar with rate and ETA on stderr; ``enabled=False`` keeps it silent."""
    if not enabled:
        yield Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _rate_column(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    console = Console(stderr=True, width=console_width(sys.stderr))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(desc, total=total, note="")
        yield Bar(progress, task)
