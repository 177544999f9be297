"""Progress in a log file: plain lines every 30 s or every 10 %, whichever is rarer, and one at the end."""

from __future__ import annotations

import io

from rrise.progress import LOG_WIDTH, LogBar, progress_bar


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_fast_progress_is_written_every_30_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    bar = LogBar(1000, "calibrate MC", "draws", out, clock=clock)
    for _ in range(100):  # 10 per second: 10 % every 10 s, so the 30 s are the rarer
        clock.t += 1.0
        bar.advance(10)
    bar.close()
    lines = _lines(out)
    assert len(lines) == 3 + 1  # at 30, 60, 90 s and the end
    assert lines[0].startswith("calibrate MC: 300/1,000 (30%), 10 draws/s, elapsed 0:00:30, ETA 0:01:10")
    assert lines[-1].startswith("calibrate MC: 1,000/1,000 (100%)")


def test_slow_progress_is_written_every_10_percent() -> None:
    out, clock = io.StringIO(), Clock()
    bar = LogBar(100, "certify", "inputs", out, clock=clock)
    for _ in range(100):  # one a minute: 30 s pass every step, 10 % every ten steps
        clock.t += 60.0
        bar.advance(1)
    bar.close()
    lines = _lines(out)
    assert len(lines) == 10  # at 10 %, 20 %, ..., 100 % (the end adds nothing new)
    assert "(10%)" in lines[0] and "(100%)" in lines[-1]


def test_an_unknown_total_is_written_every_30_seconds_with_its_note() -> None:
    out, clock = io.StringIO(), Clock()
    bar = LogBar(None, "certifying", "frame", out, clock=clock)
    bar.note("0 drops, " + "x" * 300)
    for _ in range(61):
        clock.t += 1.0
        bar.advance(1)
    bar.close()
    lines = _lines(out)
    assert [line.split(",")[0] for line in lines] == [
        "certifying: 30/?",
        "certifying: 60/?",
        "certifying: 61/?",
    ]
    assert "0 drops" in lines[0] and all(len(line) <= LOG_WIDTH for line in lines)


def test_progress_bar_writes_lines_when_stderr_is_not_a_terminal(capsys) -> None:
    with progress_bar(5, "targets", "samples") as bar:
        bar.advance(5)
    assert capsys.readouterr().err.startswith("targets: 5/5 (100%)")
