"""``StreamStats``: what one stream counts, the status records it sends every few seconds, and the
summary it ends with. The only place those numbers are kept (the math of certificates is
:mod:`rrise.stats`; this module only counts)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from rrise.monitor import ShiftMonitor
from rrise.records import DELIVERY_KEYS, Status

from .sources import FrameSource

__all__ = ["LATENCY_WINDOW", "McCounts", "StreamStats", "ood_flagged"]

log = logging.getLogger("rrise.runtime")

LATENCY_WINDOW = 100_000  # percentiles over the most recent frames, so memory stays bounded
MAX_ERROR_LOGS = 20
OOD_WORD = "ood"  # the alarm word of a frame flagged out of distribution (rrise.ood), always first


def ood_flagged(record: dict[str, Any]) -> bool:
    """Whether a frame record was flagged out of distribution: its alarm is ``ood`` or starts
    with ``ood+`` (the runtime puts the per-frame flag before any shift word)."""
    alarm = record.get("alarm")
    return isinstance(alarm, str) and alarm.split("+", 1)[0] == OOD_WORD


def _percentiles(latencies: Any) -> tuple[float | None, float | None]:
    lat = np.asarray(latencies, dtype=np.float64)
    if not lat.size:
        return None, None
    p50, p99 = np.percentile(lat, [50, 99])
    return float(p50), float(p99)


def _spread(values: Any) -> dict[str, float | None]:
    """p50, p95 and p99 of ``values`` (None each when empty)."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return {"p50": None, "p95": None, "p99": None}
    return dict(zip(("p50", "p95", "p99"), (float(x) for x in np.percentile(v, [50, 95, 99]))))


class McCounts:
    """What adaptive certification spent, counted from the records' ``certified_by`` and
    ``mc_draws``: frames given draws, frames Monte Carlo certified, draws (total, and per frame
    given draws: mean and p95), and the latency of each path (frames given no draws, ``surrogate``;
    frames given draws, ``mc``), since the start and over the current status interval.

    Parameters
    ----------
    window:
        How many recent frames the percentiles cover.

    >>> counts = McCounts()
    >>> for draws, by, latency in ((0, "surrogate", 1.0), (512, "mc", 9.0), (256, None, 5.0)):
    ...     counts.add({"mc_draws": draws, "certified_by": by, "latency_ms": latency})
    >>> totals = counts.totals()
    >>> totals["mc_frames"], totals["mc_certified"], totals["mc_draws"], totals["mc_draws_mean"]
    (2, 1, 768, 384.0)
    >>> totals["latency_by_path"]["surrogate"]["p50"], totals["latency_by_path"]["mc"]["p99"]
    (1.0, 8.96)
    """

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self.frames = self.certified = self.draws = 0
        self._draws: deque[int] = deque(maxlen=window)
        self._latency = {"surrogate": deque(maxlen=window), "mc": deque(maxlen=window)}
        self.begin_interval()

    def begin_interval(self) -> None:
        self._interval = {"surrogate": [], "mc": []}

    def add(self, record: dict[str, Any]) -> None:
        """Count one frame record of an adaptive run."""
        draws = int(record.get("mc_draws") or 0)
        path = "mc" if draws else "surrogate"
        self._latency[path].append(record["latency_ms"])
        self._interval[path].append(record["latency_ms"])
        if draws:
            self.frames += 1
            self.draws += draws
            self._draws.append(draws)
        if record.get("certified_by") == "mc":
            self.certified += 1

    def totals(self, interval: bool = False) -> dict[str, Any]:
        """The counts (:data:`rrise.records.STATUS_ADAPTIVE_KEYS`); latencies over the current
        interval when ``interval``, else since the start."""
        latency = self._interval if interval else self._latency
        draws = np.asarray(self._draws, dtype=np.float64)
        return {
            "mc_frames": self.frames,
            "mc_certified": self.certified,
            "mc_draws": self.draws,
            "mc_draws_mean": float(draws.mean()) if draws.size else None,
            "mc_draws_p95": float(np.percentile(draws, 95)) if draws.size else None,
            "latency_by_path": {path: _spread(values) for path, values in latency.items()},
        }


class StreamStats:
    """Counts of one stream of records over ``source``, certified with bundle ``bundle`` (its id)
    and watched by the shift alarm ``monitor`` (None without one).

    :meth:`add` takes every frame record; :meth:`status` gives the status record for the interval
    since the previous one (due every ``status_interval_s`` seconds; ``None`` or 0: never);
    :meth:`summary` gives the totals. Whoever sends the records says where ``publish_failed`` and
    the subscriber counts come from (:meth:`count_publish_failures`, :meth:`report_delivery`): the
    sinks know what they could and could not deliver.

    Parameters
    ----------
    source:
        The stream's source (its name, state and reconnects go into status records).
    bundle:
        The bundle id the records carry.
    monitor:
        The shift alarm, whose word and state status records carry (None without one).
    status_interval_s:
        Seconds between status records (None or 0: none).
    adaptive:
        Records carry ``mc_draws`` (``rrise run --mc-budget N``): status records and the summary
        add :class:`McCounts`' keys.

    >>> from rrise.runtime.sources import PushSource
    >>> stats = StreamStats(PushSource("robot"), bundle="b" * 16, status_interval_s=1.0)
    >>> stats.begin()
    >>> stats.add({"frame": 0, "latency_ms": 2.0, "alarm": None, "error": None, "abstain": True})
    >>> status = stats.status(stats.started + 1.0, drops=0)
    >>> status["kind"], status["frames"], status["abstain_rate"], status["source"]
    ('status', 1, 1.0, 'robot')
    """

    def __init__(
        self,
        source: FrameSource,
        *,
        bundle: str,
        monitor: ShiftMonitor | None = None,
        status_interval_s: float | None = 1.0,
        adaptive: bool = False,
    ) -> None:
        self.source = source
        self.mc = McCounts() if adaptive else None
        self.bundle = bundle
        self.monitor = monitor
        self.status_every = status_interval_s or None
        self.frames = self.errors = self.abstained = self.alarms = self.ood_flags = 0
        self.status_records = 0
        self._publish_failed: Callable[[], int] = lambda: 0
        self._delivery: Callable[[], dict[str, Any]] = dict
        self.started = self.ended = time.monotonic()
        self._running = False
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._begin_interval(self.started)

    def _begin_interval(self, now: float) -> None:
        self._interval_start = now
        self._interval_frames = self._interval_scored = self._interval_abstained = 0
        self._interval_ood = 0
        self._interval_latencies: list[float] = []

    def count_publish_failures(self, counter: Callable[[], int]) -> None:
        """``counter()`` gives the records the consumer's publisher could not queue so far."""
        self._publish_failed = counter

    def report_delivery(self, delivery: Callable[[], dict[str, Any]]) -> None:
        """``delivery()`` gives the publishers' subscriber counts (:meth:`Sinks.delivery`)."""
        self._delivery = delivery

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
        """Count one frame record (logging the first few errors)."""
        latency = record["latency_ms"]
        if self.mc is not None:
            self.mc.add(record)
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
        if ood_flagged(record):
            self.ood_flags += 1
            self._interval_ood += 1
        if record["abstain"]:
            self.abstained += 1
            self._interval_abstained += 1

    def status_due(self, now: float) -> bool:
        return self.status_every is not None and now - self._interval_start >= self.status_every

    def status(self, now: float, drops: int) -> dict[str, Any]:
        """The status record (:class:`rrise.records.Status`) of the interval ending ``now``; the
        next interval starts. Beside the abstain rate it carries ``ood_flags`` (frames flagged out
        of distribution since the start) and ``ood_flag_rate`` (their share of this interval's
        scored frames; None without any)."""
        src, monitor = self.source, self.monitor
        p50, p99 = _percentiles(self._interval_latencies)
        scored = self._interval_scored
        status = Status(
            stamp_ns=time.time_ns(),
            source=src.name,
            bundle=self.bundle,
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
            ood_flags=self.ood_flags,
            ood_flag_rate=self._interval_ood / scored if scored else None,
            monitor=None if monitor is None else monitor.state(),
            **self._delivery_counts(DELIVERY_KEYS),
            **({} if self.mc is None else self.mc.totals(interval=True)),
        )
        if self.mc is not None:
            self.mc.begin_interval()
        self._begin_interval(now)
        self.status_records += 1
        return status.to_dict()

    def _delivery_counts(self, keys: tuple[str, ...]) -> dict[str, Any]:
        delivery = self._delivery()
        return {k: delivery.get(k) for k in keys}

    def summary(self, drops: int) -> dict[str, Any]:
        """The totals: ``frames``, ``errors``, ``abstained``, ``certified``, ``fps``, latency
        percentiles, ``drops``, ``publish_failed``, ``reconnects``, ``alarms``, ``ood_flags`` (frames
        flagged out of distribution), ``source_ended_early`` (None, or why a file source stopped
        short of its announced frames: how many it gave), ``status_records``,
        ``elapsed_s``, and the publishers' ``subscribers`` (at the end), ``subscribers_peak``,
        ``published``, ``published_unheard`` (lost for sure: no subscriber was connected),
        ``published_offered`` (an upper bound on deliveries, summed over subscribers) and
        ``publishers`` (those counts per endpoint); None/[] without a publisher; in adaptive mode
        also :data:`rrise.records.STATUS_ADAPTIVE_KEYS` (:class:`McCounts`)."""
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
            "ood_flags": self.ood_flags,
            "source_ended_early": self.source.ended_early,
            "status_records": self.status_records,
            "elapsed_s": elapsed,
            **self._delivery_counts((*DELIVERY_KEYS, "published_offered")),
            "publishers": self._delivery().get("publishers", []),
            **({} if self.mc is None else self.mc.totals()),
        }
