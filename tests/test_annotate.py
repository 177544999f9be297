"""rrise run --save-video: every frame with its label, radius bar, abstain, error and alarm drawn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rrise.cli import COMMAND_ORDER, app, optional_values
from rrise.runtime.annotate import MIN_HEIGHT, annotate
from tests.recording_fixtures import colour_frames
from tests.runtime_fixtures import make_bundle, run_options

CERTIFIED = {"label": "coat", "pred": 4, "abstain": False, "radius": 0.25, "error": None, "alarm": None}


def _bar_fill(picture: np.ndarray, colour: tuple[int, int, int]) -> int:
    """Pixels of the bar's colour on the panel's bar row (BGR, exact)."""
    panel = picture[-40:]
    return int(np.all(panel == np.array(colour, np.uint8), axis=2).any(axis=0).sum())


def test_a_small_frame_is_scaled_up_and_the_bar_grows_with_the_radius() -> None:
    frame = np.full((28, 28), 128, np.uint8)
    half = annotate(frame, CERTIFIED, max_radius=0.5)
    full = annotate(frame, {**CERTIFIED, "radius": 0.5}, max_radius=0.5)
    assert half.shape[0] > MIN_HEIGHT and half.shape[1] == 28 * int(np.ceil(MIN_HEIGHT / 28))
    assert np.array_equal(half[:MIN_HEIGHT, :10], np.full((MIN_HEIGHT, 10, 3), 128, np.uint8))
    green = (80, 200, 60)
    assert _bar_fill(full, green) > 1.8 * _bar_fill(half, green) > 0


def test_abstain_error_and_alarm_are_drawn_differently() -> None:
    frame = colour_frames(1)[0]
    certified = annotate(frame, CERTIFIED, 0.5)
    abstain = annotate(frame, {**CERTIFIED, "abstain": True, "pred": None, "radius": 0.0}, 0.5)
    alarm = annotate(frame, {**CERTIFIED, "alarm": "shift"}, 0.5)
    error = annotate(None, {**CERTIFIED, "error": "bad frame: unreadable", "radius": 0.0}, 0.5, (364, 364))
    assert not np.array_equal(certified, abstain)
    assert not np.array_equal(certified[:60], alarm[:60])  # the alarm is written across the top
    assert error.shape[:2] == (certified.shape[0], 364)
    assert np.all(error[100:200, 100:200] == 64)  # an unreadable frame is a grey field


def test_run_save_video_writes_one_annotated_frame_per_record(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", color="bgr")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 20, (28, 28))
    for frame in colour_frames(6):
        writer.write(frame)
    writer.release()
    out = tmp_path / "out" / "annotated.mp4"
    args = ["run", "--bundle", str(bundle), "--source", str(video), "--save-video", str(out), "--jsonl", "-"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    capture = cv2.VideoCapture(str(out))
    n = 0
    while capture.read()[0]:
        n += 1
    assert n == 6 and capture.get(cv2.CAP_PROP_FPS) == pytest.approx(20)
    assert capture.get(cv2.CAP_PROP_FRAME_HEIGHT) > MIN_HEIGHT
    bad = CliRunner().invoke(app, [*args[:-2], "--save-video", str(tmp_path / "x.gif")])
    assert bad.exit_code == 1 and "--save-video" in bad.output


def test_help_shows_no_bool_metavars_and_lists_commands_in_pipeline_order() -> None:
    top = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    run_help = CliRunner().invoke(app, ["run", "--help"], terminal_width=200).output
    assert "<bool>" not in top and "<bool>" not in run_help
    assert "--no-monitor" in run_help and "[HOST:PORT]" in run_help
    firsts = [line.strip("│ ").split(" ")[0] for line in top.splitlines()]
    listed = [name for name in firsts if name in COMMAND_ORDER]
    assert listed == list(COMMAND_ORDER)


def test_foxglove_alone_serves_on_the_default_address() -> None:
    assert optional_values(["run", "--foxglove"]) == ["run", "--foxglove", "127.0.0.1:8765"]
    assert optional_values(["run", "--foxglove", "--loop"]) == [
        "run",
        "--foxglove",
        "127.0.0.1:8765",
        "--loop",
    ]
    assert optional_values(["run", "--foxglove", ":9000"]) == ["run", "--foxglove", ":9000"]


def test_run_shows_a_live_line_and_long_bars_keep_their_width_in_a_log(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from rrise.progress import LOG_WIDTH, console_width
    from rrise.runtime import run_stream
    from rrise.runtime.sources import PushSource

    bundle = make_bundle(tmp_path / "bundle", color="bgr")
    source = PushSource("cam", live=False, capacity=11)
    for frame in colour_frames(10):
        source.push(frame)
    source.end()
    summary = run_stream(bundle, source, run_options(no_output=True), show_progress=True)
    err = " ".join(capsys.readouterr().err.split())
    assert summary["frames"] == 10
    assert "certifying" in err and "10/" in err  # the bar, on stderr
    assert "0 drops" in err and "abstain" in err and "last: " in err
    with open(tmp_path / "log.txt", "w") as log_file:
        monkeypatch.delenv("COLUMNS", raising=False)
        assert console_width(log_file) == LOG_WIDTH
        monkeypatch.setenv("COLUMNS", "132")
        assert console_width(log_file) == 132
