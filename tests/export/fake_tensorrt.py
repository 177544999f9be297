"""Just enough of the ``tensorrt`` module to drive ``rrise.export.tensorrt_build`` without a GPU: a
builder, a parser and an optimization profile that record what they are asked in ``calls``."""

from __future__ import annotations

import types
from typing import Any


def fake_module(
    version: str,
    *,
    network: Any,
    config: Any,
    calls: dict,
    flags: Any,
    engine: bytes = b"engine",
    parses: bool = True,
) -> types.ModuleType:
    """A ``tensorrt`` module of ``version`` whose builder returns ``network``, ``config`` and the
    serialized ``engine``; ``flags`` is its ``BuilderFlag``; the parser records the ONNX bytes in
    ``calls["parsed"]`` and succeeds when ``parses``; profiles record ``calls["shape"]`` and the
    network's creation flags go to ``calls["network_flags"]``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt.BuilderFlag = flags
    trt.DataType = types.SimpleNamespace(FLOAT="float", HALF="half")

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["shape"] = (name, lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, creation_flags):
            calls["network_flags"] = creation_flags
            return network

        create_optimization_profile = staticmethod(Profile)
        create_builder_config = staticmethod(lambda: config)

        def build_serialized_network(self, net, cfg):
            return engine

    class OnnxParser:
        num_errors = 0 if parses else 1

        def __init__(self, net, logger):
            pass

        def parse(self, data):
            calls["parsed"] = data
            return parses

        def get_error(self, i):
            return "unsupported operator Foo"

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt
