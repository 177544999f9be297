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
A gap between two consecutive recorded stamps longer than :data:`MAX_GAP_S` (5 s: a recording
paused, or a clock that jumped, such as a camera whose clock was reset to 1970) is waited for
:data:`MAX_GAP_S` only, and a stamp that goes backwards is not waited for at all; each such gap is
named in a warning. Five seconds keeps a real pause visible to a monitor watching the replay while a
test never hangs on a broken stamp.

A recording that is cut short or damaged (see :mod:`rrise.runtime.recording_reader`) replays the
frames that can be read; the source's ``ended_early`` (the run summary's ``source_ended_early``)
says what happened and how many frames were read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .recording_reader import is_recording, open_reader
from .sources import IMAGE_EXTENSIONS, Frame, FrameSource, Reconnect, SourceError, VideoCaptureSource

__all__ = ["MAX_GAP_S", "ReplaySource", "open_recording", "open_replay", "replay_video"]

log = logging.getLogger("rrise.runtime")

Pass = Iterator[tuple["np.ndarray | None", int]]  # (frame, media time in ns) of one pass
DEFAULT_FPS = 25.0
MAX_GAP_S = 5.0  # the longest a realtime replay waits between two frames (see the module docstring)
MAX_GAP_WARNINGS = 3  # gaps named in a warning per source; the rest are capped without one


class _Pace:
    """When each frame of a realtime replay is due (``time.monotonic`` seconds): its recorded
    interval after the latest frame before it, an interval over :data:`MAX_GAP_S` waited as
    :data:`MAX_GAP_S` and one going backwards as 0, each named in a warning."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.capped = 0
        self._last: tuple[float, int] | None = None  # (due, media ns) of the previous frame

    def due(self, media: int) -> float:
        """The moment the frame at media time ``media`` (ns) is due. Intervals count from the
        latest stamp so far: a frame a little out of order comes at once, while a jump back of more
        than :data:`MAX_GAP_S` (a clock that was reset) paces the frames after it from there."""
        if self._last is None:
            self._last = (time.monotonic(), media)
            return self._last[0]
        due, latest = self._last
        gap_s = (media - latest) / 1e9
        if gap_s < 0:
            self._warn(latest, media, gap_s, 0.0)
            if gap_s < -MAX_GAP_S:
                self._last = (due, media)
            return due
        wait_s = min(gap_s, MAX_GAP_S)
        if wait_s != gap_s:
            self._warn(latest, media, gap_s, wait_s)
        self._last = (due + wait_s, media)
        return due + wait_s

    def _warn(self, before: int, media: int, gap_s: float, wait_s: float) -> None:
        self.capped += 1
        if self.capped > MAX_GAP_WARNINGS:
            return
        jump = f"jump ahead by {_duration(gap_s)}" if gap_s > 0 else f"go back by {_duration(-gap_s)}"
        more = " (further ones are not logged)" if self.capped == MAX_GAP_WARNINGS else ""
        log.warning(
            "replay of %s: the recorded stamps %s (from %d to %d); waiting %g s instead%s",
            self.name,
            jump,
            before,
            media,
            wait_s,
            more,
        )


def _duration(seconds: float) -> str:
    """``seconds`` in the unit a person reads best (s, h, days, years)."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.3g} s"


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
        pace = _Pace(self.name)
        while not self._stop.is_set():
            low = high = None
            n = 0
            for frame, raw in self._open_pass():
                media = raw + shift
                if self.realtime and self._stop.wait(max(0.0, pace.due(media) - time.monotonic())):
                    break
                if self._stop.is_set():
                    break
                if self.keeps_stamps:
                    with self._lock:
                        self._stamps[index] = media
                yield index, frame, time.time_ns()
                index, n = index + 1, n + 1
                low = media if low is None else min(low, media)
                high = media if high is None else max(high, media)
            self.passes += 1
            if not self.loop or n == 0 or self._stop.is_set():
                break
            step = (high - low) // (n - 1) if n > 1 else int(1e9 / (self.fps or DEFAULT_FPS))
            shift += high - low + max(step, 1)  # the next pass starts after this one's last stamp
        self._state = "ended"


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

    def open_pass() -> Pass:
        yield from reader.frames()
        source.ended_early = source.ended_early or reader.ended_early  # damage found by this pass

    source = ReplaySource(
        f"{path}#{reader.topic}",
        open_pass,
        frame_count=reader.count,
        fps=reader.fps,
        realtime=realtime,
        loop=loop,
    )
    source.ended_early = reader.ended_early  # a salvaged recording: known at open
    return source


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
