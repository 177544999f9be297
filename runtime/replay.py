"""Replay: a recording (``.mcap`` file or ROS 2 bag folder) or a video file as a frame source,
flat out or at its recorded pace (``realtime``), once or over and over (``loop``).

Records of a replayed recording keep the recording's ``stamp_ns``: the source remembers each
frame's recorded stamp (:meth:`ReplaySource.recorded_stamp`) and ``rrise run`` puts it back into
the record, while ``latency_ms`` still measures this run (from the moment the frame was read).
With ``loop``, pass *k*'s stamps are shifted by *k* times the recording's length, so time keeps
moving forward. A video file carries no wall-clock time: its records are stamped when read.

``realtime`` makes the source behave like the camera it was recorded from: frames come at their
recorded intervals and, as for a live camera, a slower model drops the frames it cannot keep up
with (counted in ``drops``; ``--drop-policy block`` certifies every frame at that pace instead).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .recording_reader import is_recording, open_reader
from .sources import IMAGE_EXTENSIONS, Frame, FrameSource, Reconnect, SourceError, VideoCaptureSource

__all__ = ["ReplaySource", "open_recording", "open_replay", "replay_video"]

Pass = Iterator[tuple["np.ndarray | None", int]]  # (frame, media time in ns) of one pass
DEFAULT_FPS = 25.0


class ReplaySource(FrameSource):
    """Frames from ``open_pass()`` (a fresh pass of ``(frame, media_ns)`` per call); see the module
    docstring. ``keeps_stamps``: the media times are capture times (a recording) to put back into
    the records."""

    def __init__(
        self,
        name: str,
        open_pass: Callable[[], Pass],
        *,
        frame_count: int | None,
        fps: float | None,
        realtime: bool = False,
        loop: bool = False,
        keeps_stamps: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.is_live = bool(realtime)
        self.realtime, self.loop, self.keeps_stamps = bool(realtime), bool(loop), keeps_stamps
        self.fps = fps
        self.passes = 0
        self._count = frame_count
        self._open_pass = open_pass
        self._state = "open"
        self._stamps: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return self._state

    @property
    def frame_count(self) -> int | None:
        return None if self.loop else self._count

    def recorded_stamp(self, index: int) -> int | None:
        """The recorded ``stamp_ns`` of frame ``index`` (once; frames before it are forgotten, as
        a stream certifies frames in order), or None for a source without recorded stamps."""
        with self._lock:
            stamp = self._stamps.pop(index, None)
            for old in [i for i in self._stamps if i < index]:
                del self._stamps[old]
        return stamp

    def __iter__(self) -> Iterator[Frame]:
        index, shift = 0, 0
        clock: tuple[float, int] | None = None  # (monotonic start, media start) for realtime
        while not self._stop.is_set():
            first = last = None
            n = 0
            for frame, raw in self._open_pass():
                media = raw + shift
                if clock is None:
                    clock = (time.monotonic(), media)
                if self.realtime and self._stop.wait(max(0.0, _due(clock, media) - time.monotonic())):
                    break
                if self._stop.is_set():
                    break
                if self.keeps_stamps:
                    with self._lock:
                        self._stamps[index] = media
                yield index, frame, time.time_ns()
                index, n = index + 1, n + 1
                first, last = (media if first is None else first), media
            self.passes += 1
            if not self.loop or n == 0 or self._stop.is_set():
                break
            step = (last - first) // (n - 1) if n > 1 else int(1e9 / (self.fps or DEFAULT_FPS))
            shift += last - first + max(step, 1)
        self._state = "ended"


def _due(clock: tuple[float, int], media: int) -> float:
    start, media0 = clock
    return start + (media - media0) / 1e9


def open_recording(
    path: str | Path, *, realtime: bool = False, loop: bool = False, topic: str | None = None
) -> ReplaySource:
    """A recording (``.mcap`` file or ROS 2 bag folder) as a source; SourceError if unreadable."""
    try:
        reader = open_reader(path, topic)
    except ValueError as exc:
        raise SourceError(str(exc)) from None
    if not reader.count:
        raise SourceError(f"recording {path} has no messages on its image topic {reader.topic}")
    return ReplaySource(
        f"{path}#{reader.topic}",
        reader.frames,
        frame_count=reader.count,
        fps=reader.fps,
        realtime=realtime,
        loop=loop,
    )


def replay_video(
    path: str | Path, *, realtime: bool = False, loop: bool = False, reconnect: Reconnect | None = None
) -> ReplaySource:
    """A video file at its own frame rate (``realtime``) and/or in a loop; SourceError if it cannot
    be decoded."""
    with VideoCaptureSource(str(path), "file", reconnect=reconnect) as probe:  # SourceError: unreadable
        count, fps = probe.frame_count, probe.fps
    step_ns = 1e9 / (fps or DEFAULT_FPS)

    def open_pass() -> Pass:
        source = VideoCaptureSource(str(path), "file", reconnect=reconnect)
        try:
            for i, frame, _ in source:
                yield frame, int(i * step_ns)
        finally:
            source.close()

    return ReplaySource(
        str(path), open_pass, frame_count=count, fps=fps, realtime=realtime, loop=loop, keeps_stamps=False
    )


def open_replay(
    spec: str | int | Path, *, realtime: bool = False, loop: bool = False, reconnect: Reconnect | None = None
) -> ReplaySource:
    """``--realtime``/``--loop`` on ``spec``: a recording or a video file; SourceError for anything
    else (a camera or a stream is live already, a folder has no timing)."""
    text = str(spec).strip()
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    path = Path(text)
    if is_recording(path):
        return open_recording(path, realtime=realtime, loop=loop)
    if path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS:
        return replay_video(path, realtime=realtime, loop=loop, reconnect=reconnect)
    flags = " and ".join(f for f, on in (("--realtime", realtime), ("--loop", loop)) if on)
    raise SourceError(
        f"{flags} replay a video file or a recording (.mcap file, ROS 2 bag folder); "
        f"source {text!r} is neither"
    )
