"""What ``rrise run`` writes besides records, each needing the frame itself: an annotated video
(``--save-video``), a recording (``--record``, :mod:`rrise.runtime.recording`) and the Foxglove live
view (``--foxglove``, :mod:`rrise.runtime.live_view`).

Frames reach them through :class:`FrameKeeper`, a view of the Runtime that keeps the frames of the
batch it just certified until their records come out (so at most one batch is held, whatever the
source's pace). :class:`FrameSink` is the one sink that feeds them all: it encodes each frame to
JPEG once and hands frame and record to every output. An output that cannot write (a full disk)
or cannot finish its file raises :class:`~rrise.runtime.sinks.SinkError` naming it (``--record
run.mcap: No space left on device``): the run stops and exits 1 with that message.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rrise.fileio import output_conflict, reads_source
from rrise.records import Verdict

from .annotate import VideoWriterSink
from .imagecodec import encode_jpeg
from .live_view import FoxgloveLiveView
from .options import OutputOptions, RunOptions
from .recording import open_recorder
from .sinks import SinkError, write_error
from .sources import FrameSource
from .stream import Certifier, Stream

__all__ = ["FrameKeeper", "FrameSink", "open_frame_sink", "open_stream", "source_paths"]

log = logging.getLogger("rrise.runtime")

DEFAULT_VIDEO_FPS = 25.0  # an annotated video's frame rate when the source has none (a camera)


class FrameKeeper:
    """The Runtime, as a :class:`~rrise.runtime.stream.Stream` uses it, keeping the frames of the
    last certified batch by frame index for :meth:`take`. Everything else is the Runtime's."""

    def __init__(self, runtime: Certifier) -> None:
        self._runtime = runtime
        self._frames: dict[int, np.ndarray | None] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    def certify_frames(
        self, frames: Sequence[np.ndarray | None], *, frame_indices: Sequence[int] | None = None
    ) -> list[Verdict]:
        verdicts = self._runtime.certify_frames(frames, frame_indices=frame_indices)
        self._frames = {int(v.frame): f for v, f in zip(verdicts, frames)}
        return verdicts

    def take(self, index: int) -> np.ndarray | None:
        """The frame of the record with ``frame == index`` (None when it was unreadable)."""
        return self._frames.pop(int(index), None)


def open_frame_sink(
    outputs: OutputOptions,
    keeper: FrameKeeper,
    source: FrameSource,
    max_radius: float,
    *,
    adaptive: bool = False,
) -> FrameSink:
    """The sink for ``outputs``' frame outputs (recording, live view, annotated video at the
    source's frame rate, else :data:`DEFAULT_VIDEO_FPS`), on frames from ``keeper``; what opened
    before a failure is closed again. ``adaptive``: the records carry the adaptive keys (the
    recording and live view declare them)."""
    for option, path in (("--record", outputs.record), ("--save-video", outputs.save_video)):
        conflict = None if not path else output_conflict(option, path, source_paths(source))
        if conflict is not None:  # before anything is opened, so a refused run writes nothing
            raise ValueError(conflict)
    sink = FrameSink(keeper)
    try:
        if outputs.record:
            sink.writers.append(open_recorder(outputs.record, outputs.record_format.value, adaptive=adaptive))
        if outputs.foxglove:
            sink.live = FoxgloveLiveView(outputs.foxglove, adaptive=adaptive)
            sink.writers.append(sink.live)
        if outputs.save_video:
            sink.video = VideoWriterSink(str(outputs.save_video), max_radius, source.fps or DEFAULT_VIDEO_FPS)
    except BaseException:
        sink.close()
        raise
    return sink


def _jsonl_not_over_source(jsonl: str | None, source: FrameSource) -> None:
    """Refuse ``--jsonl`` naming the file or folder the run reads (opening it would truncate it)."""
    if jsonl not in (None, "-") and reads_source(jsonl, source_paths(source)):
        raise ValueError(output_conflict("--jsonl", jsonl, source_paths(source)))


def source_paths(source: FrameSource) -> tuple[str, ...]:
    """The files or folders ``source`` reads (a video file, an image folder, a recording): what no
    output of the run may be written over."""
    found = []
    for attr in ("path", "target", "spec", "name"):
        value = getattr(source, attr, None)
        if isinstance(value, (str, Path)) and str(value) and Path(value).exists():
            found.append(str(value))
    return tuple(found)


class FrameSink:
    """Feeds every frame output (see the module docstring); a sink of :class:`~rrise.runtime.sinks.Sinks`."""

    def __init__(self, keeper: FrameKeeper) -> None:
        self.keeper = keeper
        self.writers: list[Any] = []  # recorders and the live view: write(record, jpeg, width)
        self.video: Any = None
        self.live: Any = None

    def send(self, record: dict[str, Any]) -> None:
        """``record`` and its frame to every output; a write error raises SinkError naming it."""
        frame = self.keeper.take(record["frame"])
        if self.writers:
            jpeg = None if frame is None else encode_jpeg(frame)
            width = 0 if frame is None else int(frame.shape[1])
            for writer in self.writers:
                with _named(writer):
                    writer.write(record, jpeg, width)
        if self.video is not None:
            with _named(self.video):
                self.video.write(record, frame)

    def send_status(self, status: dict[str, Any]) -> None:
        for writer in self.writers:
            with _named(writer):
                writer.write_status(status)

    def close(self) -> None:
        """Close every output; one that fails does not keep the others open. Raises SinkError with
        every failure's message (each naming its output) once all are closed."""
        outputs = [*self.writers, self.video]
        self.writers, self.video = [], None
        failed = []
        for output in outputs:
            if output is None:
                continue
            try:
                with _named(output):
                    output.close()
            except SinkError as exc:
                failed.append(str(exc))
            except Exception as exc:  # a writer's own failure to finish: said, never lost silently
                failed.append(f"{output_name(output)}: closing failed: {exc}{_free_space(output)}")
        if failed:
            raise SinkError("; ".join(failed))


def output_name(output: Any) -> str:
    """How messages name a frame output: the option and path that asked for it."""
    path = getattr(output, "path", None)
    if isinstance(output, VideoWriterSink):
        return f"--save-video {path}"
    if path is not None:
        return f"--record {path}"
    return "--foxglove" if isinstance(output, FoxgloveLiveView) else type(output).__name__


def _free_space(output: Any) -> str:
    """`` (N KiB free on its disk)`` when ``output``'s disk is nearly full (a writer that reports
    only "a write failed" then says why), else ``""``."""
    path = getattr(output, "path", None)
    try:
        free = shutil.disk_usage(Path(path).parent).free if path is not None else None
    except OSError:
        return ""
    return f" ({free // 1024} KiB free on its disk)" if free is not None and free < 64 * 2**20 else ""


@contextlib.contextmanager
def _named(output: Any) -> Iterator[None]:
    """An OSError (a full disk, a removed drive) or ValueError of ``output`` as a SinkError naming
    it."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise SinkError(write_error(output_name(output), exc)) from None
    except ValueError as exc:
        text = str(exc)
        raise SinkError(text if text.startswith("--") else f"{output_name(output)}: {text}") from None


def open_stream(
    opened: contextlib.ExitStack,
    runtime: Certifier,
    source: str | int | Path | FrameSource,
    options: RunOptions,
) -> tuple[Stream, FrameSink | None]:
    """The Stream of a run (entered in ``opened``) and the FrameSink its frame outputs need (None
    when none is asked for; closed by ``opened`` too)."""
    if not options.outputs.frame_outputs:
        stream = opened.enter_context(Stream(runtime, source, options.stream))
        _jsonl_not_over_source(options.outputs.jsonl, stream.source)
        return stream, None
    keeper = FrameKeeper(runtime)
    stream = opened.enter_context(Stream(keeper, source, options.stream))
    _jsonl_not_over_source(options.outputs.jsonl, stream.source)
    max_radius = runtime.calibration.max_radius()
    sink = open_frame_sink(options.outputs, keeper, stream.source, max_radius, adaptive=options.mc.enabled)
    opened.callback(sink.close)
    return stream, sink
