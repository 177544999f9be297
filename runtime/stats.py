"""``StreamStats``: what one stream counts, the status records it sends every few seconds, and the
summary it ends with. The only place those numbers are kept."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from rrise.records import make_status

if TYPE_CHECKING:
    from .runtime import Runtime
    from .sources import FrameSource

__all__ = ["LATENCY_WINDOW", "StreamStats"]

log = logging.getLogger("rrise.runtime")

LATENCY_WINDOW = 100_000  # percentiles over the most recent frames, so memory stays bounded
MAX_ERROR_LOGS = 20


def _percentiles(latencies: Any) -> tuple[float | None, float | None]:
    lat = np.asarray(latencies, dtype=np.float64)
    if not lat.size:
        return None, None
    p50, p99 = np.percentile(lat, [50, 99])
    return float(p50), float(p99)


class StreamStats:
    """Counts of one stream of records from ``runtime`` over ``source``.

    :meth:`add` takes every frame record; :meth:`status` gives the status record for the interval
    since the previous one (due every ``status_interval_s`` seconds; ``None`` or 0: never);
    :meth:`summary` gives the totals. Whoever sends the records says where ``publish_failed``
    comes from (:meth:`count_publish_failures`): the sinks know what they could not deliver.
    """

    def __init__(self, runtime: Runtime, source: FrameSource, status_interval_s: float | None = 1.0) -> None:
        self.runtime = runtime
        self.source = source
        self.status_every = status_interval_s or None
        self.frames = self.errors = self.abstained = self.alarms = 0
        self.status_records = 0
        self._publish_failed: Callable[[], int] = lambda: 0
        self.started = self.ended = time.monotonic()
        self._running = False
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._begin_interval(self.started)

    def _begin_interval(self, now: float) -> None:
        self._interval_start = now
        self._interval_frames = self._interval_scored = self._interval_abstained = 0
        self._interval_latencies: list[float] = []

    def count_publish_failures(self, counter: Callable[[], int]) -> None:
        """``counter()`` gives the records the consumer's publisher could not queue so far."""
        self._publish_failed = counter

    @property
    def publish_failed(self) -> int:
        return self._publish_failed()

    def begin(self) -> None:
        """The stream starts now (uptime, fps and the first status interval count from here)."""
        self.started = time.monotonic()
        self._running = True
        self._begin_interval(self.started)

    def finish(self) -> None:
        """The stream has ended (idempotent)."""
        if self._running:
            self.ended = time.monotonic()
            self._running = False

    @property
    def elapsed_s(self) -> float:
        return (time.monotonic() if self._running else self.ended) - self.started

    def add(self, record: dict[str, Any]) -> None:
        """Count one frame record."""
        latency = record["latency_ms"]
        self.frames += 1
        self._interval_frames += 1
        self._latencies.append(latency)
        self._interval_latencies.append(latency)
        if record["alarm"] is not None:
            self.alarms += 1
        if record["error"] is not None:
            self.errors += 1
            if self.errors <= MAX_ERROR_LOGS:
                log.warning("frame %d: %s", record["frame"], record["error"])
            return
        self._interval_scored += 1
        if record["abstain"]:
            self.abstained += 1
            self._interval_abstained += 1

    def status_due(self, now: float) -> bool:
        return self.status_every is not None and now - self._interval_start >= self.status_every

    def status(self, now: float, drops: int) -> dict[str, Any]:
        """The status record of the interval ending ``now``; the next interval starts."""
        src, monitor = self.source, self.runtime.monitor
        p50, p99 = _percentiles(self._interval_latencies)
        scored = self._interval_scored
        status = make_status(
            stamp_ns=time.time_ns(),
            source=src.name,
            bundle=self.runtime.bundle.id,
            uptime_s=now - self.started,
            frames=self.frames,
            fps=self._interval_frames / max(now - self._interval_start, 1e-9),
            drops=drops,
            errors=self.errors,
            abstain_rate=self._interval_abstained / scored if scored else None,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            alarm=None if monitor is None else monitor.alarm,
            source_state=src.state,
            reconnects=src.reconnects,
            publish_failed=self.publish_failed,
            monitor=None if monitor is None else monitor.state(),
        )
        self._begin_interval(now)
        self.status_records += 1
        return status

    def summary(self, drops: int) -> dict[str, Any]:
        """The totals: ``frames``, ``errors``, ``abstained``, ``certified``, ``fps``, latency
        percentiles, ``drops``, ``publish_failed``, ``reconnects``, ``alarms``, ``status_records``,
        ``elapsed_s``."""
        elapsed = self.elapsed_s
        p50, p99 = _percentiles(self._latencies)
        return {
            "frames": self.frames,
            "errors": self.errors,
            "abstained": self.abstained,
            "certified": self.frames - self.errors - self.abstained,
            "fps": self.frames / elapsed if elapsed > 0 else 0.0,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "drops": drops,
            "publish_failed": self.publish_failed,
            "reconnects": self.source.reconnects,
            "alarms": self.alarms,
            "status_records": self.status_records,
            "elapsed_s": elapsed,
        }
