"""Faults the runtime must ride out: unplugged cameras, corrupt frames, stalled subscribers,
overload, SIGTERM — plus the capture queue, status records and the shift alarm end to end."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from rrise.records import RECORD_KEYS, STATUS_KEYS
from rrise.runtime import Runtime, run_stream
from rrise.runtime.capture import FrameQueue
from rrise.runtime.retry import StartupRetrySource, open_with_retry
from rrise.runtime.sinks import ZmqPublisher
from rrise.runtime.sources import PushSource, Reconnect, SourceError, VideoCaptureSource
from rrise.subscriber import subscribe
from tests.runtime_fixtures import make_bundle, record_of, run_options, sample_frames


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("faults") / "bundle")


# --- a camera that can be unplugged -----------------------------------------------------------


class FakeCamera:
    """Stands in for cv2.VideoCapture. ``plan`` is shared by every open: a list of "ok" (a frame),
    "fail" (a failed read); after it is used up reads fail (unplugged). ``opens`` says which opens
    succeed."""

    def __init__(self, world: dict) -> None:
        self.world = world
        world["open_times"].append(time.monotonic())
        self.opened = world["opens"].pop(0) if world["opens"] else False

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opened

    def read(self):
        plan = self.world["plan"]
        if self.opened and plan and plan[0] == "ok":
            plan.pop(0)
            self.world["served"] += 1
            return True, np.full((28, 28, 3), self.world["served"] % 255, np.uint8)
        if plan and plan[0] == "fail":
            plan.pop(0)
        if plan and plan[0] == "unplug":
            plan.pop(0)
            self.opened = False
        return False, None

    def set(self, *_args) -> bool:
        return True

    def get(self, *_args) -> float:
        return 0.0

    def release(self) -> None:
        self.opened = False


def camera(world: dict, **kw) -> VideoCaptureSource:
    world.setdefault("open_times", [])
    world.setdefault("served", 0)
    policy = Reconnect(max_read_failures=2, retry_sleep_s=0.0, backoff_s=0.02, backoff_max_s=0.08, **kw)
    return VideoCaptureSource(
        0, "camera", capture_factory=lambda target, api: FakeCamera(world), reconnect=policy
    )


def test_unplugged_camera_reconnects_with_backoff_and_the_stream_goes_on(bundle_dir: Path) -> None:
    # 5 frames, unplugged (reads fail); 3 reopen attempts fail, the 4th succeeds; 5 more frames.
    world = {"plan": ["ok"] * 5 + ["unplug"] + ["ok"] * 5, "opens": [True, False, False, False, True]}
    src = camera(world, max_reconnects=10)
    got: list[dict] = []
    summary = run_stream(
        bundle_dir,
        src,
        run_options(max_frames=10, drop_policy="block", status_interval=0),
        callback=got.append,
    )
    assert summary["frames"] == 10 and summary["errors"] == 0 and summary["reconnects"] == 1
    assert summary["source_error"] is None and not summary["interrupted"]
    assert src.reconnect_attempts == 4
    assert [r["frame"] for r in got] == list(range(10))
    gaps = np.diff(world["open_times"][1:])  # between reopen attempts: 0.02 → 0.04 → 0.08 s
    assert np.all(gaps >= np.array([0.04, 0.08, 0.08]) * 0.9), gaps


def test_a_camera_that_never_comes_back_ends_the_stream_when_told_to(bundle_dir: Path) -> None:
    world = {"plan": ["ok"] * 3 + ["unplug"], "opens": [True]}
    src = camera(world, max_reconnects=2)
    summary = run_stream(bundle_dir, src, run_options(status_interval=0))
    assert summary["frames"] + summary["drops"] == 3 and summary["frames"] >= 1
    assert summary["reconnects"] == 0 and src.state == "ended" and summary["source_error"] is None
    assert src.reconnect_attempts == 2


def test_a_camera_that_is_absent_at_start_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match="cannot open camera 0"):
        camera({"plan": [], "opens": [False]})


# --- a source absent at start: --retry ---------------------------------------------------------


def late_camera(world: dict, appears_after: int):
    """An opener whose camera is absent for the first ``appears_after`` opens, then plugged in."""
    world.setdefault("open_times", [])

    def opener(spec, **_options):
        world["open_times"].append(time.monotonic())
        if len(world["open_times"]) <= appears_after:
            raise SourceError(f"cannot open camera {spec} (is it connected, and free?)")
        return camera({"plan": ["ok"] * 6, "opens": [True]}, max_reconnects=0)  # 6 frames, then gone

    return opener


def test_a_camera_absent_at_start_is_retried_with_backoff_until_it_appears(bundle_dir: Path) -> None:
    world: dict = {}
    src = open_with_retry("0", 5, opener=late_camera(world, 3), backoff_s=0.02, backoff_max_s=0.06)
    assert isinstance(src, StartupRetrySource) and src.is_live and src.state == "connecting"
    got: list[dict] = []
    statuses: list[dict] = []
    summary = run_stream(
        bundle_dir, src, run_options(status_interval=0.01), callback=got.append, on_status=statuses.append
    )
    assert summary["frames"] + summary["drops"] == 6 and summary["source_error"] is None
    assert src.attempts == 4 and src.name == "camera:0" and got and got[0]["source"] == "camera:0"
    gaps = np.diff(world["open_times"])  # 0.02 → 0.04 → 0.06 (capped)
    assert np.all(gaps >= np.array([0.02, 0.04, 0.06]) * 0.9), gaps
    assert statuses[0]["source_state"] == "connecting"


def test_retries_that_run_out_end_the_stream_with_the_reason(bundle_dir: Path) -> None:
    src = open_with_retry("0", 2, opener=late_camera({}, 99), backoff_s=0.01, backoff_max_s=0.02)
    summary = run_stream(bundle_dir, src, run_options(status_interval=0, no_output=True))
    assert summary["frames"] == 0 and src.state == "ended" and src.attempts == 3
    assert summary["source_error"].startswith("SourceError: cannot open camera 0")
    assert "gave up after 2 retries" in summary["source_error"]
    with pytest.raises(SourceError, match="cannot open camera 0"):  # --retry 0: at once, as before
        open_with_retry("0", 0, opener=late_camera({}, 1))
    with pytest.raises(ValueError, match="retry must be a count >= 0 or 'forever'"):
        open_with_retry("0", "often", opener=late_camera({}, 1))


def test_stopping_a_run_that_waits_for_its_source_ends_it_at_once() -> None:
    src = open_with_retry("0", "forever", opener=late_camera({}, 10**9), backoff_s=5.0, backoff_max_s=5.0)
    threading.Timer(0.2, src.stop).start()
    t0 = time.monotonic()
    assert list(src) == [] and time.monotonic() - t0 < 2.0
    assert src.retries is None


def test_rrise_run_waits_for_a_video_file_that_is_not_there_yet(bundle_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rrise.cli import app

    video, out = tmp_path / "late.avi", tmp_path / "records.jsonl"
    draft = tmp_path / "draft.avi"
    writer = cv2.VideoWriter(str(draft), cv2.VideoWriter_fourcc(*"MJPG"), 30, (28, 28))
    for f in sample_frames(7):
        writer.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    writer.release()

    class AppearsOnRetry(logging.Handler):  # the file appears once the run has found it missing
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying" in record.getMessage() and draft.exists():
                threading.Timer(0.3, draft.rename, (video,)).start()

    hook = AppearsOnRetry()
    logging.getLogger("rrise.runtime").addHandler(hook)
    args = ["run", "--bundle", str(bundle_dir), "--source", str(video), "--jsonl", str(out)]
    try:
        result = CliRunner().invoke(app, [*args, "--retry", "forever"])
    finally:
        logging.getLogger("rrise.runtime").removeHandler(hook)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 7
    assert "retrying forever with backoff" in result.output
    missing = CliRunner().invoke(app, [*args[:4], str(tmp_path / "never.avi"), "--retry", "1", "--no-output"])
    assert missing.exit_code == 1
    assert "the source failed: SourceError: source" in missing.output
    assert "gave up after 1 retry" in missing.output and "Traceback" not in missing.output


def test_a_source_that_raises_ends_the_stream_with_the_reason(bundle_dir: Path) -> None:
    class Exploding(PushSource):
        def __iter__(self):
            yield 0, sample_frames(1)[0], time.time_ns()
            raise OSError("driver crashed")

    summary = run_stream(bundle_dir, Exploding("x", live=True), run_options(status_interval=0))
    assert summary["frames"] == 1 and summary["source_error"] == "OSError: driver crashed"


# --- corrupt and wrong-sized frames -----------------------------------------------------------


def test_corrupt_and_wrong_sized_frames_become_error_records_and_the_stream_goes_on(
    bundle_dir: Path,
) -> None:
    good = sample_frames(3)
    bad = [
        None,
        b"\xff\xd8 half a jpeg",
        np.zeros((28, 28, 5), np.uint8),
        np.zeros((0, 0), np.uint8),
        np.zeros(784, np.uint8),
        np.full((28, 28), np.nan, np.float32),
        np.zeros((28, 28), np.int32),
    ]
    src = PushSource("robot", live=False)
    for f in [good[0], *bad, good[1], good[2]]:
        src.push(f)
    src.end()
    got: list[dict] = []
    summary = run_stream(bundle_dir, src, run_options(batch=4, status_interval=0), callback=got.append)
    assert summary["frames"] == 10 and summary["errors"] == len(bad)
    assert [r["frame"] for r in got] == list(range(10))
    assert all(set(r) == set(RECORD_KEYS) for r in got)
    for r in got[1:8]:
        assert r["error"] and r["pred"] is None and r["abstain"] and r["radius"] == 0.0
    rt = Runtime(bundle_dir)
    for r, f in zip([got[0], got[8], got[9]], good, strict=True):
        assert r["error"] is None and r["p_lower"] == rt.certify(f)["p_lower"]


# --- capture queue, overload, status records --------------------------------------------------


def test_latest_policy_keeps_the_newest_and_counts_drops() -> None:
    q = FrameQueue(2, "latest")
    for i in range(5):
        assert q.put((i, None, i))
    assert q.drops == 3
    assert [i for i, _, _ in q.get_batch(10, 0)] == [3, 4]
    q.close()
    assert q.get_batch(1, 0) is None


def test_block_policy_loses_nothing() -> None:
    q = FrameQueue(1, "block")
    got: list[int] = []

    def consume() -> None:
        while (items := q.get_batch(1, 1.0)) is not None:
            got.extend(i for i, _, _ in items)
            time.sleep(0.001)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(50):
        q.put((i, None, i))
    q.close()
    t.join(5)
    assert got == list(range(50)) and q.drops == 0


def test_overload_drops_are_counted_and_status_records_report_health(bundle_dir: Path) -> None:
    src = PushSource("fast-camera", live=True, capacity=4)
    frames = sample_frames(8)
    pushed = [0]
    statuses: list[dict] = []

    def produce() -> None:  # far faster than inference: no pacing at all, for 0.6 s
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            src.push(frames[pushed[0] % 8])
            pushed[0] += 1
            if pushed[0] % 50 == 0:
                time.sleep(0.0005)
        src.end()

    t = threading.Thread(target=produce)
    t.start()
    summary = run_stream(bundle_dir, src, run_options(status_interval=0.1), on_status=statuses.append)
    t.join(5)
    assert summary["drops"] > 0 and summary["frames"] + summary["drops"] == pushed[0]
    # a live PushSource is the stream's queue itself, bounded to it: no capture thread between
    assert summary["drop_policy"] == "latest" and not summary["threaded"]
    assert len(statuses) >= 3 and summary["status_records"] == len(statuses)
    for s in statuses:
        assert set(STATUS_KEYS) <= set(s) and s["kind"] == "status" and s["source_state"] == "open"
    last = statuses[-1]
    assert 0 < last["frames"] <= summary["frames"] and last["drops"] <= summary["drops"]
    assert last["fps"] > 0 and last["latency_p50_ms"] <= last["latency_p99_ms"]
    assert 0.0 <= last["abstain_rate"] <= 1.0


# --- stalled subscriber -----------------------------------------------------------------------


def test_a_stalled_subscriber_never_blocks_the_others_or_the_publisher() -> None:
    pub = ZmqPublisher("tcp://127.0.0.1:*", hwm=50)
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 5)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.SUBSCRIBE, b"rrise")
    stalled.connect(pub.endpoint)  # and never reads
    n = 3000
    got: list[int] = []
    stats: dict = {}
    sub = subscribe(pub.endpoint, timeout_s=5, stats=stats)

    def listen() -> None:
        for r in sub:
            got.append(r["seq"])
            if len(got) == n:
                break

    t = threading.Thread(target=listen)
    t.start()
    try:
        assert pub.wait_for_subscribers(2, 5) == 2
        payload = "x" * 2000  # big records fill the stalled link's buffers quickly
        t0 = time.monotonic()
        for seq in range(n):
            rec = record_of(seq, error="x", source=payload)
            assert pub.send(rec)
            # The live subscriber keeps up: never more than 20 records behind, however busy the
            # machine (the queue holds 50, but the publisher learns what was read only every 25
            # messages); the stalled one is never waited for.
            while seq - len(got) > 20 and t.is_alive():
                time.sleep(0.0005)
        send_s = time.monotonic() - t0
        t.join(15)
        stalled_has = 0
        while stalled.poll(0):
            stalled.recv_multipart()
            stalled_has += 1
    finally:
        stalled.close()
        sub.close()
        pub.close()
    assert got == list(range(n)) and stats["missed"] == 0
    assert pub.drops == 0 and send_s < 30
    assert stalled_has < n  # it lost records; nobody else did


# --- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_flushes_every_record_and_exits_zero(tmp_path: Path, bundle_dir: Path) -> None:
    video = tmp_path / "long.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (32, 32))
    for f in sample_frames(8, 32) * 500:
        writer.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    writer.release()
    out = tmp_path / "records.jsonl"
    cmd = [sys.executable, "-m", "rrise", "run", "--bundle", str(bundle_dir), "--source", str(video)]
    proc = subprocess.Popen([*cmd, "--jsonl", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 20_000):
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    text = out.read_text()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    summary = json.loads(err.strip().splitlines()[-1])["summary"]
    assert summary["interrupted"] and len(lines) == summary["frames"] < 4000
    assert [r["frame"] for r in lines] == list(range(len(lines)))


# --- the shift alarm end to end ---------------------------------------------------------------


def test_alarm_fires_on_a_shifted_stream_with_a_real_bundle(tiny_bundle: Path) -> None:
    from rrise import Bundle

    assert "monitor" in Bundle.load(tiny_bundle).variant("fp32")
    # the windowed shift test alone (the per-frame out-of-distribution flag has its own tests)
    rt = Runtime(tiny_bundle, watch={"window": 50, "false_alarm": 0.01, "ood": False})
    assert rt.monitor is not None
    records = rt.certify_batch([np.zeros((8, 8), np.uint8)] * 50)  # a dead, black camera
    assert records[-2]["alarm"] is None and records[-1]["alarm"] is not None
    assert records[-1]["alarm"].startswith("shift:")
    assert (
        Runtime(tiny_bundle, watch=False).certify_batch([np.zeros((8, 8), np.uint8)] * 250)[-1]["alarm"]
        is None
    )


def test_no_monitor_entry_means_no_alarm(bundle_dir: Path) -> None:
    rt = Runtime(bundle_dir)
    assert rt.monitor is None
    assert {r["alarm"] for r in rt.certify_batch(sample_frames(20))} == {None}


def test_a_live_push_source_is_the_queue_a_backlog_never_waits(bundle_dir: Path) -> None:
    """Frames pushed while nothing certifies are dropped down to the queue's size (the newest kept),
    so the first certified frame is the newest one, not the oldest of a backlog."""
    src = PushSource("camera", live=True)  # 64 waiting frames by default, 1 once a stream reads it
    frames = sample_frames(8)
    got: list[dict] = []
    with Runtime(bundle_dir) as rt, rt.stream(src) as stream:
        for i in range(40):
            src.push(frames[i % 8])
        src.end()
        got = [r for r in stream if "kind" not in r]
    assert [r["frame"] for r in got] == [39]
    assert stream.drops == 39 and stream.summary()["drops"] == 39


def test_status_records_keep_coming_while_a_push_producer_is_silent(bundle_dir: Path) -> None:
    src = PushSource("camera", live=True)
    statuses: list[dict] = []

    def produce() -> None:
        time.sleep(0.6)  # nothing for a while: the stream must still say how it is doing
        src.push(sample_frames(1)[0])
        src.end()

    t = threading.Thread(target=produce)
    t.start()
    summary = run_stream(bundle_dir, src, run_options(status_interval=0.1), on_status=statuses.append)
    t.join(5)
    assert summary["frames"] == 1 and len(statuses) >= 3
    assert statuses[0]["frames"] == 0
