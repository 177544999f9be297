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
from rrise.inspect import adaptive_guarantee_text
from rrise.progress import progress_bar
from rrise.records import STATUS_ADAPTIVE_KEYS

from .frame_outputs import open_stream
from .options import RunOptions
from .runtime import Runtime
from .sinks import NO_OUTPUT_HINT, SinkError, Sinks, open_sinks
from .sources import FrameSource
from .status_text import live_note
from .stream import Stream

__all__ = ["ADAPTIVE_SUMMARY_KEYS", "SUMMARY_KEYS", "adaptive_statement", "drain", "run_stream"]

# What a run's summary holds: the stream's counts (``drops``: frames captured but never certified;
# ``publish_failed``: records the publisher could not queue at all), how it ran, the publishers'
# delivery counts (rrise.runtime.sinks.Sinks.delivery) and what went nowhere.
SUMMARY_KEYS = (
    "frames",
    "errors",
    "abstained",
    "certified",
    "fps",
    "latency_p50_ms",
    "latency_p99_ms",
    "drops",
    "publish_failed",
    "reconnects",
    "alarms",
    "ood_flags",
    "source_ended_early",
    "status_records",
    "elapsed_s",
    "subscribers",
    "subscribers_peak",
    "published",
    "published_unheard",
    "published_offered",
    "publishers",
    "interrupted",
    "source_error",
    "output_errors",
    "drop_policy",
    "threaded",
    "batch",
    "backend",
    "variant",
    "source",
    "bundle",
    "warnings",
)
# What the summary adds in adaptive mode (``--mc-budget N``, N > 0): MC frames, draws, latency per path.
ADAPTIVE_SUMMARY_KEYS = STATUS_ADAPTIVE_KEYS

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

    Parameters
    ----------
    stream, sinks:
        A :class:`~rrise.runtime.stream.Stream`, not yet iterated; where its records go.
    show_progress:
        A live progress line on stderr.
    no_output:
        A run without any sink is meant: no warning about it.

    Returns
    -------
    dict
        The stream's summary and ``warnings`` (:data:`SUMMARY_KEYS`).

    SIGINT/SIGTERM stop the stream after the current batch; a closed output pipe stops it quietly.
    A stream with no sink at all is warned about at the start and in the summary's ``warnings``
    (unless ``no_output``), as is a publisher that no subscriber heard; each warning is logged.

    >>> import tempfile, numpy as np; from pathlib import Path
    >>> from rrise.runtime import Runtime, open_sinks; from rrise.runtime.sources import PushSource
    >>> from tests.tiny_bundle import linear_sources, make_linear_bundle  # a real 1×4×4 bundle
    >>> folder = Path(tempfile.mkdtemp())
    >>> bundle = make_linear_bundle(linear_sources(folder), folder / "bundle").path
    >>> source = PushSource("robot", live=False)
    >>> source.push(np.zeros((4, 4), np.uint8)), source.end()
    (0, None)
    >>> got = []
    >>> with Runtime(bundle) as runtime, open_sinks(callback=got.append) as sinks:
    ...     summary = drain(runtime.stream(source), sinks)
    >>> summary["frames"], got[0]["source"], summary["warnings"]
    (1, 'robot', [])
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
            _send(stream, sinks, record)
            if show_progress and "kind" not in record:
                bar.advance(1)
                if stats.frames % 5 == 0:
                    bar.note(live_note(stats.frames, stats.abstained, stats.errors, stream.drops, record))
    summary = stream.summary()
    summary["output_errors"] = list(sinks.errors)
    summary["warnings"] = [] if no_output and not sinks.sinks else sinks.warnings(stats.frames)
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    return summary


def _send(stream: Stream, sinks: Sinks, record: dict[str, Any]) -> None:
    """One record to every sink; a closed output pipe ends the stream in order, and so does an
    output that cannot write (its message in ``sinks.errors``, the summary's ``output_errors``)."""
    try:
        sinks.send(record)
    except BrokenPipeError:
        log.info("output pipe closed: stopping")
        stream.stop(interrupted=False)
    except SinkError as exc:
        log.error("%s: stopping the run", exc)
        stream.stop(interrupted=False)


def run_stream(
    bundle: Bundle | str | Path | None,
    source: str | int | Path | FrameSource,
    options: RunOptions | None = None,
    *,
    runtime: Runtime | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    on_status: Callable[[dict[str, Any]], Any] | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Certify ``source``'s frames with ``bundle``, send each record to every sink, return the
    summary: what ``rrise run`` does (SIGINT/SIGTERM stop it after the current batch).

    Parameters
    ----------
    bundle:
        A bundle folder or a loaded :class:`rrise.Bundle` (None with ``runtime``: reuse that one).
    source:
        What ``--source`` takes, or an opened :class:`~rrise.runtime.sources.FrameSource`.
    options:
        :class:`~rrise.runtime.options.RunOptions` (default ``RunOptions()``).
    runtime, callback, on_status, show_progress:
        A loaded Runtime (not closed here); called with each record / status record; a live line.

    Returns
    -------
    dict
        The summary (:data:`SUMMARY_KEYS`), ``warnings`` included (what went nowhere, also logged).

    Raises
    ------
    rrise.BundleError, rrise.runtime.sources.SourceError, rrise.runtime.sinks.SinkError
        A bundle, source or output that does not open (or a bundle ``expect_id``/``trust`` refuse).
    ValueError
        ``no_output`` with a callback, or neither ``bundle`` nor ``runtime``.

    >>> import tempfile, numpy as np; from pathlib import Path; from rrise.runtime.sources import PushSource
    >>> from tests.tiny_bundle import linear_sources, make_linear_bundle  # a real 1×4×4 bundle
    >>> folder = Path(tempfile.mkdtemp())
    >>> bundle = make_linear_bundle(linear_sources(folder), folder / "bundle").path
    >>> source, got = PushSource("robot", live=False), []
    >>> [source.push(np.full((4, 4), level, np.uint8)) for level in (0, 120, 240)], source.end()
    ([0, 1, 2], None)
    >>> from rrise.runtime.options import StreamOptions
    >>> options = RunOptions(stream=StreamOptions(batch=2, status_interval=0))
    >>> summary = run_stream(bundle, source, options, callback=got.append)
    >>> summary["frames"], summary["batch"], [r["frame"] for r in got]
    (3, 2, [0, 1, 2])
    """
    options = options or RunOptions()
    no_output = options.outputs.no_output
    if no_output and (callback is not None or on_status is not None):
        raise ValueError("--no-output contradicts the callback asked for")
    with contextlib.ExitStack() as opened:  # closed in reverse: sinks, stream (and source), runtime
        runtime = _announced(_runtime(opened, bundle, options, runtime))
        stream, frames = open_stream(opened, runtime, source, options)
        sinks = opened.enter_context(
            open_sinks(options.outputs, callback=callback, on_status=on_status, frames=frames)
        )
        return _finished(sinks, drain(stream, sinks, show_progress=show_progress, no_output=no_output))


def _finished(sinks: Sinks, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` once every output is closed: the errors closing them raised (a file that could
    not be finished) logged and added to ``output_errors``."""
    said = len(sinks.errors)
    sinks.close()
    for error in sinks.errors[said:]:
        log.error("%s", error)
    summary["output_errors"] = list(sinks.errors)
    return summary


def adaptive_statement(runtime: Runtime) -> str:
    """The paragraph ``rrise run`` states on stderr when adaptive certification is on: how frames
    are routed and the composed guarantee, with this run's α, β and A filled in.

    Parameters
    ----------
    runtime:
        A :class:`~rrise.runtime.Runtime` in adaptive mode.

    Returns
    -------
    str
        One paragraph.

    >>> import tempfile; from pathlib import Path
    >>> from tests.tiny_bundle import linear_sources, make_linear_bundle  # a real 1×4×4 bundle
    >>> folder = Path(tempfile.mkdtemp())
    >>> bundle = make_linear_bundle(linear_sources(folder), folder / "bundle").path
    >>> with Runtime(bundle, mc_budget=1024, require_radius=0.3) as runtime:
    ...     text = adaptive_statement(runtime)
    >>> text.split(":")[0], "1 − α − β − A = 0.889" in text
    ('adaptive certification on (--mc-budget 1024, --mc-alpha 0.001)', True)
    """
    adaptive, cal = runtime.adaptive, runtime.calibration
    mc = adaptive.mc.options
    rule = adaptive.routing
    score = "" if rule.score_below == float("inf") else f" and ŝ < {rule.score_below:g}"
    step = ", then half of it, then any radius, where out of reach" if rule.step_down else ""
    head = (
        f"adaptive certification on (--mc-budget {mc.budget}, --mc-alpha {mc.alpha:g}): draws where "
        f"the surrogate radius < {rule.target_radius:g}{score}, aiming at it{step} ({rule.origin}). "
    )
    return head + adaptive_guarantee_text(cal.alpha, cal.beta, mc.alpha)


def _announced(runtime: Runtime) -> Runtime:
    """``runtime``, its adaptive mode (if on) stated first: routing and the composed guarantee."""
    if runtime.adaptive is not None:
        log.info("%s", adaptive_statement(runtime))
    return runtime


def _runtime(
    opened: contextlib.ExitStack,
    bundle: Bundle | str | Path | None,
    options: RunOptions,
    runtime: Runtime | None,
) -> Runtime:
    """The Runtime of a run: ``runtime`` (its bundle checked again when pinned), or ``bundle``
    loaded as ``options`` say (entered in ``opened``)."""
    expect_id, trust = options.expect_id, options.trust
    if runtime is not None and options.mc.enabled and runtime.adaptive is None:
        raise ValueError("--mc-budget: the runtime given was loaded without it (Runtime(..., mc_budget=N))")
    if runtime is not None:
        if expect_id is not None or trust is not None or options.min_release is not None:
            runtime.bundle.check_files()
            runtime.bundle.require(expect_id=expect_id, trust=trust, min_release=options.min_release)
        return runtime
    if bundle is None:
        raise ValueError("run_stream needs a bundle or a runtime")
    watch = options.watch
    loaded = Runtime(
        bundle,
        backend=options.backend.value,
        precision=None if options.precision is None else options.precision.value,
        watch=watch.monitor_options() if watch.watch else False,
        expect_id=expect_id,
        trust=trust,
        mc=options.mc,
    )
    if options.min_release is not None:
        loaded.bundle.require(trust=trust, min_release=options.min_release)
    return opened.enter_context(loaded)
