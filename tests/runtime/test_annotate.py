"""rrise run --save-video: every frame with its label, radius bar, abstain, error and alarm drawn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rrise.cli import COMMAND_ORDER, app, optional_values
from rrise.runtime.annotate import MIN_HEIGHT, VideoWriterSink, annotate
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


def _clip(path: Path, n: int = 4) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20, (28, 28))
    for frame in colour_frames(n):
        writer.write(frame)
    writer.release()
    return path


def test_save_video_never_writes_over_the_source_or_any_existing_file(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", color="bgr")
    video = _clip(tmp_path / "clip.avi")
    before = video.read_bytes()
    base = ["run", "--bundle", str(bundle), "--source", str(video), "--jsonl", str(tmp_path / "r.jsonl")]
    over_source = CliRunner().invoke(app, [*base, "--save-video", str(video)])
    assert over_source.exit_code == 1 and "is the source being read" in over_source.output
    assert "Traceback" not in over_source.output
    via_link = tmp_path / "link.avi"
    via_link.symlink_to(video)
    assert (
        "is the source being read" in CliRunner().invoke(app, [*base, "--save-video", str(via_link)]).output
    )
    other = tmp_path / "keep.mp4"
    other.write_bytes(b"someone's video")
    exists = CliRunner().invoke(app, [*base, "--save-video", str(other)])
    assert exists.exit_code == 1 and "exists already" in exists.output and "--save-video" in exists.output
    assert video.read_bytes() == before and other.read_bytes() == b"someone's video"
    assert not (tmp_path / "r.jsonl").exists() or (tmp_path / "r.jsonl").read_text() == ""


def test_record_and_save_video_share_one_check(tmp_path: Path) -> None:
    from rrise.fileio import output_conflict

    src = _clip(tmp_path / "clip.avi")
    for option in ("--record", "--save-video"):
        assert output_conflict(option, src, (str(src),)).startswith(f"{option} {src} is the source")
        assert "exists already" in output_conflict(option, src)
        assert output_conflict(option, tmp_path / "new.mcap", (str(src),)) is None


def test_the_video_appears_under_its_name_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "annotated.mp4"
    sink = VideoWriterSink(out, 0.5, 20)
    for frame in colour_frames(3):
        sink.write(CERTIFIED, frame)
    assert not out.exists()  # while it is written, only a hidden temporary file holds it
    (partial,) = tmp_path.glob(".tmp.annotated.mp4.*.mp4")
    sink.close()
    assert out.is_file() and not partial.exists()
    capture = cv2.VideoCapture(str(out))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    with pytest.raises(ValueError, match="exists already"):
        VideoWriterSink(out, 0.5, 20)
    late = VideoWriterSink(tmp_path / "late.mp4", 0.5, 20)
    late.write(CERTIFIED, colour_frames(1)[0])
    (tmp_path / "late.mp4").write_bytes(b"appeared meanwhile")
    with pytest.raises(ValueError, match="appeared during the run"):
        late.close()
    assert (tmp_path / "late.mp4").read_bytes() == b"appeared meanwhile"


def test_jsonl_never_truncates_the_source(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", color="bgr")
    video = _clip(tmp_path / "clip.avi")
    before = video.read_bytes()
    result = CliRunner().invoke(
        app, ["run", "--bundle", str(bundle), "--source", str(video), "--jsonl", str(video)]
    )
    assert (
        result.exit_code == 1 and "--jsonl" in result.output and "is the source being read" in result.output
    )
    assert "Traceback" not in result.output and video.read_bytes() == before
