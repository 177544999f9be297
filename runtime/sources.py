"""Frame sources: camera index, video file, RTSP/HTTP URL, GStreamer pipeline, image folder.

A :class:`FrameSource` (:func:`rrise.runtime.source_specs.open_source` opens one from what
``--source`` says): iterate it for ``(frame_index, frame, stamp_ns)``
with ``stamp_ns`` the capture time (Unix ns). A frame is ``None`` when one image of a folder cannot
be read, so the caller emits an error record for it and goes on (:meth:`FrameSource.frame_error`
names the file). Video files end at their last frame; one that ends before the frame count its
header announces (truncated or damaged) says so in :attr:`FrameSource.ended_early` and a warning;
live sources retry a failed read, then reconnect with exponential backoff (forever by default).
:class:`PushSource` is the in-process source: a robot stack pushes frames into it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .imagecodec import decode_compressed, image_defect

__all__ = [
    "IMAGE_EXTENSIONS",
    "FrameSource",
    "ImageFolderSource",
    "PushSource",
    "Reconnect",
    "SourceError",
    "VideoCaptureSource",
    "is_url",
]

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
    ".pbm",
    ".pnm",
)
log = logging.getLogger("rrise.runtime")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Frame = tuple[int, "np.ndarray | None", int]


def is_url(text: str) -> bool:
    """Whether ``text`` starts with a URL scheme (``rtsp://``, ``http://``, ``file://``…)."""
    return bool(_URL.match(text))


class SourceError(RuntimeError):
    """A source that cannot be opened; the message names it and says why."""


class FrameSource:
    """Base class: an iterable of ``(frame_index, frame or None, stamp_ns)``.

    Every attribute a consumer may read is declared here, with the value a source that does not
    care gives: ``name``; ``is_live`` (frames come whether or not they are read: a camera);
    ``reconnects``; ``dropped`` (frames the source itself discarded: a full PushSource);
    ``ended_early`` (why a finite source stopped short of its announced frames); ``waits_to_open``
    (it opens when iterated, after retries); ``keeps_stamps`` (its frames carry recorded capture
    times, :meth:`recorded_stamp`, to put back into their records); ``fps`` (the frame rate it
    plays at, where known); ``buffers_newest`` (another thread pushes frames into the source's own
    buffer, which :meth:`keep_newest` bounds: the stream then reads it in its own thread, with no
    capture thread between, and the source counts what it drops)."""

    name: str = "source"
    is_live: bool = False
    reconnects: int = 0
    dropped: int = 0
    ended_early: str | None = None
    waits_to_open: bool = False
    keeps_stamps: bool = False
    fps: float | None = None
    buffers_newest: bool = False

    def __init__(self) -> None:
        self._stop = threading.Event()

    @property
    def state(self) -> str:
        """``"open"``, ``"reconnecting"`` (a live source that lost its device) or ``"ended"``."""
        return "open"

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    @property
    def frame_count(self) -> int | None:
        """Frames a finite source will give, when known."""
        return None

    def frame_error(self, index: int) -> str | None:
        """Why the frame at ``index`` came as None (e.g. the image file that cannot be read), when
        the source knows; None otherwise."""
        return None

    def recorded_stamp(self, index: int) -> int | None:
        """The recorded capture time of frame ``index`` when :attr:`keeps_stamps`; None otherwise."""
        return None

    def stop(self) -> None:
        """Ask a running iteration to end after the current frame (safe from a signal handler)."""
        self._stop.set()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ImageFolderSource(FrameSource):
    """The image files of a folder (or one image file), sorted by name."""

    def __init__(self, path: str | Path, files: list[Path] | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = str(path)
        if files is None:
            files = sorted(
                p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        if not files:
            raise SourceError(f"image folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.files = files
        self._unreadable: dict[int, str] = {}

    @property
    def frame_count(self) -> int:
        return len(self.files)

    def frame_error(self, index: int) -> str | None:
        return self._unreadable.get(index)

    def __iter__(self) -> Iterator[Frame]:
        for i, f in enumerate(self.files):
            if self._stop.is_set():
                return
            frame, why = _read_image(f)
            if frame is None:
                self._unreadable[i] = why
            yield i, frame, time.time_ns()


def _read_image(path: Path) -> tuple[np.ndarray | None, str]:
    """The frame in image file ``path`` (grey files stay H×W, colour files come as BGR, always
    8-bit), or None and why not, naming the file. The bytes are read once; a file cut short or
    damaged (:func:`rrise.runtime.imagecodec.image_defect`) is refused rather than decoded into a
    partly grey picture that would be certified as the scene."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"cannot read image file {path}: it is gone (removed after the folder was listed)"
    except OSError as exc:
        return None, f"cannot read image file {path}: {exc.strerror or exc}"
    if not data:
        return None, f"cannot read image file {path}: it is empty (0 bytes)"
    defect = image_defect(data)
    if defect is not None:
        return None, f"cannot read image file {path}: {defect}"
    frame = decode_compressed(data)
    if frame is None:
        return (
            None,
            f"cannot read image file {path}: OpenCV cannot decode it (corrupt, truncated or not an image)",
        )
    return frame, ""


@dataclass(frozen=True)
class Reconnect:
    """How a live :class:`VideoCaptureSource` rides out a lost device or stream: ``max_read_failures``
    failed reads in a row (``retry_sleep_s`` apart) mean it is lost; it is reopened with backoff
    from ``backoff_s`` doubling up to ``backoff_max_s``, forever unless ``max_reconnects``."""

    max_read_failures: int = 20
    max_reconnects: int | None = None
    retry_sleep_s: float = 0.01
    backoff_s: float = 0.1
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_read_failures < 1:
            raise ValueError(f"max_read_failures must be >= 1, got {self.max_read_failures}")
        if self.max_reconnects is not None and self.max_reconnects < 0:
            raise ValueError(f"max_reconnects must be >= 0 or None, got {self.max_reconnects}")
        if not 0 < self.backoff_s <= self.backoff_max_s:
            raise ValueError(
                f"need 0 < backoff_s <= backoff_max_s, got {self.backoff_s}, {self.backoff_max_s}"
            )


class VideoCaptureSource(FrameSource):
    """Anything ``cv2.VideoCapture`` opens: camera index, video file, URL or GStreamer pipeline.

    Files give every frame in order and end cleanly at the last one. Live sources (camera, device,
    URL, pipeline) reconnect as ``reconnect`` says (:class:`Reconnect`); :attr:`state` is
    ``"reconnecting"`` meanwhile and :attr:`reconnects` counts successful reopens.
    ``capture_factory(target, api)`` makes the capture object (default ``cv2.VideoCapture``).
    """

    def __init__(
        self,
        target: int | str,
        kind: str,
        api: int = cv2.CAP_ANY,
        *,
        reconnect: Reconnect | None = None,
        capture_factory: Callable[[int | str, int], Any] | None = None,
    ) -> None:
        super().__init__()
        self.target, self.kind, self.api = target, kind, api
        self.name = f"camera:{target}" if kind == "camera" else str(target)
        self.is_live = kind != "file"
        self.reconnect = reconnect or Reconnect()
        self.reconnects = 0
        self.reconnect_attempts = 0
        self._factory = capture_factory or _default_capture
        self._state = "open"
        self._cap = self._open()
        self._first: np.ndarray | None = None
        if not self.is_live:
            # A file that "opens" may still not decode (a truncated or foreign file): find out now.
            ok, frame = self._cap.read()
            if not ok or frame is None:
                self._cap.release()
                raise SourceError(f"video file {target} opened but no frame decodes from it")
            self._first = frame
        self._announced = None if self.is_live else self.frame_count

    @property
    def state(self) -> str:
        return self._state

    @property
    def fps(self) -> float | None:  # type: ignore[override]
        """A video file's own frame rate (None for live sources, or a file that says none)."""
        if self.is_live:
            return None
        return float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0) or None

    def _open(self) -> Any:
        try:
            cap = self._factory(self.target, self.api)
        except Exception as exc:  # OpenCV raises cv2.error on some backends
            raise SourceError(f"{self._open_failure()}: {exc}") from None
        if not cap.isOpened():
            cap.release()
            raise SourceError(self._open_failure())
        if self.kind in ("camera", "device"):
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a driver-buffered old one
        return cap

    def _open_failure(self) -> str:
        if self.kind in ("camera", "device"):
            return f"cannot open camera {self.target} (is it connected, and free?)"
        if self.kind == "gstreamer":
            if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
                return (
                    "this OpenCV build has no GStreamer support (opencv-python wheels do not; use "
                    f"the distribution's OpenCV, e.g. JetPack's): cannot open pipeline {self.target!r}"
                )
            return f"GStreamer cannot start pipeline {self.target!r}"
        if self.kind == "url":
            return f"cannot open stream {self.target} (unreachable, or a protocol FFmpeg lacks)"
        return (
            f"cannot open video file {self.target}: OpenCV cannot decode it "
            "(not a video, or a codec this OpenCV build lacks)"
        )

    @property
    def frame_count(self) -> int | None:
        if self.is_live:
            return None
        n = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        return n if n > 0 else None

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        if self._first is not None:
            frame, self._first = self._first, None
            yield index, frame, time.time_ns()
            index += 1
        failures = 0
        while not self._stop.is_set():
            try:
                ok, frame = self._cap.read()
            except Exception:  # a backend error on a dying device reads as a failed read
                ok, frame = False, None
            stamp = time.time_ns()
            if ok and frame is not None:
                failures = 0
                yield index, frame, stamp
                index += 1
                continue
            if not self.is_live:
                self._state = "ended"
                self._check_complete(index)
                return  # end of file
            failures += 1
            if failures < self.reconnect.max_read_failures:
                self._stop.wait(self.reconnect.retry_sleep_s)
                continue
            if not self._reconnect():
                self._state = "ended"
                return
            failures = 0

    def _check_complete(self, frames: int) -> None:
        """At the end of a file: a file that gave fewer frames than its header announces ended early
        (truncated or damaged); say so in :attr:`ended_early` and a warning."""
        if self._announced is not None and frames < self._announced:
            self.ended_early = (
                f"video file {self.target} ended early, at frame {frames} of the {self._announced} its "
                "header announces (truncated or damaged file)"
            )
            log.warning("%s", self.ended_early)

    def _reconnect(self) -> bool:
        """Release and reopen with exponential backoff; False when stopped or out of attempts."""
        self._state = "reconnecting"
        self._cap.release()
        delay = self.reconnect.backoff_s
        attempts = 0
        while not self._stop.is_set():
            limit = self.reconnect.max_reconnects
            if limit is not None and attempts >= limit:
                log.error("%s: gave up after %d reconnect attempt(s)", self.name, attempts)
                return False
            if self._stop.wait(delay):
                return False
            attempts += 1
            self.reconnect_attempts += 1
            try:
                self._cap = self._open()
            except SourceError as exc:
                log.warning("%s: reconnect attempt %d failed: %s", self.name, attempts, exc)
                delay = min(delay * 2, self.reconnect.backoff_max_s)
                continue
            self.reconnects += 1
            self._state = "open"
            log.warning("%s: reconnected after %d attempt(s)", self.name, attempts)
            return True
        return False

    def close(self) -> None:
        super().close()
        self._cap.release()


def _default_capture(target: int | str, api: int) -> Any:
    if isinstance(target, str) and _URL.match(target):
        # Bounded waits, so a dead stream is noticed and reconnected instead of hanging a read.
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]
        return cv2.VideoCapture(target, api, params)
    return cv2.VideoCapture(target, api)


class PushSource(FrameSource):
    """The in-process source for robot stacks: another thread calls :meth:`push` with frames
    (BGR/grey uint8 arrays, as a camera driver gives them) and ``run_stream`` certifies them.

    Live by default (``run_stream`` keeps the newest frames and counts drops); ``live=False``
    makes :meth:`push` wait for room instead, so every pushed frame is certified in order.
    :meth:`end` finishes the stream after the frames already pushed.
    """

    def __init__(self, name: str = "push", *, live: bool = True, capacity: int = 64) -> None:
        super().__init__()
        self.name = name
        self.is_live = live
        self._items: deque[Frame | None] = deque()
        self._cond = threading.Condition()
        self._capacity = capacity
        self._index = 0
        self._ended = False

    def push(self, frame: Any, stamp_ns: int | None = None) -> int:
        """Hand one frame over (``stamp_ns``: its capture time, default now); returns its index.

        A live source never blocks here: beyond ``capacity`` waiting frames the oldest is dropped.
        """
        stamp = time.time_ns() if stamp_ns is None else int(stamp_ns)
        with self._cond:
            if self._ended:
                raise RuntimeError(f"push source {self.name!r} has ended")
            while not self.is_live and len(self._items) >= self._capacity and not self._stop.is_set():
                self._cond.wait(0.1)
            if self.is_live and len(self._items) >= self._capacity:
                self._items.popleft()
                self.dropped += 1
            index = self._index
            self._index += 1
            self._items.append((index, frame, stamp))
            self._cond.notify_all()
        return index

    @property
    def buffers_newest(self) -> bool:  # type: ignore[override]
        """Live, and its frames are the pushed ones (a subclass that makes its own frames by
        overriding ``__iter__`` is read by a capture thread, as any source)."""
        return self.is_live and type(self).__iter__ is PushSource.__iter__

    def keep_newest(self, n: int) -> None:
        """A live source keeps at most the newest ``n`` waiting frames (what the stream's queue
        would hold): a frame waits for at most the batch being certified, never a backlog."""
        with self._cond:
            self._capacity = max(1, int(n))
            while len(self._items) > self._capacity and self._items[0] is not None:
                self._items.popleft()
                self.dropped += 1

    def next_batch(self, max_items: int, timeout_s: float | None) -> list[Frame] | None:
        """Up to ``max_items`` waiting frames, oldest first, waiting up to ``timeout_s`` for the
        first (the stream's queue interface, :class:`~rrise.runtime.capture.FrameQueue`): ``[]`` on
        timeout, None once ended (after the frames pushed before :meth:`end`) or stopped."""
        with self._cond:
            if not self._items and not self._stop.is_set():
                self._cond.wait(timeout_s)
            if self._stop.is_set():
                return None
            batch: list[Frame] = []
            while self._items and self._items[0] is not None and len(batch) < max_items:
                batch.append(self._items.popleft())
            if not batch and self._items:  # only the end marker is left
                return None
            self._cond.notify_all()
            return batch

    def end(self) -> None:
        """No more frames: the stream ends after those already pushed."""
        with self._cond:
            self._ended = True
            self._items.append(None)
            self._cond.notify_all()

    def stop(self) -> None:
        super().stop()
        with self._cond:
            self._cond.notify_all()

    def __iter__(self) -> Iterator[Frame]:
        while True:
            with self._cond:
                while not self._items and not self._stop.is_set():
                    self._cond.wait(0.1)
                if self._stop.is_set():
                    return
                item = self._items.popleft()
                self._cond.notify_all()
            if item is None:
                return
            yield item
