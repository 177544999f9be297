"""Replay: yesterday's recording (MCAP file or ROS 2 bag) through a new bundle, flat out or at its
recorded pace, once or in a loop; records keep the recording's capture stamps."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from mcap.reader import make_reader

from rrise.bundle import Bundle
from rrise.runtime import Runtime, run_stream
from rrise.runtime.source_specs import open_source
from rrise.runtime.sources import SourceError
from tests.recording_fixtures import STEP_NS, colour_frames, record_run, stamps
from tests.runtime_fixtures import make_bundle, run_options

N = 10


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run of a colour bundle, recorded as MCAP and as a ROS 2 bag."""
    root = tmp_path_factory.mktemp("replay")
    bundle = make_bundle(root / "colour_bundle", color="bgr")
    record_run(bundle, root, colour_frames(N), record=str(root / "run.mcap"))
    (root / "bag").mkdir()
    record_run(
        bundle,
        root / "bag",
        colour_frames(N),
        record=str(root / "run_bag"),
        record_format="ros2",
    )
    return {"mcap": root / "run.mcap", "bag": root / "run_bag", "root": root}


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another bundle (grey input): the "new model" tested on the recording."""
    return make_bundle(tmp_path_factory.mktemp("second") / "bundle", color="gray")


def _replay(bundle: Path, source: str, out: Path, **options) -> tuple[list[dict], dict]:
    jsonl = out / f"replay_{Path(source).stem}.jsonl"
    summary = run_stream(bundle, source, run_options(jsonl=str(jsonl), **options))
    return [json.loads(line) for line in jsonl.read_text().splitlines()], summary


def _recorded_frames(path: Path) -> list[np.ndarray]:
    """The JPEG frames in the MCAP, decoded independently of the replay code."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    frames = []
    with open(path, "rb") as f:
        for schema, _, message in make_reader(f).iter_messages(topics=["/rrise/image/compressed"]):
            pool = descriptor_pool.DescriptorPool()
            for file in descriptor_pb2.FileDescriptorSet.FromString(schema.data).file:
                pool.Add(file)
            image = message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name)).FromString(
                message.data
            )
            frames.append(cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_ANYCOLOR))
    return frames


@pytest.mark.parametrize("kind", ["mcap", "bag"])
def test_a_recording_replays_into_a_second_bundle_with_its_own_stamps(kind, recorded, second_bundle) -> None:
    records, summary = _replay(second_bundle, str(recorded[kind]), recorded["root"])
    assert summary["frames"] == N and summary["errors"] == 0 and summary["drop_policy"] == "block"
    assert [r["stamp_ns"] for r in records] == stamps(N)  # the recording's capture times
    assert [r["frame"] for r in records] == list(range(N))
    assert {r["bundle"] for r in records} == {Bundle.load(second_bundle).id}
    assert records[0]["source"].endswith("#/rrise/image/compressed")
    assert all(r["latency_ms"] < 60_000 for r in records)  # measured in this run, not since recording
    with Runtime(second_bundle) as runtime:  # the same frames, certified directly
        direct = runtime.certify_batch(_recorded_frames(recorded["mcap"]))
    assert [r["pred"] for r in records] == [d["pred"] for d in direct]
    assert [r["radius"] for r in records] == pytest.approx([d["radius"] for d in direct])


def test_realtime_keeps_the_recorded_pace_and_loop_keeps_time_moving(recorded, second_bundle) -> None:
    records, summary = _replay(
        second_bundle, str(recorded["mcap"]), recorded["root"], realtime=True, loop=True, max_frames=2 * N + 3
    )
    span = (2 * N + 2) * STEP_NS / 1e9
    assert summary["elapsed_s"] >= 0.9 * span  # frames came at their recorded intervals
    assert summary["drop_policy"] == "latest"  # like the camera it was recorded from
    got = [r["stamp_ns"] for r in records]
    assert all(a < b for a, b in zip(got, got[1:]))
    assert [r["frame"] for r in records] == sorted(r["frame"] for r in records)
    period = N * STEP_NS  # pass 2 is pass 1 shifted by the recording's length and one interval
    by_frame = {r["frame"]: r["stamp_ns"] for r in records}
    for frame, stamp in by_frame.items():
        assert stamp == stamps(N)[frame % N] + (frame // N) * period


def test_a_video_file_loops_and_plays_at_its_frame_rate(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 50, (28, 28))
    for frame in colour_frames(4):
        writer.write(frame)
    writer.release()
    source = open_source(str(video), loop=True, realtime=True)
    assert source.is_live and source.frame_count is None and source.fps == pytest.approx(50)
    items = []
    for item in source:
        items.append(item)
        if len(items) == 11:
            break
    source.close()
    assert [i for i, _, _ in items] == list(range(11)) and source.passes >= 2
    assert (items[-1][2] - items[0][2]) / 1e9 >= 0.9 * 10 / 50  # 50 fps, not flat out
    assert source.recorded_stamp(3) is None  # a video carries no capture times: records keep read times


def test_realtime_and_loop_refuse_what_has_no_recorded_timing(tmp_path: Path, recorded) -> None:
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", colour_frames(1)[0])[1].tobytes())
    for spec in (str(tmp_path), "0", "rtsp://camera.local/stream"):
        with pytest.raises(SourceError, match="--loop replay a video file or a recording"):
            open_source(spec, loop=True)
    broken = tmp_path / "broken.mcap"
    broken.write_bytes(recorded["mcap"].read_bytes()[:200])
    with pytest.raises(SourceError, match="broken.mcap"):
        open_source(str(broken))
