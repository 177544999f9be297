"""``Stream``: a frame source certified by a :class:`~rrise.runtime.Runtime`, as an iterable of records.

Iterating a stream yields one record per frame (:data:`rrise.records.RECORD_KEYS`) and, every
``status_interval`` seconds, a status record (``kind == "status"``, :class:`rrise.records.Status`)
made by the stream's one :class:`~rrise.runtime.stream_stats.StreamStats`. What to do with them is the
consumer's business: :func:`rrise.runtime.runner.drain` sends them to sinks, a robot stack may just
loop over them.

Capture: live sources are read in their own thread (:mod:`rrise.runtime.capture`) into a bounded
queue that keeps the newest frames and counts what it drops (``drop_policy="latest"``); files and
folders give every frame, in order (``"block"``), read in the consumer's thread unless
``threaded``. Each step takes up to ``batch`` queued frames (never waiting to fill a batch);
the Runtime hands them to the backend in micro-batches no larger than the variant's ``max_batch``.
``latency_ms`` is stamped as each record is handed out (capture → consumer).

Faults: a bad frame gives an error record and the stream goes on; a source absent at start is
retried with backoff when ``retry`` allows (:mod:`rrise.runtime.retry`); a live source that loses
its device reconnects with backoff; the end of a file ends the stream; :meth:`Stream.stop` (safe in a
signal handler) ends it after the current batch. The source is closed when the stream ends.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rrise.bundle import Bundle
from rrise.certificate import Calibration
from rrise.monitor import ShiftMonitor
from rrise.records import Record, Verdict

from .capture import CaptureThread, FrameQueue, InlineFrames, PushedFrames
from .options import DropPolicy, StreamOptions
from .retry import open_with_retry
from .source_specs import open_source
from .sources import Frame, FrameSource
from .stream_stats import StreamStats

__all__ = ["Certifier", "Stream"]

log = logging.getLogger("rrise.runtime")

JOIN_TIMEOUT_S = 2.0  # how long a stop waits for a capture thread stuck in a blocking read
POLL_S = 0.25  # the longest a stream waits for a frame before it looks at its flags again
_UNLIMITED = float("inf")


class Certifier(Protocol):
    """What a :class:`Stream` needs of a :class:`~rrise.runtime.Runtime`."""

    bundle: Bundle
    backend_name: str
    variant: dict[str, Any]
    calibration: Calibration
    monitor: ShiftMonitor | None

    def certify_frames(
        self, frames: Sequence[np.ndarray | None], *, frame_indices: Sequence[int] | None = None
    ) -> list[Verdict]: ...


class Stream:
    """The records of ``source`` (a :class:`FrameSource`, or what
    :func:`~rrise.runtime.source_specs.open_source` takes) as certified by ``runtime``, read as
    ``options`` say (:class:`~rrise.runtime.options.StreamOptions`); iterate it once. See the module
    docstring.

    Parameters
    ----------
    runtime:
        A :class:`~rrise.runtime.Runtime` (anything with its :class:`Certifier` methods).
    source:
        What to read: a camera index, file, URL, pipeline, folder, recording, or an opened source.
    options:
        ``drop_policy`` ``"latest"`` keeps the newest ``queue_size`` frames (default ``batch``) and
        drops older ones (counted in ``drops``); ``"block"`` makes capture wait so every frame is
        certified in order (default queue ``2 * batch``); ``"auto"``: ``"latest"`` for live sources,
        ``"block"`` for files and folders. ``threaded``: capture in its own thread (default for live
        sources and for ``"latest"``, which needs it; not for a source that buffers its newest
        frames itself, a live :class:`~rrise.runtime.sources.PushSource`: it is bounded to the queue
        size and read directly, one hand-off fewer). ``retry``: how often to retry a source that
        does not open at start (while it waits, status records say ``source_state:
        "connecting"``). ``realtime``/``loop``: replay a video file or a recording.

    Each record is built and stamped here, once: ``stamp_ns`` is the capture time (a replayed
    recording's own), ``latency_ms`` runs from capture to hand-out, and a frame the source could not
    read says why (:meth:`FrameSource.frame_error`, e.g. the image file's name).

    Raises
    ------
    rrise.runtime.sources.SourceError
        A source that does not open (and ``retry`` allows no more tries).
    ValueError
        ``--drop-policy latest`` without threaded capture, or ``realtime``/``loop`` on an opened source.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from rrise.runtime import Runtime
    >>> from rrise.runtime.sources import PushSource
    >>> from tests.tiny_bundle import linear_sources, make_linear_bundle  # a real 1×4×4 bundle
    >>> folder = Path(tempfile.mkdtemp())
    >>> runtime = Runtime(make_linear_bundle(linear_sources(folder), folder / "bundle").path)
    >>> source = PushSource("robot", live=False)
    >>> for level in (0, 90, 180):
    ...     _ = source.push(np.full((4, 4), level, np.uint8))
    >>> source.end()
    >>> with Stream(runtime, source, StreamOptions(batch=2, status_interval=0)) as stream:
    ...     frames = [record["frame"] for record in stream]
    >>> frames, stream.summary()["frames"], stream.summary()["drop_policy"]
    ([0, 1, 2], 3, 'block')
    """

    def __init__(
        self, runtime: Certifier, source: str | int | Path | FrameSource, options: StreamOptions | None = None
    ) -> None:
        options = options or StreamOptions()
        src = _open(source, options)
        policy = options.drop_policy.value
        if policy == DropPolicy.auto.value:
            policy = "latest" if src.is_live else "block"
        threaded = options.threaded
        batch = options.batch
        capacity = options.queue_size or (batch if policy == "latest" else 2 * batch)
        pushed = threaded is None and policy == "latest" and src.buffers_newest
        if pushed:  # the source is the queue: no capture thread, no second buffer
            threaded = False
        elif threaded is None:
            threaded = policy == "latest" or src.is_live or src.waits_to_open
        if not threaded and policy == "latest" and not pushed:
            if src is not source:
                src.close()
            raise ValueError("--drop-policy latest needs threaded capture")
        self.runtime, self.source, self.options = runtime, src, options
        self.batch, self.max_frames = batch, options.max_frames
        self.drop_policy, self.threaded = policy, threaded
        self.stats = StreamStats(
            src,
            bundle=runtime.bundle.id,
            monitor=runtime.monitor,
            status_interval_s=options.status_every_s,
            adaptive=getattr(runtime, "adaptive", None) is not None,
        )
        self._frames: FrameQueue | InlineFrames | PushedFrames
        if pushed:
            self._frames = PushedFrames(src, capacity)
        else:
            self._frames = FrameQueue(capacity, policy) if threaded else InlineFrames(src, self.max_frames)
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
        verdicts = self.runtime.certify_frames(
            [f for _, f, _ in items], frame_indices=[i for i, _, _ in items]
        )
        src, bundle = self.source, self.runtime.bundle.id
        for verdict, (index, _, captured) in zip(verdicts, items):
            if verdict.error is not None:
                verdict = verdict._replace(error=src.frame_error(index) or verdict.error)
            recorded = src.recorded_stamp(index) if src.keeps_stamps else None
            record = Record.of(
                verdict,
                stamp_ns=captured if recorded is None else recorded,
                latency_ms=(time.time_ns() - captured) / 1e6,
                source=src.name,
                bundle=bundle,
            ).to_dict()
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


def _open(source: str | int | Path | FrameSource, options: StreamOptions) -> FrameSource:
    """``source`` opened as ``options`` say (a replay with ``realtime``/``loop``; startup retries)."""
    replay = options.realtime or options.loop
    if isinstance(source, FrameSource):
        if replay:
            raise ValueError(
                "--realtime/--loop apply to a source to open (a path), not to an opened FrameSource"
            )
        return source
    opener = functools.partial(open_source, realtime=options.realtime, loop=options.loop)
    return open_with_retry(source, options.retry, opener=opener)
