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


class _FixedBatchEngine:
    """An engine whose input batch is fixed at 4 (from an ONNX with a static batch): it runs whole
    batches only, logits = the mean of each row times (1, 2, 3)."""

    memory: dict[int, np.ndarray] = {}

    def __init__(self) -> None:
        self.num_io_tensors, self.batches = 2, []

    def get_tensor_name(self, i: int) -> str:
        return ["x", "y"][i]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if name == "x" else "out"

    def get_tensor_shape(self, name: str) -> tuple:
        return (4, 1, 2, 2) if name == "x" else (4, 3)

    def get_tensor_dtype(self, name: str) -> _DataType:
        return _DataType("FLOAT")

    def create_execution_context(self):
        engine, addr = self, {}

        class Context:
            def set_input_shape(self, name, shape):
                assert tuple(shape) == (4, 1, 2, 2), "a fixed-batch engine takes its batch only"

            def get_tensor_shape(self, name):
                return engine.get_tensor_shape(name)

            def set_tensor_address(self, name, a):
                addr[name] = a

            def execute_async_v3(self, stream_handle):
                x = _FixedBatchEngine.memory[addr["x"]][:16].reshape(4, 4)
                _FixedBatchEngine.memory[addr["y"]][:12] = (x.mean(1, keepdims=True) * [1, 2, 3]).ravel()
                engine.batches.append(4)
                return True

        return Context()


def test_a_fixed_batch_engine_gets_its_tail_padded_and_only_its_rows_back(monkeypatch):
    import types

    engine = _FixedBatchEngine()
    memory = _FixedBatchEngine.memory
    ctx = types.SimpleNamespace(push=lambda: None, pop=lambda: None, detach=lambda: None)

    def alloc(nbytes: int) -> int:  # a device allocation: a numpy array under a fake address
        address = len(memory) + 1
        memory[address] = np.empty(nbytes // 4, np.float32)
        return address

    driver = types.SimpleNamespace(
        init=lambda: None,
        Device=lambda i: types.SimpleNamespace(retain_primary_context=lambda: ctx),
        pagelocked_empty=lambda n, dtype: np.empty(n, dtype),
        mem_alloc=alloc,
        Stream=lambda: types.SimpleNamespace(handle=1, synchronize=lambda: None),
        memcpy_htod_async=lambda dev, host, stream: memory[int(dev)].__setitem__(slice(0, host.size), host),
        memcpy_dtoh_async=lambda host, dev, stream: host.__setitem__(
            slice(None), memory[int(dev)][: host.size]
        ),
    )
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    for name, module in (("tensorrt", trt), ("pycuda", pycuda), ("pycuda.driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)
    backend = trt_session.TensorRTBackend(b"engine bytes", output_kind="probs")
    assert backend.fixed_batch and backend.batch_capacity == 4
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 1, 2, 2)
    out = backend.run(x)  # 6 rows: one batch of 4, then 2 rows padded to 4
    np.testing.assert_allclose(out, x.reshape(6, 4).mean(1, keepdims=True) * [1, 2, 3])
    assert engine.batches == [4, 4]
