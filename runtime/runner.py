"""``run_stream``: what ``rrise run`` calls. A Runtime, a :class:`~rrise.runtime.stream.Stream` over
the source and the sinks, put together; :func:`drain` sends the stream's records to the sinks.

SIGINT/SIGTERM (in the main thread) stop the stream after the current batch, with every sink
flushed and closed, and the summary is returned as usual; a closed output pipe ends it quietly.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rrise.bundle import Bundle
from rrise.progress import progress_bar
from rrise.records import DEFAULT_TOPIC

from .frame_outputs import FrameOutputs, open_stream
from .runtime import Runtime
from .sinks import NO_OUTPUT_HINT, SinkError, Sinks, open_sinks
from .sources import FrameSource
from .status_text import live_note
from .stream import Stream

__all__ = ["drain", "run_stream"]

log = logging.getLogger("rrise.runtime")


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``stop`` for the duration (main thread only; elsewhere a no-op).

    A second signal raises KeyboardInterrupt, for a stream stuck in a blocking call."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if received:  # a second signal: the user means it, stop now
            raise KeyboardInterrupt
        received.append(signum)
        log.info("received %s: stopping after this batch", signal.Signals(signum).name)
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def drain(
    stream: Stream, sinks: Sinks, *, show_progress: bool = False, no_output: bool = False
) -> dict[str, Any]:
    """Send every record of ``stream`` to ``sinks`` until the stream ends; return its summary.

    SIGINT/SIGTERM stop the stream after the current batch; a closed output pipe stops it quietly.
    A stream with no sink at all is warned about at the start and in the summary's ``warnings``
    (unless ``no_output``), as is a publisher that no subscriber heard; each warning is logged.
    """
    stats = stream.stats
    stats.count_publish_failures(lambda: sinks.publish_failed)
    stats.report_delivery(sinks.delivery)
    if not sinks.sinks and not no_output:
        log.warning("no output: every record will be certified and discarded (%s)", NO_OUTPUT_HINT)
    with (
        _stop_on_signals(stream.stop),
        progress_bar(stream.total, "certifying", unit="frame", enabled=show_progress) as bar,
    ):
        for record in stream:
            try:
                sinks.send(record)
            except BrokenPipeError:
                log.info("output pipe closed: stopping")
                stream.stop(interrupted=False)
            if show_progress and "kind" not in record:
                bar.advance(1)
                if stats.frames % 5 == 0:
                    bar.note(live_note(stats.frames, stats.abstained, stats.errors, stream.drops, record))
    summary = stream.summary()
    summary["warnings"] = [] if no_output and not sinks.sinks else sinks.warnings(stats.frames)
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    return summary


def run_stream(
    bundle: Bundle | str | Path,
    source: str | int | Path | FrameSource,
    *,
    publish: str | None = None,
    jsonl: str | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    on_status: Callable[[dict[str, Any]], Any] | None = None,
    topic: bytes | str = DEFAULT_TOPIC,
    hwm: int = 1000,
    wait_subscribers: int = 0,
    wait_timeout_s: float = 5.0,
    curve_secret: str | Path | None = None,
    no_output: bool = False,
    backend: str = "auto",
    precision: str | None = None,
    monitor: bool = True,
    monitor_options: dict[str, Any] | None = None,
    expect_id: str | None = None,
    trust: Any = None,
    runtime: Runtime | None = None,
    show_progress: bool = False,
    outputs: FrameOutputs | None = None,
    realtime: bool = False,
    loop: bool = False,
    **stream_options: Any,
) -> dict[str, Any]:
    """Certify the frames of ``source`` and send each record to every sink; return the summary.

    Sinks: :func:`~rrise.runtime.sinks.open_sinks`'s options (``curve_secret``: encrypt the
    published stream); ``no_output=True`` says a run without any sink is meant (no warning). The
    Runtime: ``backend``, ``precision``, ``monitor`` (False: no shift alarm, no out-of-distribution flag),
    ``monitor_options`` (:func:`rrise.monitor.load_monitors`), or a loaded ``runtime``
    to reuse (not closed here); ``expect_id``/``trust`` refuse any other, or an unsigned, bundle.
    ``stream_options`` (``batch``, ``drop_policy``, ``queue_size``,
    ``max_frames``, ``status_interval_s``, ``threaded``, ``retry``) go to
    :class:`~rrise.runtime.stream.Stream`. ``outputs``: the annotated video, recording and live
    view (:class:`~rrise.runtime.frame_outputs.FrameOutputs`); ``realtime``/``loop``: replay a video
    file or a recording at its recorded pace and/or over and over (:mod:`rrise.runtime.replay`).

    Summary keys: ``frames``, ``errors``, ``abstained``, ``certified``, ``fps``, ``latency_p50_ms``,
    ``latency_p99_ms``, ``drops`` (frames captured but never certified), ``publish_failed``
    (records the publisher could not queue at all), ``reconnects``, ``alarms`` (records with an
    alarm), ``status_records``, ``elapsed_s``, ``interrupted``, ``source_error``, ``drop_policy``,
    ``threaded``, ``batch``, ``backend``, ``variant``, ``source``, ``bundle``; the publishers'
    ``subscribers``, ``subscribers_peak``, ``published``, ``published_unheard``,
    ``published_offered``, ``publishers`` (see :meth:`~rrise.runtime.sinks.Sinks.delivery`); and
    ``warnings``: what went nowhere (no sink; no subscriber connected), also logged.
    """
    asked = publish or jsonl or callback is not None or on_status is not None or (outputs and outputs.any)
    if no_output and asked:
        raise SinkError("--no-output contradicts the outputs asked for (--publish, --jsonl, --record…)")
    with contextlib.ExitStack() as opened:  # closed in reverse: sinks, stream (and source), runtime
        if runtime is None:
            runtime = opened.enter_context(
                Runtime(
                    bundle,
                    backend=backend,
                    monitor=monitor,
                    monitor_options=monitor_options,
                    precision=precision,
                    expect_id=expect_id,
                    trust=trust,
                )
            )
        elif expect_id is not None or trust is not None:
            runtime.bundle.check_files()
            runtime.bundle.require(expect_id=expect_id, trust=trust)
        stream, frames = open_stream(
            opened, runtime, source, outputs, realtime=realtime, loop=loop, **stream_options
        )
        sinks = opened.enter_context(
            open_sinks(
                publish=publish,
                jsonl=jsonl,
                callback=callback,
                on_status=on_status,
                topic=topic,
                hwm=hwm,
                wait_subscribers=wait_subscribers,
                wait_timeout_s=wait_timeout_s,
                curve_secret=curve_secret,
                frames=frames,
            )
        )
        return drain(stream, sinks, show_progress=show_progress, no_output=no_output)
