"""``rrise run``: certify a stream and publish one record per frame, bound to
:class:`RunCommand` (the bundle, the source and :class:`rrise.runtime.options.RunOptions`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer

from rrise.options import bind
from rrise.runtime.options import RunOptions

from .app import app, fail, messages_not_tracebacks
from .keys import trusted_key

__all__ = ["RunCommand"]

_SOURCE = "Bundle and source"


@dataclass(frozen=True, kw_only=True)
class RunCommand(RunOptions):
    """``rrise run``'s options: what to certify (``bundle``, ``source``) and how (:class:`RunOptions`)."""

    bundle: Path = field(
        metadata={"help": "Bundle folder (made by `rrise demo` or `rrise-export`).", "group": _SOURCE}
    )
    source: str = field(
        metadata={
            "help": "Camera index, video file, RTSP/HTTP URL, GStreamer pipeline, image folder, or a "
            "recording to replay (.mcap file, ROS 2 bag folder).",
            "group": _SOURCE,
        }
    )


@app.command()
@messages_not_tracebacks
@bind(RunCommand)
def run(options: RunCommand) -> None:
    """Certify every frame of a stream and publish one record per frame.

    Capture runs in its own thread; live sources keep the newest frames and count drops, files
    give every frame in order. SIGINT/SIGTERM flush every output and exit 0. Options may also come
    from `--config run.yaml` (keys as the fields, groups nested) and `KEY=VALUE` (e.g.
    `stream.batch=8`); flags given on the command line win.

    Example: `rrise run --bundle runs/demo/bundle --source runs/demo/demo_video.avi --jsonl -`
    """
    from rrise.bundle import BundleError
    from rrise.options import EXIT_BAD_OPTION
    from rrise.runtime import run_stream
    from rrise.runtime.adaptive import McRefused
    from rrise.runtime.sinks import SinkError
    from rrise.runtime.sources import SourceError

    trusted_key(options.trust)  # an unusable key file: one line naming it, before anything opens
    try:
        # a live line on a terminal: frames, fps, drops, abstain, last label
        summary = run_stream(options.bundle, options.source, options, show_progress=sys.stderr.isatty())
    except McRefused as exc:  # a bad option for this bundle or backend: as any bad option, exit 2
        raise fail(str(exc), EXIT_BAD_OPTION) from None
    except (BundleError, SourceError, SinkError, RuntimeError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps({"summary": summary}), err=True)
    if summary.get("source_error"):
        raise fail(f"the source failed: {summary['source_error']}")
    if summary.get("output_errors"):
        raise fail("an output failed, the run stopped: " + "; ".join(summary["output_errors"]))
