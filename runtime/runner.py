"""``run_stream``: source → Runtime → sinks, what ``rrise run`` calls.

A bad frame gives an error record and the stream goes on; SIGINT/SIGTERM stop it after the current
frame, with every sink flushed and closed, and the summary is returned as usual.
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
from rrise.records import DEFAULT_TOPIC

from .engine import Runtime
from .sinks import CallbackSink, JsonlSink, ZmqPublisher
from .sources import FrameSource, open_source

__all__ = ["run_stream"]

log = logging.getLogger("rrise.runtime")

LATENCY_WINDOW = 100_000  # percentiles over the most recent frames, so memory stays bounded
MAX_ERROR_LOGS = 20


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``stop`` for the duration (main thread only; elsewhere a no-op).

    A second signal raises KeyboardInterrupt, for a stream stuck in a blocking read."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if received:  # a second signal: the user means it, stop now
            raise KeyboardInterrupt
        received.append(signum)
        log.info("received %s: stopping after this frame", signal.Signals(signum).name)
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
) -> dict[str, Any]:
    """Certify every frame of ``source`` and send each record to every sink; return a summary.

    Sinks: ``publish`` (a ZeroMQ endpoint to bind), ``jsonl`` (a path, or ``-`` for stdout) and
    ``callback`` (called with each record). With ``wait_subscribers=n`` the first frame waits up to
    ``wait_timeout_s`` for ``n`` subscribers. Summary keys: ``frames``, ``errors``, ``abstained``,
    ``certified``, ``fps``, ``latency_p50_ms``, ``latency_p99_ms``, ``drops``, ``elapsed_s``,
    ``interrupted``, ``backend``, ``variant``, ``source``, ``bundle``.
    """
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    src = source if isinstance(source, FrameSource) else open_source(source)
    sinks: list[Any] = []
    publisher: ZmqPublisher | None = None
    stopped = threading.Event()
    broken_pipe = False
    frames = errors = abstained = 0
    latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def stop() -> None:
        stopped.set()
        src.stop()

    start = time.monotonic()
    runtime: Runtime | None = None
    try:
        runtime = Runtime(bundle, backend=backend, source_name=src.name)
        if publish:
            publisher = ZmqPublisher(publish, topic=topic)
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
        total = src.frame_count
        if max_frames is not None:
            total = max_frames if total is None else min(total, max_frames)
        start = time.monotonic()
        with (
            _stop_on_signals(stop),
            progress_bar(total, "certifying", unit="frame", enabled=show_progress) as bar,
        ):
            for index, frame, stamp in src:
                if stopped.is_set() or (max_frames is not None and frames >= max_frames):
                    break
                record = runtime.certify(frame, stamp_ns=stamp, frame_index=index)
                record["latency_ms"] = (time.time_ns() - stamp) / 1e6  # capture → publish
                try:
                    for sink in sinks:
                        sink.send(record)
                except BrokenPipeError:
                    log.info("output pipe closed: stopping")
                    broken_pipe = True
                    stop()
                frames += 1
                latencies.append(record["latency_ms"])
                if record["error"] is not None:
                    errors += 1
                    if errors <= MAX_ERROR_LOGS:
                        log.warning("frame %d: %s", index, record["error"])
                elif record["abstain"]:
                    abstained += 1
                bar.advance()
                if frames % 25 == 0:
                    bar.note(f"abstain {abstained / frames:.0%}, errors {errors}")
                if max_frames is not None and frames >= max_frames:
                    break
    finally:
        elapsed = time.monotonic() - start
        src.close()
        if runtime is not None:
            runtime.close()
        for sink in sinks:
            try:
                sink.close()
            except Exception:  # one failing sink must not keep the others open
                log.warning("closing %s failed", type(sink).__name__, exc_info=True)

    assert runtime is not None  # an exception would have left already
    lat = np.asarray(latencies, dtype=np.float64)
    return {
        "frames": frames,
        "errors": errors,
        "abstained": abstained,
        "certified": frames - errors - abstained,
        "fps": frames / elapsed if elapsed > 0 else 0.0,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "drops": publisher.drops if publisher is not None else 0,
        "elapsed_s": elapsed,
        "interrupted": stopped.is_set() and not broken_pipe,
        "backend": runtime.backend_name,
        "variant": f"{runtime.variant.get('precision')}/{runtime.variant.get('backend')}",
        "source": src.name,
        "bundle": runtime.bundle.id,
    }
