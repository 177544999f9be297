"""The edge runtime: frame streams → certified-prediction records (numpy, OpenCV, onnxruntime or
TensorRT, pyzmq; never torch).

``Runtime(bundle).certify(frame)`` certifies one frame; ``run_stream(bundle, source, publish=...)``
runs a camera, video, URL, GStreamer pipeline or image folder and publishes one record per frame.
"""

from .engine import Runtime
from .runner import run_stream
from .sources import open_source

__all__ = ["Runtime", "open_source", "run_stream"]
