"""The edge runtime: frame streams → certified-prediction records (numpy, OpenCV, onnxruntime or
TensorRT, pyzmq; never torch).

``Runtime(bundle).certify(frame)`` certifies one frame; ``Runtime(bundle).stream(source)`` iterates
the records of a camera, video, URL, GStreamer pipeline, image folder or ``PushSource``;
``run_stream(bundle, source, options)`` sends those records to sinks (what ``rrise run`` does), with
:class:`RunOptions` saying how.

The public names are imported on first use, so ``rrise.runtime.options`` (what ``rrise --help``
reads) loads no OpenCV, ZeroMQ or inference library.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "McOptions",
    "OutputOptions",
    "RunOptions",
    "Runtime",
    "Sinks",
    "Stream",
    "StreamOptions",
    "StreamStats",
    "WatchOptions",
    "drain",
    "open_sinks",
    "open_source",
    "run_stream",
]

_LAZY = {
    "McOptions": ".adaptive",
    "OutputOptions": ".options",
    "RunOptions": ".options",
    "StreamOptions": ".options",
    "WatchOptions": ".options",
    "Runtime": ".runtime",
    "Sinks": ".sinks",
    "open_sinks": ".sinks",
    "Stream": ".stream",
    "StreamStats": ".stream_stats",
    "drain": ".runner",
    "run_stream": ".runner",
    "open_source": ".source_specs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
