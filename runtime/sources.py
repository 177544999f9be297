"""Frame sources: camera index, video file, RTSP/HTTP URL, GStreamer pipeline, image folder.

``open_source(spec)`` gives a :class:`FrameSource`: iterate it for ``(frame_index, frame, stamp_ns)``
with ``stamp_ns`` the capture time (Unix ns). A frame is ``None`` when one image of a folder cannot
be read, so the caller emits an error record for it and goes on. Video files end cleanly at their
last frame; live sources retry a failed read, reopen a few times, then end.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "FrameSource",
    "ImageFolderSource",
    "SourceError",
    "VideoCaptureSource",
    "open_source",
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
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Frame = tuple[int, "np.ndarray | None", int]


class SourceError(RuntimeError):
    """A source that cannot be opened; the message names it and says why."""


class FrameSource:
    """Base class: an iterable of ``(frame_index, frame or None, stamp_ns)``."""

    name: str = "source"
    is_live: bool = False

    def __init__(self) -> None:
        self._stop = threading.Event()

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    @property
    def frame_count(self) -> int | None:
        """Frames a finite source will give, when known."""
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

    @property
    def frame_count(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        for i, f in enumerate(self.files):
            if self._stop.is_set():
                return
            # ANYCOLOR: grey files stay H×W, colour files come as BGR, always 8-bit.
            frame = cv2.imread(str(f), cv2.IMREAD_ANYCOLOR)
            yield i, frame, time.time_ns()


class VideoCaptureSource(FrameSource):
    """Anything ``cv2.VideoCapture`` opens: camera index, video file, URL or GStreamer pipeline."""

    def __init__(
        self,
        target: int | str,
        kind: str,
        api: int = cv2.CAP_ANY,
        *,
        max_read_failures: int = 20,
        reconnects: int = 3,
        retry_sleep_s: float = 0.05,
    ) -> None:
        super().__init__()
        self.target, self.kind, self.api = target, kind, api
        self.name = f"camera:{target}" if kind == "camera" else str(target)
        self.is_live = kind != "file"
        self.max_read_failures = max_read_failures
        self.reconnects = reconnects
        self.retry_sleep_s = retry_sleep_s
        self._cap = self._open()
        self._first: np.ndarray | None = None
        if not self.is_live:
            # A file that "opens" may still not decode (a truncated or foreign file): find out now.
            ok, frame = self._cap.read()
            if not ok or frame is None:
                self._cap.release()
                raise SourceError(f"video file {target} opened but no frame decodes from it")
            self._first = frame

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.target, self.api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(self._open_failure())
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
        failures, reopened = 0, 0
        while not self._stop.is_set():
            ok, frame = self._cap.read()
            stamp = time.time_ns()
            if ok and frame is not None:
                failures = 0
                yield index, frame, stamp
                index += 1
                continue
            if not self.is_live:
                return  # end of file
            failures += 1
            if failures < self.max_read_failures:
                self._stop.wait(self.retry_sleep_s)
                continue
            if reopened >= self.reconnects:
                return
            reopened += 1
            failures = 0
            self._cap.release()
            try:
                self._cap = self._open()
            except SourceError:
                self._stop.wait(self.retry_sleep_s * self.max_read_failures)

    def close(self) -> None:
        super().close()
        self._cap.release()


def open_source(spec: str | int | Path) -> FrameSource:
    """Open ``spec``: ``"0"`` camera index, ``"a ! b"`` GStreamer pipeline, ``rtsp://``/``http(s)://``
    URL, image folder, image file, or video file. Raises :class:`SourceError` if it cannot."""
    if isinstance(spec, (int, np.integer)):
        return VideoCaptureSource(int(spec), "camera")
    text = str(spec).strip()
    if not text:
        raise SourceError("empty source: give a camera index, video file, URL, pipeline or folder")
    if text.isdigit():
        return VideoCaptureSource(int(text), "camera")
    if "!" in text and not Path(text).exists():
        return VideoCaptureSource(text, "gstreamer", cv2.CAP_GSTREAMER)
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    elif _URL.match(text):
        return VideoCaptureSource(text, "url", cv2.CAP_FFMPEG)
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path)
    if not path.exists():
        raise SourceError(
            f"source {text!r} does not exist (expected a camera index, video file, image folder, "
            "rtsp:// or http(s):// URL, or a GStreamer pipeline with '!')"
        )
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageFolderSource(path, files=[path])
    # Video files, and device nodes such as /dev/video0 (live).
    return VideoCaptureSource(text, "file" if path.is_file() else "device")
