"""The capture side of a stream: a capture thread feeding a bounded frame queue (or, for files,
frames read inline by the consumer).

Capture runs in its own thread so decoding (or waiting for a camera) overlaps inference. The queue
between them has a fixed capacity and one of two policies:

* ``"latest"`` (live sources): a full queue drops its *oldest* frame to take the new one, so
  inference always works on the newest frames and latency stays bounded however fast the camera
  runs; every dropped frame is counted in :attr:`FrameQueue.drops`.
* ``"block"`` (files, image folders): a full queue makes the capture thread wait, so every frame
  is certified, in order.

Memory is bounded by the capacity in both cases.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from .options import DROP_POLICIES
from .sources import Frame, FrameSource

__all__ = ["DROP_POLICIES", "CaptureThread", "FrameQueue", "InlineFrames", "PushedFrames"]

log = logging.getLogger("rrise.runtime")


class FrameQueue:
    """A bounded, thread-safe frame queue with a drop policy (``"latest"`` or ``"block"``)."""

    def __init__(self, capacity: int, policy: str) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        if policy not in ("latest", "block"):
            raise ValueError(f"queue policy must be 'latest' or 'block', got {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self.drops = 0
        self._items: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._closed = False  # the producer is done: what is queued is still delivered
        self._aborted = False  # the consumer is gone: nothing more is delivered

    def put(self, item: Frame) -> bool:
        """Queue one frame; False once the queue is aborted (the producer should stop)."""
        with self._cond:
            if self.policy == "block":
                while len(self._items) >= self.capacity and not self._aborted:
                    self._cond.wait()
            if self._aborted:
                return False
            if len(self._items) >= self.capacity:
                self._items.popleft()
                self.drops += 1
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get_batch(self, max_items: int, timeout_s: float | None) -> list[Frame] | None:
        """Up to ``max_items`` frames, oldest first, waiting up to ``timeout_s`` for the first.

        Returns ``[]`` on timeout and ``None`` when the stream has ended (closed and empty, or
        aborted). Never waits to fill a batch: it takes what is there.
        """
        with self._cond:
            if not self._items and not self._closed and not self._aborted:
                self._cond.wait(timeout_s)
            if self._aborted or (not self._items and self._closed):
                return None
            n = min(max_items, len(self._items))
            batch = [self._items.popleft() for _ in range(n)]
            if batch:
                self._cond.notify_all()
            return batch

    def close(self) -> None:
        """The producer is done; frames already queued are still delivered."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Stop now: wake both sides, deliver nothing more."""
        with self._cond:
            self._aborted = True
            self._items.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class CaptureThread(threading.Thread):
    """Iterates ``source`` into ``queue`` until the source ends, fails, or the queue is aborted.

    An exception from the source ends the stream (the queue is closed) and is kept in
    :attr:`error`; the frames already queued are still certified.
    """

    def __init__(self, source: FrameSource, queue: FrameQueue, max_frames: int | None = None) -> None:
        super().__init__(name=f"rrise-capture[{source.name}]", daemon=True)
        self.source = source
        self.queue = queue
        self.max_frames = max_frames
        self.error: BaseException | None = None
        self.captured = 0

    def run(self) -> None:
        try:
            for item in self.source:
                if self.max_frames is not None and self.captured >= self.max_frames:
                    break
                if not self.queue.put(item):
                    break
                self.captured += 1
        except BaseException as exc:  # noqa: BLE001 - report any source failure, never die silently
            self.error = exc
            log.error("source %s failed: %s", self.source.name, exc, exc_info=True)
        finally:
            self.queue.close()

    def describe_error(self) -> Any:
        return None if self.error is None else f"{type(self.error).__name__}: {self.error}"


class PushedFrames:
    """The :class:`FrameQueue` interface read straight from a source that buffers its newest frames
    itself (a live :class:`~rrise.runtime.sources.PushSource`, bounded to the queue's size): no
    capture thread and no second buffer, so a frame waits only for the batch being certified. The
    source counts its drops; waits time out like the queue's, so status records keep coming while
    the producer is silent."""

    policy = "latest"
    drops = 0  # counted by the source (FrameSource.dropped)

    def __init__(self, source: Any, capacity: int) -> None:
        source.keep_newest(capacity)
        self.source = source

    def get_batch(self, max_items: int, timeout_s: float | None) -> list[Frame] | None:
        return self.source.next_batch(max_items, timeout_s)

    def abort(self) -> None:
        self.source.stop()

    def describe_error(self) -> Any:
        return None


class InlineFrames:
    """The same interface as a :class:`FrameQueue` fed by a :class:`CaptureThread`, but reading the
    source in the caller's thread: for files and folders, where nothing is lost by waiting and a
    second thread only adds hand-off cost and queueing latency (measured in bench_runtime)."""

    policy = "inline"
    drops = 0

    def __init__(self, source: FrameSource, max_frames: int | None = None) -> None:
        self.source = source
        self._it = iter(source)
        self._left = max_frames
        self._aborted = False
        self.error: BaseException | None = None

    def get_batch(self, max_items: int, timeout_s: float | None = None) -> list[Frame] | None:
        if self._aborted or self._it is None:
            return None
        batch: list[Frame] = []
        try:
            while len(batch) < max_items and (self._left is None or self._left > 0):
                item = next(self._it, None)
                if item is None:
                    self._it = None
                    break
                batch.append(item)
                if self._left is not None:
                    self._left -= 1
        except Exception as exc:  # noqa: BLE001 - report any source failure, never die silently
            self.error = exc
            log.error("source %s failed: %s", self.source.name, exc, exc_info=True)
            self._it = None
        return batch or None

    def abort(self) -> None:
        self._aborted = True

    def describe_error(self) -> Any:
        return None if self.error is None else f"{type(self.error).__name__}: {self.error}"
