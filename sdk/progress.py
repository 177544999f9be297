"""One progress-bar helper for every long step (rich), quiet when asked to be.

Bars go to stderr, so a command's output on stdout (paths, JSON lines) stays clean when piped. On a
terminal they take its width and redraw in place. Written to a log file (stderr not a terminal), a
bar is a plain line now and then instead (:class:`LogBar`): every :data:`LOG_EVERY_S` seconds or
every :data:`LOG_EVERY_FRACTION` of the total, whichever is rarer, and one when it ends, each at
most :data:`LOG_WIDTH` columns wide, so that a log shows progress while a long stage runs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["LOG_EVERY_FRACTION", "LOG_EVERY_S", "LOG_WIDTH", "Bar", "LogBar", "console_width", "progress_bar"]

LOG_WIDTH = 160
LOG_EVERY_S = 30.0
LOG_EVERY_FRACTION = 0.1


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


class LogBar(Bar):
    """A bar written as plain lines to ``stream`` (a log file): one when ``LOG_EVERY_S`` seconds and
    ``LOG_EVERY_FRACTION`` of the total (just the seconds when the total is unknown) have both passed
    since the last line, and one at :meth:`close`; each says done/total, %, rate, elapsed and ETA."""

    def __init__(self, total: float | None, desc: str, unit: str, stream: Any, clock=time.monotonic) -> None:
        super().__init__(None, None)
        self.total, self.desc, self.unit, self.stream, self.clock = total, desc, unit, stream, clock
        self.done, self._note = 0.0, ""
        self.start = self.last_t = clock()
        self.last_done = 0.0

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = self.clock()
        due = now - self.last_t >= LOG_EVERY_S
        if self.total:
            due = due and (self.done - self.last_done) >= LOG_EVERY_FRACTION * self.total
        if due:
            self._write(now)

    def note(self, text: str) -> None:
        self._note = text

    def close(self) -> None:
        """The last line, unless nothing moved since the previous one."""
        if self.done != self.last_done or self.done == 0:
            self._write(self.clock())

    def _write(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.desc}: {self.done:,.0f}/" + (f"{self.total:,.0f}" if self.total else "?")]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
            if rate > 0 and self.done < self.total:
                parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        parts[1:1] = [f"{rate:,.0f} {self.unit}/s", f"elapsed {_clock(elapsed)}"]
        if self._note:
            parts.append(self._note)
        print(", ".join(parts)[:LOG_WIDTH], file=self.stream, flush=True)
        self.last_t, self.last_done = now, self.done


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


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
    """A rich bar with rate and ETA on stderr (a :class:`LogBar` when stderr is not a terminal);
    ``enabled=False`` keeps it silent."""
    if not enabled:
        yield Bar(None, None)
        return
    if not getattr(sys.stderr, "isatty", lambda: False)():
        bar = LogBar(total, desc, unit, sys.stderr)
        try:
            yield bar
        finally:
            bar.close()
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
