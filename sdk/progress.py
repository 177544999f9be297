"""One progress-bar helper for every long step (rich), quiet when asked to be."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Bar", "progress_bar"]


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


@contextmanager
def progress_bar(total: float | None, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[Bar]:
    """A rich bar with rate and ETA; ``enabled=False`` (or a non-interactive run) keeps it silent."""
    if not enabled:
        yield Bar(None, None)
        return
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
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(desc, total=total, note="")
        yield Bar(progress, task)
