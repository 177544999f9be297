"""``run_stream``: source → capture thread → Runtime → sinks, what ``rrise run`` calls.

Capture runs in its own thread (:mod:`rrise.runtime.pipeline`): live sources keep the newest frames
in a bounded queue and count what they drop; files and image folders give every frame, in order.
The inference thread takes up to ``batch`` queued frames at a time (micro-batching without ever
waiting to fill a batch), certifies them, stamps ``latency_ms`` (capture → publish) and sends each
record to every sink. Every ``status_interval_s`` a status record (fps, drops, abstain rate,
latency p50/p99, alarm, source state) goes to the publisher's status topic and ``on_status``.

Faults: a bad frame gives an error record and the stream goes on; a live source that loses its
device reconnects with backoff (see :class:`~rrise.runtime.sources.VideoCaptureSource`); the end
of a file ends the stream cleanly; SIGINT/SIGTERM stop it after the current batch, with every sink
flushed and closed, and the summary is returned as usual.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rrise.bundle import Bundle
from rrise.progress import progress_bar
from rrise.records import DEFAULT_TOPIC, make_status

from .engine import Runtime
from .pipeline import DROP_POLICIES, CaptureThread, FrameQueue, InlineFrames
from .sinks import CallbackSink, JsonlSink, ZmqPublisher
from .sources import FrameSource, open_source

__all__ = ["run_stream"]

log = logging.getLogger("rrise.runtime")

LATENCY_WINDOW = 100_000  # percentiles over the most recent frames, so memory stays bounded
MAX_ERROR_LOGS = 20
JOIN_TIMEOUT_S = 2.0  # how long a stop waits for a capture thread stuck in a blocking read


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``stop`` for the duration (main thread only; elsewhere a no-op).

    A second signal raises KeyboardInterrupt, for a stream stuck in a blocking call."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if received:  # a second signal: the user means it, stop now
            raise KeyboardInterrupt
        received.append(signum)
        log.info("received %s: stopping after this batch", signal.Signals(signum).name)
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Interval:
    """What a status record reports about the interval since the previous one."""

    def __init__(self) -> None:
        self.reset(time.monotonic())

    def reset(self, now: float) -> None:
        self.start = now
        self.frames = 0
        self.scored = 0
        self.abstained = 0
        self.latencies: list[float] = []


def run_stream(
    bundle: Bundle | str | Path,
    source: str | int | Path | FrameSource,
    *,
    publish: str | None = None,
    jsonl: str | None = None,
    backend: str = "auto",
    max_frames: int | None = None,
    wait_subscribers: int = 0,
    wait_timeout_s: float = 5.0,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    show_progress: bool = False,
    topic: bytes | str = DEFAULT_TOPIC,
    batch: int = 1,
    drop_policy: str = "auto",
    queue_size: int | None = None,
    status_interval_s: float | None = 1.0,
    on_status: Callable[[dict[str, Any]], Any] | None = None,
    monitor: bool = True,
    hwm: int = 1000,
    runtime: Runtime | None = None,
    precision: str | None = None,
    threaded: bool | None = None,
) -> dict[str, Any]:
    """Certify the frames of ``source`` and send each record to every sink; return a summary.

    Sinks: ``publish`` (a ZeroMQ endpoint to bind; never blocks: a subscriber that falls
    ``hwm`` records behind loses records while the others get every one), ``jsonl`` (a path, or
    ``-`` for stdout, flushed per line) and ``callback`` (called with each record, in the
    inference thread). With ``wait_subscribers=n`` the first frame waits up to ``wait_timeout_s``
    for ``n`` subscribers.

    ``drop_policy``: ``"latest"`` keeps the newest ``queue_size`` frames (default ``batch``: with batch
    1 only the newest frame waits) and drops older ones (counted in ``drops``); ``"block"`` makes
    capture wait so every frame is certified in order (default queue ``2 * batch``); ``"auto"`` is
    ``"latest"`` for live sources and ``"block"`` for files and folders. ``batch`` > 1 certifies up to
    that many queued frames in one backend call. ``status_interval_s`` (``None`` or 0: off) paces status
    records, published on ``<topic>.status`` and passed to ``on_status``. ``monitor=False`` turns the
    distribution-shift alarm off (it is also off for bundles without a monitor entry). A ``runtime`` may
    be passed in to reuse a loaded model (it is not closed here). ``threaded``: capture in its own
    thread (default for live sources, and whenever the policy is ``"latest"``) or in the inference
    thread (default for files and folders under ``"block"``, where a thread only adds hand-off cost and
    queueing latency).

    Summary keys: ``frames``, ``errors``, ``abstained``, ``certified``, ``fps``,
    ``latency_p50_ms``, ``latency_p99_ms``, ``drops`` (frames captured but never certified),
    ``publish_failed`` (records the publisher could not queue at all), ``reconnects``,
    ``alarms`` (records that carried an alarm), ``status_records``, ``elapsed_s``,
    ``interrupted``, ``source_error``, ``backend``, ``variant``, ``source``, ``bundle``.
    """
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if queue_size is not None and queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    if status_interval_s is not None and status_interval_s < 0:
        raise ValueError(f"status_interval_s must be >= 0 (0 or None: off), got {status_interval_s}")
    src = source if isinstance(source, FrameSource) else open_source(source)
    policy = drop_policy if drop_policy != "auto" else ("latest" if src.is_live else "block")
    capacity = queue_size or (batch if policy == "latest" else 2 * batch)
    if threaded is None:
        threaded = policy == "latest" or src.is_live
    if not threaded and policy == "latest":
        raise ValueError("drop_policy 'latest' needs threaded capture")
    queue: FrameQueue | InlineFrames = (
        FrameQueue(capacity, policy) if threaded else InlineFrames(src, max_frames)
    )
    sinks: list[Any] = []
    publisher: ZmqPublisher | None = None
    stopped = threading.Event()
    broken_pipe = False
    frames = errors = abstained = alarms = status_count = 0
    latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
    interval = _Interval()
    capture: CaptureThread | None = None

    def stop() -> None:  # safe in a signal handler: only sets flags; the loop polls them
        stopped.set()
        src.stop()

    own_runtime = runtime is None
    start = time.monotonic()
    try:
        if runtime is None:
            runtime = Runtime(
                bundle, backend=backend, source_name=src.name, monitor=monitor, precision=precision
            )
        if publish:
            publisher = ZmqPublisher(publish, topic=topic, hwm=hwm)
            sinks.append(publisher)
        if jsonl:
            sinks.append(JsonlSink(jsonl))
        if callback is not None:
            sinks.append(CallbackSink(callback))
        if publisher is not None and wait_subscribers > 0:
            got = publisher.wait_for_subscribers(wait_subscribers, wait_timeout_s)
            if got < wait_subscribers:
                log.warning(
                    "%d of %d subscriber(s) after %.1f s; starting anyway",
                    got,
                    wait_subscribers,
                    wait_timeout_s,
                )

        def emit_status(now: float) -> None:
            nonlocal status_count
            dt = max(now - interval.start, 1e-9)
            lat = np.asarray(interval.latencies, dtype=np.float64)
            mon = runtime.monitor
            status = make_status(
                stamp_ns=time.time_ns(),
                source=src.name,
                bundle=runtime.bundle.id,
                uptime_s=now - start,
                frames=frames,
                fps=interval.frames / dt,
                drops=queue.drops + src.dropped,
                errors=errors,
                abstain_rate=interval.abstained / interval.scored if interval.scored else None,
                latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else None,
                latency_p99_ms=float(np.percentile(lat, 99)) if lat.size else None,
                alarm=None if mon is None else mon.alarm,
                source_state=src.state,
                reconnects=src.reconnects,
                publish_failed=0 if publisher is None else publisher.drops,
                monitor=None if mon is None else mon.state(),
            )
            interval.reset(now)
            status_count += 1
            if publisher is not None:
                publisher.send_status(status)
            if on_status is not None:
                on_status(status)

        total = src.frame_count
        if max_frames is not None:
            total = max_frames if total is None else min(total, max_frames)
        status_every = status_interval_s or None
        poll_s = min(status_every, 0.25) if status_every else 0.25
        start = time.monotonic()
        interval.reset(start)
        stopped_early = max_frames == 0
        if not stopped_early and isinstance(queue, FrameQueue):
            capture = CaptureThread(src, queue, max_frames if policy == "block" else None)
            capture.start()
        with (
            _stop_on_signals(stop),
            progress_bar(total, "certifying", unit="frame", enabled=show_progress) as bar,
        ):
            while not stopped_early and not stopped.is_set():
                want = batch if max_frames is None else min(batch, max_frames - frames)
                items = queue.get_batch(want, poll_s)
                if items is None:
                    break
                if items:
                    records = runtime.certify_batch(
                        [f for _, f, _ in items],
                        stamp_ns=[s for _, _, s in items],
                        frame_indices=[i for i, _, _ in items],
                    )
                    for record in records:
                        record["latency_ms"] = (time.time_ns() - record["stamp_ns"]) / 1e6
                        try:
                            for sink in sinks:
                                sink.send(record)
                        except BrokenPipeError:
                            log.info("output pipe closed: stopping")
                            broken_pipe = True
                            stop()
                        frames += 1
                        interval.frames += 1
                        latencies.append(record["latency_ms"])
                        interval.latencies.append(record["latency_ms"])
                        if record["alarm"] is not None:
                            alarms += 1
                        if record["error"] is not None:
                            errors += 1
                            if errors <= MAX_ERROR_LOGS:
                                log.warning("frame %d: %s", record["frame"], record["error"])
                        else:
                            interval.scored += 1
                            if record["abstain"]:
                                abstained += 1
                                interval.abstained += 1
                    bar.advance(len(records))
                    if frames % 25 < len(records):
                        bar.note(f"abstain {abstained / max(frames, 1):.0%}, errors {errors}")
                    if max_frames is not None and frames >= max_frames:
                        break
                if status_every:
                    now = time.monotonic()
                    if now - interval.start >= status_every:
                        emit_status(now)
    finally:
        elapsed = time.monotonic() - start
        src.stop()
        queue.abort()
        joined = True
        if capture is not None:
            capture.join(JOIN_TIMEOUT_S)
            joined = not capture.is_alive()
            if not joined:
                log.warning("capture thread of %s is stuck in a read; leaving it behind", src.name)
        if joined:
            src.close()
        if runtime is not None and own_runtime:
            runtime.close()
        for sink in sinks:
            try:
                sink.close()
            except Exception:  # one failing sink must not keep the others open
                log.warning("closing %s failed", type(sink).__name__, exc_info=True)

    assert runtime is not None  # an exception would have left already
    lat = np.asarray(latencies, dtype=np.float64)
    source_error = None
    if capture is not None:
        source_error = capture.describe_error()
    elif isinstance(queue, InlineFrames):
        source_error = queue.describe_error()
    return {
        "frames": frames,
        "errors": errors,
        "abstained": abstained,
        "certified": frames - errors - abstained,
        "fps": frames / elapsed if elapsed > 0 else 0.0,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "drops": queue.drops + src.dropped,
        "publish_failed": publisher.drops if publisher is not None else 0,
        "reconnects": src.reconnects,
        "alarms": alarms,
        "status_records": status_count,
        "elapsed_s": elapsed,
        "interrupted": stopped.is_set() and not broken_pipe,
        "source_error": source_error,
        "drop_policy": policy,
        "threaded": bool(threaded),
        "batch": batch,
        "backend": runtime.backend_name,
        "variant": f"{runtime.variant.get('precision')}/{runtime.variant.get('backend')}",
        "source": src.name,
        "bundle": runtime.bundle.id,
    }
