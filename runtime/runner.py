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

from .runtime import Runtime
from .sinks import Sinks, open_sinks
from .sources import FrameSource
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


def drain(stream: Stream, sinks: Sinks, *, show_progress: bool = False) -> dict[str, Any]:
    """Send every record of ``stream`` to ``sinks`` until the stream ends; return its summary.

    SIGINT/SIGTERM stop the stream after the current batch; a closed output pipe stops it quietly.
    """
    stats = stream.stats
    stats.count_publish_failures(lambda: sinks.publish_failed)
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
                if stats.frames % 25 == 0:
                    bar.note(f"abstain {stats.abstained / stats.frames:.0%}, errors {stats.errors}")
    return stream.summary()


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
    backend: str = "auto",
    precision: str | None = None,
    monitor: bool = True,
    runtime: Runtime | None = None,
    show_progress: bool = False,
    **stream_options: Any,
) -> dict[str, Any]:
    """Certify the frames of ``source`` and send each record to every sink; return the summary.

    Sinks: :func:`~rrise.runtime.sinks.open_sinks`'s options. The Runtime: ``backend``, ``precision``,
    ``monitor`` (False: no shift alarm), or a loaded ``runtime`` to reuse (not closed here).
    ``stream_options`` (``batch``, ``drop_policy``, ``queue_size``, ``max_frames``,
    ``status_interval_s``, ``threaded``) go to :class:`~rrise.runtime.stream.Stream`.

    Summary keys: ``frames``, ``errors``, ``abstained``, ``certified``, ``fps``, ``latency_p50_ms``,
    ``latency_p99_ms``, ``drops`` (frames captured but never certified), ``publish_failed``
    (records the publisher could not queue at all), ``reconnects``, ``alarms`` (records with an
    alarm), ``status_records``, ``elapsed_s``, ``interrupted``, ``source_error``, ``drop_policy``,
    ``threaded``, ``batch``, ``backend``, ``variant``, ``source``, ``bundle``.
    """
    with contextlib.ExitStack() as opened:  # closed in reverse: sinks, stream (and source), runtime
        if runtime is None:
            runtime = opened.enter_context(
                Runtime(bundle, backend=backend, monitor=monitor, precision=precision)
            )
        stream = opened.enter_context(runtime.stream(source, **stream_options))
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
            )
        )
        return drain(stream, sinks, show_progress=show_progress)
