"""The edge runtime: frame streams → certified-prediction records (numpy, OpenCV, onnxruntime or
TensorRT, pyzmq; never torch).

``Runtime(bundle).certify(frame)`` certifies one frame; ``Runtime(bundle).stream(source)`` iterates
the records of a camera, video, URL, GStreamer pipeline, image folder or ``PushSource``;
``run_stream(bundle, source, publish=...)`` sends those records to sinks (what ``rrise run`` does).
"""

from .runner import drain, run_stream
from .runtime import Runtime
from .sinks import Sinks, open_sinks
from .sources import open_source
from .stats import StreamStats
from .stream import Stream

__all__ = ["Runtime", "Sinks", "Stream", "StreamStats", "drain", "open_sinks", "open_source", "run_stream"]
