"""Recordings that did not end in order: a recorder killed mid-run, a file cut short, a chunk
overwritten, a message that does not decode, stamps that jump by years. Each replays what can be
read, goes on past what cannot, and says what happened (a warning and ``source_ended_early``)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from rrise.runtime import replay, run_stream
from rrise.runtime.recording import FLUSH_INTERVAL_S, open_recorder
from rrise.runtime.recording_reader import is_recording, open_reader
from rrise.runtime.replay import ReplaySource
from tests.recording_fixtures import chunk_spans, colour_frames, record_run, stamps, write_frames
from tests.runtime_fixtures import make_bundle, run_options

N = 12
PER_CHUNK = 4  # frames per chunk in the recordings made here: chunks of frames 0-3, 4-7, 8-11
YEAR_NS = int(365.25 * 86400 * 1e9)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A colour bundle, a short recording to replay as a never-ending source, and N records with
    their frames to write into recorders."""
    root = tmp_path_factory.mktemp("damage")
    bundle = make_bundle(root / "bundle", color="bgr")
    record_run(bundle, root, colour_frames(10), record=str(root / "source.mcap"))
    (root / "plain").mkdir()
    records, _ = record_run(bundle, root / "plain", colour_frames(N))
    return {"bundle": bundle, "source": root / "source.mcap", "records": records, "frames": colour_frames(N)}


def _path(root: Path, fmt: str) -> Path:
    return root / ("run.mcap" if fmt == "foxglove" else "run_bag")


def _storage(path: Path) -> Path:
    """The MCAP file of a recording: the file itself, or a bag folder's storage file."""
    return path if path.is_file() else path / f"{path.name}.mcap"


def _chunked(made: dict[str, Any], path: Path, fmt: str) -> None:
    """A complete recording of the N frames, PER_CHUNK frames to a chunk."""
    recorder = open_recorder(path, fmt)
    write_frames(recorder, made["records"], made["frames"], per_chunk=PER_CHUNK)
    recorder.close()


def _replay(bundle: Path, source: Path, out: Path) -> tuple[list[dict], dict]:
    jsonl = out / "replay.jsonl"
    summary = run_stream(bundle, str(source), run_options(jsonl=str(jsonl)))
    return [json.loads(line) for line in jsonl.read_text().splitlines()], summary


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# --- 1. a recorder killed mid-run ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["foxglove", "ros2"])
def test_a_run_killed_mid_recording_leaves_a_recording_that_replays_with_a_salvage_warning(
    fmt: str, made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, jsonl = _path(tmp_path, fmt), tmp_path / "live.jsonl"
    args = ["--bundle", str(made["bundle"]), "--source", str(made["source"]), "--realtime", "--loop"]
    args += ["--record", str(out), "--record-format", fmt, "--jsonl", str(jsonl)]
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "rrise", "run", *args], stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while _lines(jsonl) < 40 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
        time.sleep(FLUSH_INTERVAL_S + 0.5)  # the bound: those 40 frames are on disk by now
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs: nothing is closed in order
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out.is_dir() and (out / "metadata.yaml").exists())  # a bag's metadata comes last
    assert is_recording(out)
    with caplog.at_level(logging.WARNING, logger="rrise"):
        records, summary = _replay(made["bundle"], out, tmp_path)
    salvaged = len(records)
    assert salvaged >= 40 and summary["errors"] == 0  # every frame written 1 s before the kill
    assert f"salvaged {salvaged} image messages" in _warnings(caplog)
    assert str(_storage(out)) in _warnings(caplog)
    ended = summary["source_ended_early"]
    assert ended and "ended early" in ended and f"{salvaged} frames salvaged" in ended
    recorded = [json.loads(line)["stamp_ns"] for line in jsonl.read_text().splitlines()]
    both = min(salvaged, len(recorded))  # a frame may be in the recording and not yet in --jsonl
    assert [r["stamp_ns"] for r in records][:both] == recorded[:both]  # the first frames, in order


# --- 2. the flush bound ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["foxglove", "ros2"])
def test_an_open_recording_reaches_the_disk_within_about_a_second(
    fmt: str, made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _path(tmp_path, fmt)
    recorder = open_recorder(path, fmt)
    try:
        write_frames(recorder, made["records"][:4], made["frames"][:4])
        written, reader = time.monotonic(), None
        while reader is None and time.monotonic() - written < FLUSH_INTERVAL_S + 3:
            time.sleep(0.05)
            with contextlib.suppress(ValueError):  # as a reader sees it if the process died now
                reader = open_reader(path)
        assert reader is not None and reader.count == 4
        assert time.monotonic() - written <= FLUSH_INTERVAL_S + 1.5
        assert reader.ended_early and "4 frames salvaged" in reader.ended_early
        frames = list(reader.frames())
        assert [s for _, s in frames] == stamps(N)[:4] and all(f is not None for f, _ in frames)
        assert is_recording(path) and not (path.is_dir() and (path / "metadata.yaml").exists())
    finally:
        recorder.close()
    complete = open_reader(path)  # closed in order: the whole file, no salvage
    assert complete.count == 4 and complete.ended_early is None and len(list(complete.frames())) == 4


# --- 3. a file cut short, a chunk overwritten ----------------------------------------------------


@pytest.mark.parametrize("fmt, keep_metadata", [("foxglove", False), ("ros2", False), ("ros2", True)])
def test_a_recording_cut_short_replays_its_whole_chunks_and_says_how_many(
    fmt: str, keep_metadata: bool, made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _path(tmp_path, fmt)
    _chunked(made, path, fmt)
    storage = _storage(path)
    third = chunk_spans(storage)[2]
    storage.write_bytes(storage.read_bytes()[: third[0] + third[1] // 2])  # in the third chunk
    if not keep_metadata and path.is_dir():
        (path / "metadata.yaml").unlink()  # a crashed bag; with it, rosbags cannot open the bag
    with caplog.at_level(logging.WARNING, logger="rrise"):
        records, summary = _replay(made["bundle"], path, tmp_path)
    assert [r["stamp_ns"] for r in records] == stamps(N)[: 2 * PER_CHUNK]
    warned = _warnings(caplog)
    assert f"recording {storage} did not finish" in warned and "salvaged 8 image messages" in warned
    if path.is_dir():
        assert f"reading its storage file {storage.name} directly" in warned
    assert "8 frames salvaged" in summary["source_ended_early"]


def _damaged(made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture, damage) -> tuple:
    """A complete Foxglove recording, its bytes changed by ``damage(data, path)``, then replayed:
    (records, summary), the warnings in ``caplog``."""
    path = tmp_path / "run.mcap"
    _chunked(made, path, "foxglove")
    data = bytearray(path.read_bytes())
    damage(data, path)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="rrise"):
        return _replay(made["bundle"], path, tmp_path)


def test_a_complete_recording_with_a_damaged_chunk_skips_it_and_says_so(
    made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def overwrite_chunk_2(data: bytearray, path: Path) -> None:
        start, length = chunk_spans(path)[1]
        middle = start + length // 2
        data[middle - 1024 : middle + 1024] = os.urandom(2048)  # 2 KB overwritten inside chunk 2

    records, summary = _damaged(made, tmp_path, caplog, overwrite_chunk_2)
    kept = stamps(N)[:PER_CHUNK] + stamps(N)[2 * PER_CHUNK :]  # chunks 1 and 3
    assert [r["stamp_ns"] for r in records] == kept and summary["errors"] == 0
    ended = summary["source_ended_early"]
    assert ended and "is damaged" in ended and f"8 of its {N} image messages" in ended
    assert "CRC" in ended and ended in _warnings(caplog)


def test_a_recording_whose_summary_is_overwritten_is_salvaged_whole(
    made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def overwrite_the_end(data: bytearray, path: Path) -> None:
        data[-2048:] = b"\xff" * 2048  # the summary, its offsets and the footer

    records, summary = _damaged(made, tmp_path, caplog, overwrite_the_end)
    assert [r["stamp_ns"] for r in records] == stamps(N)
    assert f"salvaged {N} image messages" in _warnings(caplog)
    assert f"{N} frames salvaged" in summary["source_ended_early"]


def test_a_file_with_nothing_to_salvage_is_refused_naming_it(made: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "header_only.mcap"
    path.write_bytes(made["source"].read_bytes()[:121])  # what a killed recorder used to leave
    with pytest.raises(ValueError, match="header_only.mcap is not a readable MCAP file"):
        open_reader(path)


# --- 4. a message that does not decode -----------------------------------------------------------


def _json_image_mcap(path: Path, frames: list[np.ndarray], bad: dict[int, bytes]) -> None:
    """A Foxglove ``CompressedImage`` channel in JSON (base64 data); message i is ``bad[i]`` if given."""
    from mcap.writer import Writer

    with open(path, "wb") as f:
        writer = Writer(f)
        writer.start()
        schema = writer.register_schema("foxglove.CompressedImage", "jsonschema", b"{}")
        channel = writer.register_channel("/camera/image", "json", schema)
        for i, (frame, stamp) in enumerate(zip(frames, stamps(len(frames)))):
            jpeg = base64.b64encode(cv2.imencode(".jpg", frame)[1].tobytes()).decode()
            ts = {"sec": stamp // 10**9, "nsec": stamp % 10**9}
            data = json.dumps({"timestamp": ts, "format": "jpeg", "data": jpeg}).encode()
            writer.add_message(channel, log_time=stamp, data=bad.get(i, data), publish_time=stamp)
        writer.finish()


def test_a_message_that_does_not_decode_is_an_error_record_and_the_replay_goes_on(
    made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "camera.mcap"
    bad = {2: b"this is not JSON {", 4: json.dumps({"data": "%%% not base64 %%%"}).encode()}
    _json_image_mcap(path, colour_frames(6), bad)
    with caplog.at_level(logging.WARNING, logger="rrise"):
        records, summary = _replay(made["bundle"], path, tmp_path)
    assert [r["stamp_ns"] for r in records] == stamps(6)  # every message, the bad ones stamped too
    assert [r["frame"] for r in records if r["error"]] == [2, 4] and summary["errors"] == 2
    assert all(r["error"] is None for r in records if r["frame"] not in bad)
    assert summary["source_error"] is None and summary["source_ended_early"] is None
    warned = [m for m in _warnings(caplog).splitlines() if "does not decode" in m]
    assert len(warned) == 2 and str(stamps(6)[2]) in warned[0] and str(path) in warned[0]


def test_a_bag_message_that_does_not_decode_is_an_error_record(
    made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer

    from rrise.runtime.ros2_msgs import COMPRESSED_IMAGE, compressed_image_message, typestore

    store, path = typestore(), tmp_path / "bag"
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as bag:
        connection = bag.add_connection("/camera/image", COMPRESSED_IMAGE, typestore=store)
        for i, (frame, stamp) in enumerate(zip(colour_frames(4), stamps(4))):
            jpeg = cv2.imencode(".jpg", frame)[1].tobytes()
            data = store.serialize_cdr(compressed_image_message(jpeg, stamp, store), COMPRESSED_IMAGE)
            bag.write(connection, stamp, b"\x00\x01\x00\x00\xff\xff\xff\x7f" if i == 1 else data)
    with caplog.at_level(logging.WARNING, logger="rrise"):
        records, summary = _replay(made["bundle"], path, tmp_path)
    assert [r["stamp_ns"] for r in records] == stamps(4)
    assert [r["frame"] for r in records if r["error"]] == [1] and summary["source_error"] is None
    assert "does not decode" in _warnings(caplog)


# --- 5. stamps that jump ---------------------------------------------------------------------------


def test_realtime_caps_an_absurd_gap_and_does_not_wait_for_stamps_going_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(replay, "MAX_GAP_S", 0.3)  # the cap, shortened for the test
    ms = 1_000_000
    media = [0, 40 * ms, 31 * YEAR_NS, 31 * YEAR_NS + 40 * ms, 31 * YEAR_NS + 20 * ms]  # 31 years on
    media += [31 * YEAR_NS + 80 * ms, 100 * ms, 140 * ms]  # a little out of order; then 31 years back
    frames = colour_frames(len(media))
    source = ReplaySource(
        "gaps", lambda: iter(zip(frames, media)), frame_count=len(media), fps=25.0, realtime=True
    )
    guard = threading.Timer(20, source.stop)  # a replay that waits for the gap fails, not hangs
    guard.start()
    came = []
    with caplog.at_level(logging.WARNING, logger="rrise"):
        for index, _, _ in source:
            came.append((index, time.monotonic()))
    guard.cancel()
    assert [i for i, _ in came] == list(range(len(media)))
    waits = [b - a for (_, a), (_, b) in zip(came, came[1:])]
    assert 0.25 <= waits[1] < 1.0  # 31 years waited as the cap
    assert waits[3] < 0.03  # 20 ms back: at once
    assert 0.03 <= waits[4] < 0.2  # 40 ms after the latest stamp (not 60 ms after the one before)
    assert waits[5] < 0.03 and 0.03 <= waits[6] < 0.2  # 31 years back: at once, then paced again
    assert [source.recorded_stamp(i) for i in range(len(media))] == media  # stamps kept as recorded
    warned = _warnings(caplog)
    assert "jump ahead by 31.0 years" in warned and "waiting 0.3 s instead" in warned
    assert "go back by 0.02 s" in warned
    assert "go back by 31.0 years" in warned


def test_a_bag_whose_metadata_announces_more_messages_than_it_holds_says_so(
    made: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The trial's corrupt ``message_count``: every frame the bag holds is replayed, and the run
    says the recording ended short of what it announces instead of ending silently."""
    path = _path(tmp_path, "ros2")
    _chunked(made, path, "ros2")
    meta = path / "metadata.yaml"
    text = meta.read_text()
    assert f"message_count: {N}" in text
    meta.write_text(text.replace(f"message_count: {N}", f"message_count: {N + 500}"))
    with caplog.at_level(logging.WARNING, logger="rrise"):
        records, summary = _replay(made["bundle"], path, tmp_path)
    assert [r["stamp_ns"] for r in records] == stamps(N)
    ended = summary["source_ended_early"]
    assert ended and f"{N} of" in ended and ended in _warnings(caplog)
