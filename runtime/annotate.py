"""``rrise run --save-video``: each frame with what was certified drawn on it.

Under the frame (scaled up by a whole factor to at least :data:`MIN_HEIGHT` pixels, so a 28×28
frame stays readable) a panel shows the label and radius, or ABSTAIN, or the frame's error; a bar
shows the radius against the largest radius the bundle can ever certify; a shift alarm is written
across the top of the frame. A frame that could not be read is drawn as a grey field with its error.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rrise.fileio import output_conflict, umask

from .imagecodec import to_uint8

__all__ = ["MIN_HEIGHT", "VIDEO_CODECS", "VideoWriterSink", "annotate"]

MIN_HEIGHT = 360
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
_GREEN, _ORANGE, _RED = (80, 200, 60), (0, 165, 255), (40, 40, 230)  # BGR
_WHITE, _GREY = (255, 255, 255), (90, 90, 90)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _scaled(frame: np.ndarray | None, size: tuple[int, int] | None) -> np.ndarray:
    """BGR uint8, scaled up by a whole factor to at least MIN_HEIGHT rows (or to ``size``)."""
    if frame is None:
        w, h = size or (MIN_HEIGHT, MIN_HEIGHT)
        return np.full((h, w, 3), 64, np.uint8)
    image = to_uint8(frame)
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if size is None:
        k = max(1, math.ceil(MIN_HEIGHT / image.shape[0]))
        size = (image.shape[1] * k, image.shape[0] * k)
    if (image.shape[1], image.shape[0]) != size:
        image = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(image)


def _scale(width: int) -> float:
    return min(max(0.5, width / 400), 2.0)


def _panel_height(width: int) -> int:
    return int(70 * _scale(width)) + 10


def _text(image: np.ndarray, text: str, org: tuple[int, int], scale: float, colour: tuple) -> None:
    thick = max(1, round(scale * 2))
    cv2.putText(image, text, org, _FONT, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(image, text, org, _FONT, scale, colour, thick, cv2.LINE_AA)


def _headline(record: dict[str, Any]) -> tuple[str, tuple]:
    if record.get("error"):
        return f"ERROR: {record['error']}", _RED
    if record.get("abstain"):
        return "ABSTAIN", _ORANGE
    return f"{record.get('label') or record.get('pred')}   r = {float(record['radius']):.3f}", _GREEN


def annotate(
    frame: np.ndarray | None,
    record: dict[str, Any],
    max_radius: float,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The frame (scaled; ``size`` = (width, height) of the picture part) over a panel with the
    record's label, radius, a bar of radius / ``max_radius``, abstain, error and alarm."""
    image = _scaled(frame, size)
    h, w = image.shape[:2]
    scale = _scale(w)
    panel = np.full((_panel_height(w), w, 3), 24, np.uint8)
    headline, colour = _headline(record)
    _text(panel, headline[:80], (8, int(26 * scale) + 4), 0.7 * scale, colour)
    bar_y, bar_h = int(40 * scale) + 6, max(6, int(14 * scale))
    bar_w = w - 16 - int(150 * scale)
    cv2.rectangle(panel, (8, bar_y), (8 + bar_w, bar_y + bar_h), _GREY, 1)
    fill = 0.0 if max_radius <= 0 else min(float(record.get("radius") or 0.0) / max_radius, 1.0)
    if fill > 0:
        cv2.rectangle(panel, (8, bar_y), (8 + int(bar_w * fill), bar_y + bar_h), colour, -1)
    _text(panel, f"max {max_radius:.3f}", (16 + bar_w, bar_y + bar_h), 0.5 * scale, _WHITE)
    if record.get("alarm"):
        _text(image, f"ALARM: {record['alarm']}", (8, int(24 * scale) + 4), 0.7 * scale, _RED)
    return np.vstack([image, panel])


class VideoWriterSink:
    """Writes annotated frames to a video file (codec by suffix: :data:`VIDEO_CODECS`) at ``fps``.
    The picture size is fixed by the first frame; later frames of another size are resized to it.

    Nothing is overwritten (:func:`rrise.fileio.output_conflict`: a path that exists is refused
    here). The frames go to a hidden temporary file beside ``path`` (``.tmp.NAME.*SUFFIX``), which
    :meth:`close` renames to ``path`` once the video is complete, so a crash never leaves a
    half-written file under the final name. OpenCV's writer does not report write errors, so
    :meth:`close` reads the finished file's frame count back and raises (ValueError naming the
    path) when it holds fewer frames than were written (a full disk).
    """

    def __init__(self, path: str | os.PathLike, max_radius: float, fps: float = 25.0) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_CODECS:
            raise ValueError(f"--save-video {self.path}: use one of {', '.join(VIDEO_CODECS)}")
        conflict = output_conflict("--save-video", self.path)
        if conflict is not None:
            raise ValueError(conflict)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[suffix])
        self.max_radius = float(max_radius)
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._writer: Any = None
        self._tmp: Path | None = None

    def write(self, record: dict[str, Any], frame: np.ndarray | None) -> None:
        picture = annotate(frame, record, self.max_radius, self._size)
        if self._writer is None:
            h, w = picture.shape[:2]
            self._size = (w, h - _panel_height(w))
            fd, name = tempfile.mkstemp(
                prefix=f".tmp.{self.path.name}.", suffix=self.path.suffix, dir=self.path.parent
            )
            os.close(fd)
            self._tmp = Path(name)
            self._writer = cv2.VideoWriter(name, self.fourcc, self.fps, (w, h))
            if not self._writer.isOpened():
                self._writer = None
                self._tmp.unlink(missing_ok=True)
                raise ValueError(f"--save-video {self.path}: OpenCV cannot write this format here")
        self._writer.write(picture)
        self.frames += 1

    def close(self) -> None:
        """Finish the video and rename it to :attr:`path`; refused (ValueError, the frames kept in the
        temporary file it names) when something has appeared at :attr:`path` meanwhile."""
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        tmp, self._tmp = self._tmp, None
        assert tmp is not None
        held = _frames_in(tmp)  # OpenCV's writer does not report a full disk: read the file back
        _publish(tmp, self.path)
        if held < self.frames:
            raise ValueError(
                f"--save-video {self.path} holds {held} of the run's {self.frames} frames: the disk is "
                "full or a write failed"
            )


def _frames_in(path: Path) -> int:
    """How many frames the video file at ``path`` holds, as its container says (0 when unreadable)."""
    capture = cv2.VideoCapture(str(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path`` without ever replacing a file there (a hard link
    where the filesystem has them, which fails on an existing name; else a checked rename)."""
    os.chmod(tmp, 0o666 & ~umask())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ValueError(f"--save-video {path} appeared during the run: the video is kept in {tmp}") from None
    except OSError:  # no hard links here (e.g. FAT): the check and the rename are not one step
        if path.exists():
            raise ValueError(
                f"--save-video {path} appeared during the run: the video is kept in {tmp}"
            ) from None
        os.replace(tmp, path)
        return
    tmp.unlink()
