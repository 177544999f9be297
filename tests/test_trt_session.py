"""The engine runner shared by export's recalibration and the runtime, where TensorRT is absent."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rrise import trt_session


def test_without_tensorrt_an_engine_is_refused_with_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert not trt_session.tensorrt_available()
    with pytest.raises(RuntimeError, match="the TensorRT backend cannot start") as err:
        trt_session.TensorRTBackend(tmp_path / "model.engine")
    assert trt_session.TENSORRT_HELP in str(err.value)


class _DataType:
    def __init__(self, name: str) -> None:
        self.name = name


def test_tensor_types_map_to_numpy_with_or_without_nptype():
    class WithNptype:
        @staticmethod
        def nptype(dtype: object) -> type:
            return np.float16

    assert trt_session._numpy_dtype(WithNptype, _DataType("HALF")) == np.float16
    without = object()  # a TensorRT whose bindings lack nptype: the type's name decides
    assert trt_session._numpy_dtype(without, _DataType("FLOAT")) == np.float32
    assert trt_session._numpy_dtype(without, _DataType("DataType.HALF")) == np.float16
    with pytest.raises(RuntimeError, match="FP8 has no numpy counterpart"):
        trt_session._numpy_dtype(without, _DataType("FP8"))


def test_the_runtime_and_export_run_engines_through_the_same_class():
    from rrise.export import engine
    from rrise.runtime import backends

    assert backends.TensorRTBackend is trt_session.TensorRTBackend
    assert engine.trt_session is trt_session
