"""Embedding the runtime in a robot control loop.

The control loop runs at its own rate and must never wait for a camera or for inference. A camera
thread pushes frames into a ``PushSource``; a runtime thread iterates ``Runtime.stream`` over it
(the newest frames, drops counted), publishes every record for other processes and stores the
latest one. Each control tick reads that record and acts only on a certified, fresh, alarm-free
prediction whose radius covers the perturbations it must tolerate.

    python examples/robot_loop.py --bundle runs/demo/bundle --video runs/demo/demo_video.avi
    rrise keys robot --kind curve      # once: robot.curve.key stays here, robot.curve.pub to consumers
    python examples/robot_loop.py --bundle runs/demo/bundle --camera 0 \
        --publish tcp://192.168.1.10:5555 --curve-secret robot.curve.key

Frames here come from a video or a camera through OpenCV; on a robot they come from its driver.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import cv2

from rrise.runtime import OutputOptions, Runtime, open_sinks
from rrise.runtime.sources import PushSource

MIN_RADIUS = 0.1  # the ℓ2 perturbation (in [0,1]-pixel units) the decision must survive
MAX_AGE_MS = 200.0  # older than this, the record says nothing about the scene now


class LatestRecord:
    """The newest record, shared between the runtime's thread and the control loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._record: dict[str, Any] | None = None
        self.status: dict[str, Any] | None = None

    def put(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._record = record

    def get(self) -> dict[str, Any] | None:
        with self._lock:
            return self._record


def camera_thread(cap: cv2.VideoCapture, source: PushSource, fps: float, stop: threading.Event) -> None:
    period = 1.0 / fps
    while not stop.is_set():
        ok, frame = cap.read()
        if not ok:
            break
        source.push(frame)  # never blocks: a live PushSource drops the oldest when full
        time.sleep(period)
    source.end()


def decide(record: dict[str, Any] | None) -> str:
    """What the controller does with the latest record."""
    if record is None:
        return "wait: no record yet"
    age_ms = (time.time_ns() - record["stamp_ns"]) / 1e6
    if age_ms > MAX_AGE_MS:
        return f"safe stop: newest record is {age_ms:.0f} ms old"
    if record["error"] is not None:
        return f"safe stop: {record['error']}"
    if record["alarm"] is not None:
        return f"degraded: input distribution shifted ({record['alarm']}), certificate not trusted"
    if record["abstain"] or record["radius"] < MIN_RADIUS:
        return f"slow down: not certified at r={MIN_RADIUS} (radius {record['radius']:.3f})"
    return f"act on {record['label']!r} (certified radius {record['radius']:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--video")
    group.add_argument("--camera", type=int)
    ap.add_argument("--publish", default=None, help="also publish records, e.g. tcp://192.168.1.10:5555")
    ap.add_argument("--curve-secret", default=None, help="encrypt what is published (a .curve.key file)")
    ap.add_argument("--fps", type=float, default=30.0, help="camera rate")
    ap.add_argument("--control-hz", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    cap = cv2.VideoCapture(args.video if args.video is not None else args.camera)
    if not cap.isOpened():
        raise SystemExit(f"cannot open {args.video or args.camera}")
    latest = LatestRecord()
    source = PushSource("robot-camera", live=True)
    stop = threading.Event()
    summary: dict[str, Any] = {}

    def runtime_thread() -> None:
        with (
            Runtime(args.bundle) as rt,
            rt.stream(source) as stream,
            open_sinks(OutputOptions(publish=args.publish, curve_secret=args.curve_secret)) as sinks,
        ):
            for record in stream:  # frame records, and a status record every second
                sinks.send(record)
                if record.get("kind") == "status":
                    latest.status = record
                else:
                    latest.put(record)
            summary.update(stream.summary())

    workers = [
        threading.Thread(target=camera_thread, args=(cap, source, args.fps, stop), daemon=True),
        threading.Thread(target=runtime_thread, daemon=True),
    ]
    for w in workers:
        w.start()
    tick = 1.0 / args.control_hz
    deadline = time.monotonic() + args.seconds
    try:
        while time.monotonic() < deadline and workers[1].is_alive():
            t0 = time.monotonic()
            print(decide(latest.get()))
            time.sleep(max(0.0, tick - (time.monotonic() - t0)))
    finally:
        stop.set()
        source.stop()
        for w in workers:
            w.join(5)
        cap.release()
    if latest.status is not None:
        s = latest.status
        print(f"status: {s['fps']:.0f} fps, {s['drops']} dropped, p99 {s['latency_p99_ms']} ms")
    print({k: summary.get(k) for k in ("frames", "drops", "errors", "abstained", "alarms")})


if __name__ == "__main__":
    main()
