"""``Stream``: a frame source certified by a :class:`~rrise.runtime.Runtime`, as an iterable of records.

Iterating a stream yields one record per frame (:data:`rrise.records.RECORD_KEYS`) and, every
``status_interval_s``, a status record (``kind == "status"``, :data:`rrise.records.STATUS_KEYS`)
made by the stream's one :class:`~rrise.runtime.stats.StreamStats`. What to do with them is the
consumer's business: :func:`rrise.runtime.runner.drain` sends them to sinks, a robot stack may just
loop over them.

Capture: live sources are read in their own thread (:mod:`rrise.runtime.capture`) into a bounded
queue that keeps the newest frames and counts what it drops (``drop_policy="latest"``); files and
folders give every frame, in order (``"block"``), read in the consumer's thread unless
``threaded=True``. Each step takes up to ``batch`` queued frames (never waiting to fill a batch);
the Runtime hands them to the backend in micro-batches no larger than the variant's ``max_batch``.
``latency_ms`` is stamped as each record is handed out (capture → consumer).

Faults: a bad frame gives an error record and the stream goes on; a source absent at start is
retried with backoff when ``retry`` allows (:mod:`rrise.runtime.retry`); a live source that loses
its device reconnects with backoff; the end of a file ends the stream; :meth:`Stream.stop` (safe in a
signal handler) ends it after the current batch. The source is closed when the stream ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .capture import DROP_POLICIES, CaptureThread, FrameQueue, InlineFrames
from .retry import open_with_retry
from .sources import Frame, FrameSource
from .stats import StreamStats

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["Stream"]

log = logging.getLogger("rrise.runtime")

JOIN_TIMEOUT_S = 2.0  # how long a stop waits for a capture thread stuck in a blocking read
POLL_S = 0.25  # the longest a stream waits for a frame before it looks at its flags again
_UNLIMITED = float("inf")


def _check_options(
    batch: int, drop_policy: str, queue_size: int | None, max_frames: int | None, status: float | None
) -> None:
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if queue_size is not None and queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    if status is not None and status < 0:
        raise ValueError(f"status_interval_s must be >= 0 (0 or None: off), got {status}")


class Stream:
    """The records of ``source`` (a :class:`FrameSource` or what :func:`open_source` takes) as
    certified by ``runtime``; iterate it once. See the module docstring.

    ``drop_policy``: ``"latest"`` keeps the newest ``queue_size`` frames (default ``batch``) and drops
    older ones (counted in ``drops``); ``"block"`` makes capture wait so every frame is certified in
    order (default queue ``2 * batch``); ``"auto"``: ``"latest"`` for live sources, ``"block"`` for
    files and folders. ``threaded``: capture in its own thread (default for live sources and for
    ``"latest"``, which needs it) or in the consumer's thread (files and folders under ``"block"``,
    where a thread only adds hand-off cost). ``max_frames``: stop after that many records.
    ``retry``: how often to retry a source that does not open at start (a count, or ``"forever"``;
    default 0: fail at once), with backoff from ``retry_backoff_s`` doubling to ``retry_backoff_max_s``;
    while it waits, capture runs in its own thread and status records say ``source_state:
    "connecting"``.
    """

    def __init__(
        self,
        runtime: Runtime,
        source: str | int | Path | FrameSource,
        *,
        batch: int = 1,
        drop_policy: str = "auto",
        queue_size: int | None = None,
        max_frames: int | None = None,
        status_interval_s: float | None = 1.0,
        threaded: bool | None = None,
        retry: int | str | None = 0,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 8.0,
    ) -> None:
        _check_options(batch, drop_policy, queue_size, max_frames, status_interval_s)
        if isinstance(source, FrameSource):
            src = source
        else:
            src = open_with_retry(source, retry, backoff_s=retry_backoff_s, backoff_max_s=retry_backoff_max_s)
        policy = drop_policy if drop_policy != "auto" else ("latest" if src.is_live else "block")
        waits = getattr(src, "waits_to_open", False)
        threaded = (policy == "latest" or src.is_live or waits) if threaded is None else bool(threaded)
        if not threaded and policy == "latest":
            if src is not source:
                src.close()
            raise ValueError("drop_policy 'latest' needs threaded capture")
        capacity = queue_size or (batch if policy == "latest" else 2 * batch)
        self.runtime, self.source = runtime, src
        self.batch, self.max_frames = batch, max_frames
        self.drop_policy, self.threaded = policy, threaded
        self.stats = StreamStats(runtime, src, status_interval_s)
        self._frames = FrameQueue(capacity, policy) if threaded else InlineFrames(src, max_frames)
        self._capture: CaptureThread | None = None
        self._stopped = threading.Event()
        self._interrupted = True
        self._iterated = self._closed = False

    # --- control ----------------------------------------------------------------------------
    def stop(self, *, interrupted: bool = True) -> None:
        """End the stream after the current batch. Safe in a signal handler (it only sets flags).
        ``interrupted=False``: an orderly end (e.g. the consumer's output went away)."""
        self._interrupted = self._interrupted and interrupted
        self._stopped.set()
        self.source.stop()

    @property
    def drops(self) -> int:
        """Frames captured but never certified (queue and source drops)."""
        return self._frames.drops + self.source.dropped

    @property
    def total(self) -> int | None:
        """How many records the stream will give, when known (for a progress bar)."""
        total = self.source.frame_count
        if self.max_frames is not None:
            total = self.max_frames if total is None else min(total, self.max_frames)
        return total

    # --- the records ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._iterated or self._closed:
            raise RuntimeError("a Stream can be iterated once")
        self._iterated = True
        return self._records()

    def _records(self) -> Iterator[dict[str, Any]]:
        stats = self.stats
        stats.begin()
        poll_s = min(stats.status_every or POLL_S, POLL_S)
        try:
            if self.max_frames != 0 and isinstance(self._frames, FrameQueue):
                limit = self.max_frames if self.drop_policy == "block" else None
                self._capture = CaptureThread(self.source, self._frames, limit)
                self._capture.start()
            while not self._stopped.is_set() and self._left() > 0:
                items = self._frames.get_batch(min(self.batch, self._left()), poll_s)
                if items is None:
                    break
                if items:
                    yield from self._certify(items)
                now = time.monotonic()
                if stats.status_due(now):
                    yield stats.status(now, self.drops)
        finally:
            self.close()

    def _left(self) -> float:
        return _UNLIMITED if self.max_frames is None else self.max_frames - self.stats.frames

    def _certify(self, items: list[Frame]) -> Iterator[dict[str, Any]]:
        records = self.runtime.certify_batch(
            [f for _, f, _ in items],
            stamp_ns=[s for _, _, s in items],
            frame_indices=[i for i, _, _ in items],
            source=self.source.name,
        )
        for record in records:
            record["latency_ms"] = (time.time_ns() - record["stamp_ns"]) / 1e6
            self.stats.add(record)
            yield record

    # --- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop capture and close the source (left open if its thread is stuck in a read)."""
        if self._closed:
            return
        self._closed = True
        self.stats.finish()
        self.source.stop()
        self._frames.abort()
        if self._capture is not None:
            self._capture.join(JOIN_TIMEOUT_S)
            if self._capture.is_alive():
                log.warning("capture thread of %s is stuck in a read; leaving it behind", self.source.name)
                return
        self.source.close()

    def summary(self) -> dict[str, Any]:
        """The totals so far (see :meth:`StreamStats.summary`) and how the stream ran."""
        runtime, variant = self.runtime, self.runtime.variant
        return {
            **self.stats.summary(self.drops),
            "interrupted": self._stopped.is_set() and self._interrupted,
            "source_error": self._source_error(),
            "drop_policy": self.drop_policy,
            "threaded": self.threaded,
            "batch": self.batch,
            "backend": runtime.backend_name,
            "variant": f"{variant.get('precision')}/{variant.get('backend')}",
            "source": self.source.name,
            "bundle": runtime.bundle.id,
        }

    def _source_error(self) -> str | None:
        if self._capture is not None:
            return self._capture.describe_error()
        if isinstance(self._frames, InlineFrames):
            return self._frames.describe_error()
        return None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
