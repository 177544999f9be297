"""What ``rrise run`` writes besides records, each needing the frame itself: an annotated video
(``--save-video``), a recording (``--record``, :mod:`rrise.runtime.recording`) and the Foxglove live
view (``--foxglove``, :mod:`rrise.runtime.live_view`).

Frames reach them through :class:`FrameKeeper`, a view of the Runtime that keeps the frames of the
batch it just certified until their records come out (so at most one batch is held, whatever the
source's pace). :class:`FrameSink` is the one sink that feeds them all: it runs first among a run's
sinks, puts a replayed recording's ``stamp_ns`` back into each record, encodes each frame to JPEG
once, and hands frame and record to every output.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .imagecodec import encode_jpeg

if TYPE_CHECKING:
    from .sources import FrameSource
    from .stream import Stream

__all__ = ["FrameKeeper", "FrameOutputs", "FrameSink", "open_stream"]

log = logging.getLogger("rrise.runtime")

DEFAULT_VIDEO_FPS = 25.0  # an annotated video's frame rate when the source has none (a camera)


class FrameKeeper:
    """The Runtime, as a :class:`~rrise.runtime.stream.Stream` uses it, keeping the frames of the
    last certified batch by frame index for :meth:`take`. Everything else is the Runtime's."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self._frames: dict[int, np.ndarray | None] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    def certify_batch(self, frames: Sequence[np.ndarray | None], **options: Any) -> list[dict[str, Any]]:
        records = self._runtime.certify_batch(frames, **options)
        self._frames = {int(r["frame"]): f for r, f in zip(records, frames)}
        return records

    def take(self, index: int) -> np.ndarray | None:
        """The frame of the record with ``frame == index`` (None when it was unreadable)."""
        return self._frames.pop(int(index), None)


@dataclass
class FrameOutputs:
    """The frame outputs a run asks for. ``record``: a path (``record_format`` ``foxglove``: a
    ``.mcap`` file; ``ros2``: a bag folder); ``save_video``: a video path; ``foxglove``: the live
    view's ``HOST:PORT``; ``video_fps``: the video's frame rate (default: the source's, else
    :data:`DEFAULT_VIDEO_FPS`)."""

    record: str | None = None
    record_format: str = "foxglove"
    save_video: str | None = None
    foxglove: str | None = None
    video_fps: float | None = None

    @property
    def any(self) -> bool:
        return bool(self.record or self.save_video or self.foxglove)

    def open(self, keeper: FrameKeeper | None, source: Any, max_radius: float) -> FrameSink:
        """The sink for these outputs, on frames from ``keeper`` and stamps from ``source``; what
        opened before a failure is closed again."""
        from .annotate import VideoWriterSink
        from .live_view import FoxgloveLiveView
        from .recording import open_recorder

        sink = FrameSink(keeper, source)
        try:
            if self.record:
                sink.writers.append(open_recorder(self.record, self.record_format))
            if self.foxglove:
                sink.live = FoxgloveLiveView(self.foxglove)
                sink.writers.append(sink.live)
            if self.save_video:
                fps = self.video_fps or source_fps(source) or DEFAULT_VIDEO_FPS
                sink.video = VideoWriterSink(self.save_video, max_radius, fps)
        except BaseException:
            sink.close()
            raise
        return sink


def source_fps(source: Any) -> float | None:
    """The frame rate a source plays at, where it knows one: a replay's, or a video file's own."""
    fps = getattr(source, "fps", None)
    if fps is None and getattr(source, "kind", None) == "file":
        capture = cv2.VideoCapture(str(source.target))
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0) or None
        capture.release()
    return fps


class FrameSink:
    """Feeds every frame output (see the module docstring); a sink of :class:`~rrise.runtime.sinks.Sinks`."""

    def __init__(self, keeper: FrameKeeper | None, source: Any) -> None:
        self.keeper = keeper
        self.restamp = (
            getattr(source, "recorded_stamp", None) if getattr(source, "keeps_stamps", False) else None
        )
        self.writers: list[Any] = []  # recorders and the live view: write(record, jpeg, width)
        self.video: Any = None
        self.live: Any = None

    def send(self, record: dict[str, Any]) -> None:
        if self.restamp is not None:
            stamp = self.restamp(record["frame"])
            if stamp is not None:
                record["stamp_ns"] = stamp
        if self.keeper is None:
            return
        frame = self.keeper.take(record["frame"])
        if self.writers:
            jpeg = None if frame is None else encode_jpeg(frame)
            width = 0 if frame is None else int(frame.shape[1])
            for writer in self.writers:
                writer.write(record, jpeg, width)
        if self.video is not None:
            self.video.write(record, frame)

    def send_status(self, status: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.write_status(status)

    def close(self) -> None:
        """Close every output; one that fails is logged and does not keep the others open."""
        outputs = [*self.writers, self.video]
        self.writers, self.video = [], None
        for output in outputs:
            if output is None:
                continue
            try:
                output.close()
            except Exception:
                log.warning("closing %s failed", type(output).__name__, exc_info=True)


def open_stream(
    opened: contextlib.ExitStack,
    runtime: Any,
    source: str | int | Path | FrameSource,
    outputs: FrameOutputs | None = None,
    *,
    realtime: bool = False,
    loop: bool = False,
    **stream_options: Any,
) -> tuple[Stream, FrameSink | None]:
    """The Stream of a run (entered in ``opened``) and the FrameSink its frame outputs and a
    replay's stamps need (None when neither is wanted; closed by ``opened`` too).

    ``realtime``/``loop`` open ``source`` as a replay (:func:`~rrise.runtime.replay.open_replay`,
    which refuses anything but a video file or a recording); otherwise the Stream opens it, with
    its startup retries."""
    from .sources import FrameSource, open_source
    from .stream import Stream

    if realtime or loop:
        if isinstance(source, FrameSource):
            raise ValueError("realtime/loop apply to a source to open (a path), not to an opened FrameSource")
        source = open_source(source, realtime=realtime, loop=loop)
        opened.callback(source.close)  # the Stream closes it too; this covers a Stream that fails
    outputs = outputs or FrameOutputs()
    keeper = FrameKeeper(runtime) if outputs.any else None
    stream = opened.enter_context(Stream(keeper or runtime, source, **stream_options))
    if not outputs.any and not getattr(stream.source, "keeps_stamps", False):
        return stream, None
    sink = outputs.open(keeper, stream.source, runtime.calibration.max_radius())
    opened.callback(sink.close)
    return stream, sink
