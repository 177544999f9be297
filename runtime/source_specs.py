"""What ``--source`` names, opened as a :class:`~rrise.runtime.sources.FrameSource`: a camera index,
a GStreamer pipeline, a URL, an image folder or file, a video file or device, or a recording; with
``realtime``/``loop``, a replay (:mod:`rrise.runtime.replay`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .recording_reader import is_recording
from .replay import open_recording, open_replay
from .sources import (
    IMAGE_EXTENSIONS,
    FrameSource,
    ImageFolderSource,
    Reconnect,
    SourceError,
    VideoCaptureSource,
    is_url,
)

__all__ = ["open_source"]


def open_source(
    spec: str | int | Path, *, realtime: bool = False, loop: bool = False, reconnect: Reconnect | None = None
) -> FrameSource:
    """Open ``spec``: ``"0"`` camera index, ``"a ! b"`` GStreamer pipeline, ``rtsp://``/``http(s)://``
    URL, image folder, image file, video file, or recording (``.mcap`` file, ROS 2 bag folder).

    Parameters
    ----------
    spec:
        What ``rrise run --source`` takes.
    realtime, loop:
        Replay a video file or a recording at its recorded pace and/or over and over.
    reconnect:
        How a live video source reconnects (:class:`~rrise.runtime.sources.Reconnect`).

    Returns
    -------
    FrameSource
        Iterate it for ``(frame_index, frame, stamp_ns)``; close it when done.

    Raises
    ------
    SourceError
        ``spec`` cannot be opened (the message names it and says why).

    >>> try:
    ...     open_source("no/such/folder")
    ... except SourceError as exc:
    ...     print(str(exc)[:40])
    source 'no/such/folder' does not exist (
    """
    if realtime or loop:
        return open_replay(spec, realtime=realtime, loop=loop, reconnect=reconnect)
    if isinstance(spec, (int, np.integer)):
        return VideoCaptureSource(int(spec), "camera", reconnect=reconnect)
    text = str(spec).strip()
    if not text:
        raise SourceError("empty source: give a camera index, video file, URL, pipeline or folder")
    if text.isdigit():
        return VideoCaptureSource(int(text), "camera", reconnect=reconnect)
    if "!" in text and not Path(text).exists():
        return VideoCaptureSource(text, "gstreamer", cv2.CAP_GSTREAMER, reconnect=reconnect)
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    elif is_url(text):
        return VideoCaptureSource(text, "url", cv2.CAP_FFMPEG, reconnect=reconnect)
    return _open_path(text, reconnect)


def _open_path(text: str, reconnect: Reconnect | None) -> FrameSource:
    path = Path(text)
    if is_recording(path):
        return open_recording(path)
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
    return VideoCaptureSource(text, "file" if path.is_file() else "device", reconnect=reconnect)
