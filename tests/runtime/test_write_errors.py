"""A full disk or a failing output stops the run with exit 1 and a message naming each output that
failed; nothing is lost silently (the trial: a full disk under --record/--save-video exited 0 with
no warning, and under --jsonl it was a traceback)."""

from __future__ import annotations

import errno
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import rrise.runtime.frame_outputs as frame_outputs
from rrise.cli import app
from rrise.runtime import run_stream
from rrise.runtime.sinks import SinkError, Sinks
from tests.recording_fixtures import colour_frames
from tests.runtime_fixtures import make_bundle, run_options


def _video(path: Path, n: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20, (28, 28))
    for frame in colour_frames(n):
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("write-errors")
    return make_bundle(root / "bundle", color="bgr"), _video(root / "clip.avi", 8)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_under_jsonl_is_one_message_and_exit_1(setup: tuple[Path, Path]) -> None:
    bundle, video = setup
    result = CliRunner().invoke(
        app, ["run", "--bundle", str(bundle), "--source", str(video), "--jsonl", "/dev/full"]
    )
    assert result.exit_code == 1, result.output
    assert "--jsonl /dev/full: No space left on device" in result.output
    assert "Traceback" not in result.output


class _FullDisk:
    """A recorder whose disk fills after ``ok`` records."""

    def __init__(self, path: Path, ok: int) -> None:
        self.path, self.ok, self.records, self.closed = path, ok, 0, False

    def write(self, record: dict, jpeg: bytes | None, width: int) -> None:
        if self.records >= self.ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.records += 1

    def write_status(self, status: dict) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_recorder_that_cannot_write_stops_the_run_and_names_itself(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, video = setup
    made: list[_FullDisk] = []
    monkeypatch.setattr(
        frame_outputs,
        "open_recorder",
        lambda path, fmt, adaptive: made.append(_FullDisk(Path(path), 3)) or made[-1],
    )
    records: list[dict] = []
    options = run_options(record=str(tmp_path / "run.mcap"))
    summary = run_stream(bundle, str(video), options, callback=records.append)
    want = f"--record {tmp_path / 'run.mcap'}: No space left on device"
    assert summary["output_errors"] == [want]
    assert made[0].closed and made[0].records == 3
    assert summary["frames"] < 8  # the run stopped at the failure instead of certifying into the void


def test_the_cli_exits_1_with_every_output_message(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, video = setup
    monkeypatch.setattr(frame_outputs, "open_recorder", lambda path, fmt, adaptive: _FullDisk(Path(path), 0))
    out = tmp_path / "run.mcap"
    args = ["run", "--bundle", str(bundle), "--source", str(video), "--record", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert f"an output failed, the run stopped: --record {out}: No space left on device" in result.output


class _DroppingWriter:
    """cv2.VideoWriter whose disk fills after ``keep`` frames: later writes vanish without a word,
    as OpenCV's own writer does on a full disk."""

    keep = 2

    def __init__(self, *args: object) -> None:
        self._writer = _REAL_WRITER(*args)
        self._n = 0

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self._writer.isOpened()

    def write(self, picture: np.ndarray) -> None:
        self._n += 1
        if self._n <= self.keep:
            self._writer.write(picture)

    def release(self) -> None:
        self._writer.release()


_REAL_WRITER = cv2.VideoWriter


def test_a_video_missing_frames_is_found_when_read_back(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, video = setup
    monkeypatch.setattr(cv2, "VideoWriter", _DroppingWriter)
    out = tmp_path / "annotated.avi"
    summary = run_stream(bundle, str(video), run_options(save_video=str(out)), callback=lambda r: None)
    assert summary["output_errors"] == [
        f"--save-video {out} holds 2 of the run's 8 frames: the disk is full or a write failed"
    ]
    assert out.is_file()  # what was written is kept under the name asked for


def test_a_complete_video_reports_no_error(setup: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, video = setup
    out = tmp_path / "annotated.avi"
    summary = run_stream(bundle, str(video), run_options(save_video=str(out)), callback=lambda r: None)
    assert summary["output_errors"] == [] and summary["frames"] == 8


def test_sinks_keep_write_and_close_errors_and_close_once() -> None:
    class Broken:
        name = "--jsonl x.jsonl"
        closes = 0

        def send(self, record: dict) -> None:
            raise OSError(errno.EIO, "Input/output error")

        def send_status(self, status: dict) -> None:
            pass

        def close(self) -> None:
            Broken.closes += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    sinks = Sinks([Broken()])
    with pytest.raises(SinkError, match="--jsonl x.jsonl: Input/output error"):
        sinks.send({"seq": 0})
    sinks.close()
    sinks.close()
    assert Broken.closes == 1
    assert sinks.errors == ["--jsonl x.jsonl: Input/output error", "--jsonl x.jsonl: No space left on device"]
