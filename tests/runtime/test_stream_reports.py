"""What a stream reports beyond each record: out-of-distribution flags counted next to the abstain
rate, the file behind an unreadable image, and a video that ended before its announced frames."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rrise.cli import app
from rrise.runtime.options import StreamOptions
from rrise.runtime.stream_stats import StreamStats, ood_flagged

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests.tiny_bundle's linear bundle: 1×4×4 inputs, an fp32 monitor with an ``ood`` reference."""
    from tests.tiny_bundle import linear_sources, make_linear_bundle

    root = tmp_path_factory.mktemp("reports")
    return make_linear_bundle(linear_sources(root), root / "bundle").path


def _record(frame: int, *, alarm=None, abstain=False, error=None) -> dict:
    return {"frame": frame, "latency_ms": 1.0, "alarm": alarm, "abstain": abstain, "error": error}


def _stats() -> StreamStats:
    source = SimpleNamespace(name="s", state="open", reconnects=0, ended_early=None)
    return StreamStats(source, bundle="b" * 64, monitor=None, status_interval_s=1.0)


def test_status_and_summary_count_ood_flags_next_to_the_abstain_rate() -> None:
    stats = _stats()
    stats.begin()
    for i, (alarm, abstain) in enumerate(
        [("ood", True), ("ood+shift:score", False), ("shift:score+ood_p", False), (None, True), (None, False)]
    ):
        stats.add(_record(i, alarm=alarm, abstain=abstain))
    stats.add(_record(5, alarm="ood", error="no frame"))  # an error record is not scored
    first = stats.status(stats.started + 2.0, drops=0)
    assert first["abstain_rate"] == pytest.approx(2 / 5)
    assert first["ood_flags"] == 2 and first["ood_flag_rate"] == pytest.approx(2 / 5)
    stats.add(_record(6))
    second = stats.status(stats.started + 4.0, drops=0)
    assert second["ood_flags"] == 2 and second["ood_flag_rate"] == 0.0  # a total, and this interval's rate
    assert stats.summary(drops=0)["ood_flags"] == 2
    assert [ood_flagged({"alarm": a}) for a in ("ood", "ood+shift:x", "shift:ood_p", None)] == [
        True,
        True,
        False,
        False,
    ]


def test_a_run_counts_the_frames_its_ood_test_flagged(bundle: Path, tmp_path: Path) -> None:
    from rrise.runtime import Runtime
    from rrise.runtime.stream import Stream

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(frames / f"a{i}.png"), rng.integers(0, 256, (4, 4), dtype=np.uint8))
    for i in range(3):
        cv2.imwrite(str(frames / f"w{i}.png"), np.full((16, 16), 255, np.uint8))  # far from calibration
    with Stream(Runtime(bundle), str(frames), StreamOptions(status_interval=0)) as stream:
        records = list(stream)
        summary = stream.summary()
    flagged = [r for r in records if r["alarm"] and r["alarm"].split("+")[0] == "ood"]
    assert len(flagged) >= 3 and summary["ood_flags"] == len(flagged)


def test_an_unreadable_image_record_names_the_file(bundle: Path, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), np.full((4, 4), 90, np.uint8))
    (frames / "b_corrupt.png").write_bytes(b"not a png")
    (frames / "c_empty.jpg").write_bytes(b"")
    out = tmp_path / "records.jsonl"
    result = runner.invoke(
        app, ["run", "--bundle", str(bundle), "--source", str(frames), "--jsonl", str(out)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] is None for r in records] == [True, False, False]
    assert str(frames / "b_corrupt.png") in records[1]["error"] and "cannot decode" in records[1]["error"]
    assert str(frames / "c_empty.jpg") in records[2]["error"] and "empty" in records[2]["error"]


def _video(path: Path, frames: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (16, 16))
    rng = np.random.default_rng(1)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    writer.release()
    return path


def test_a_truncated_video_says_where_it_ended_early(bundle: Path, tmp_path: Path, caplog) -> None:
    from rrise.runtime import Runtime
    from rrise.runtime.stream import Stream

    data = _video(tmp_path / "full.avi", 40).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="rrise"), Stream(Runtime(bundle), str(cut)) as stream:
        records = [r for r in stream if r.get("kind") != "status"]
        summary = stream.summary()
    n = len(records)
    assert 0 < n < 40
    assert summary["source_ended_early"] == (
        f"video file {cut} ended early, at frame {n} of the 40 its header announces "
        "(truncated or damaged file)"
    )
    assert summary["source_ended_early"] in caplog.text
    with Stream(Runtime(bundle), str(tmp_path / "full.avi")) as stream:
        assert len([r for r in stream if r.get("kind") != "status"]) == 40
        assert stream.summary()["source_ended_early"] is None


def test_rrise_run_warns_and_reports_a_truncated_video(bundle: Path, tmp_path: Path) -> None:
    data = _video(tmp_path / "full.avi", 40).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["run", "--bundle", str(bundle), "--source", str(cut), "--jsonl", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: video file" in result.output and "ended early, at frame" in result.output
    summary = json.loads(result.output.strip().splitlines()[-1])["summary"]
    assert summary["source_ended_early"].startswith(f"video file {cut} ended early")
