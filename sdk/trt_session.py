"""The one way the SDK runs a serialized TensorRT engine: ``[B, C, H, W]`` float32 in, ``[B, K]``
class probabilities out.

A conformal quantile holds only for the numerics it was computed with, so an engine variant is
recalibrated (export) and run (the runtime) through this same class: :class:`TensorRTBackend`, next
to :mod:`rrise.onnx_session` for onnxruntime. ``tensorrt`` and ``pycuda`` are imported only when an
engine is opened. Written against the TensorRT 10 and 11 Python APIs: name-based I/O tensors
(``num_io_tensors``, ``get_tensor_name``, ``set_tensor_address``), ``execute_async_v3`` and the
optimization profile's shapes (``get_tensor_profile_shape``); nothing of the binding-index API
that TensorRT 10 removed, nor of the weak-typing builder API that TensorRT 11 removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .manifest_schema import OUTPUT_KINDS
from .numerics import to_probs

__all__ = [
    "OUTPUT_KINDS",
    "TENSORRT_HELP",
    "TensorRTBackend",
    "check_batch_input",
    "check_output_kind",
    "device_compute_capability",
    "engine_mismatch",
    "installed_tensorrt_version",
    "pick_name",
    "tensorrt_available",
]

TENSORRT_HELP = (
    "install the tensorrt extra on the target device (pip install 'rrise[tensorrt]', or JetPack's "
    "python3-libnvinfer plus pycuda) and build an engine there with `rrise-export --engine tensorrt`"
)
# TensorRT data types by name → numpy, for a TensorRT without ``nptype``.
_NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_}


def check_output_kind(output_kind: str) -> str:
    """``output_kind`` if it is one of :data:`OUTPUT_KINDS`, else ValueError naming it."""
    if output_kind not in OUTPUT_KINDS:
        raise ValueError(f"model output kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
    return output_kind


def check_batch_input(x: np.ndarray) -> np.ndarray:
    """``x`` as a contiguous float32 ``[B, C, H, W]`` batch (B ≥ 1), else ValueError naming its shape."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"backend input must be [B, C, H, W] with B >= 1, got shape {x.shape}")
    return x


def pick_name(wanted: str | None, names: list[str], what: str, path: Any) -> str:
    """``wanted`` if it is among ``names``, the only name if there is one, else RuntimeError."""
    if wanted is not None and wanted in names:
        return wanted
    if len(names) == 1:
        return names[0]
    raise RuntimeError(f"{path} has {what}s {names}; cannot tell which one is {wanted!r}")


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    """The numpy dtype of a TensorRT tensor type (``trt.nptype`` where the bindings have it)."""
    if hasattr(trt, "nptype"):
        return np.dtype(trt.nptype(dtype))
    name = getattr(dtype, "name", str(dtype)).rpartition(".")[2]
    if name not in _NUMPY_TYPES:
        raise RuntimeError(f"engine tensor type {name} has no numpy counterpart here")
    return np.dtype(_NUMPY_TYPES[name])


def tensorrt_available() -> bool:
    """Whether ``tensorrt`` and ``pycuda`` both import on this machine."""
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401
    except Exception:  # a broken CUDA install raises more than ImportError
        return False
    return True


def device_compute_capability(device: int = 0) -> str | None:
    """The compute capability of GPU ``device`` as ``"major.minor"`` (None without pycuda or a GPU)."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        major, minor = cuda.Device(device).compute_capability()
    except Exception:  # no pycuda, no driver, no GPU
        return None
    return f"{major}.{minor}"


def installed_tensorrt_version() -> str | None:
    """The installed TensorRT's version string (None without TensorRT)."""
    try:
        import tensorrt as trt
    except Exception:  # a broken CUDA install raises more than ImportError
        return None
    return str(getattr(trt, "__version__", "")) or None


def engine_mismatch(entry: dict[str, Any]) -> str | None:
    """Why the engine a manifest ``entry`` describes (its ``file``, ``trt_version`` and
    ``compute_capability``) cannot run here, or None: a serialized TensorRT engine runs only with the
    TensorRT version and the GPU compute capability it was built with. What this machine cannot
    tell (no TensorRT, no GPU) is not counted as a mismatch; opening the engine says why then.

    >>> engine_mismatch({"file": "a.engine"}) is None
    True
    """
    problems = []
    want_trt, have_trt = entry.get("trt_version"), installed_tensorrt_version()
    if want_trt is not None and have_trt is not None and str(want_trt) != have_trt:
        problems.append(f"built with TensorRT {want_trt}, this device has TensorRT {have_trt}")
    want_cc, have_cc = entry.get("compute_capability"), device_compute_capability()
    if want_cc is not None and have_cc is not None and str(want_cc) != have_cc:
        problems.append(f"built for compute capability {want_cc}, this GPU is compute capability {have_cc}")
    if not problems:
        return None
    return f"engine {entry.get('file')} was " + " and ".join(problems)


class TensorRTBackend:
    """A serialized TensorRT engine (TensorRT 10/11 name-based I/O), pinned host buffers, one stream.

    The engine runs in GPU 0's primary CUDA context, pushed around every call, so ``run`` works from
    whichever thread calls it (one call at a time; the Runtime serializes them).
    """

    def __init__(
        self,
        engine: str | Path | bytes,
        *,
        input_name: str | None = None,
        output_name: str | None = None,
        output_kind: str = "logits",
        device: int = 0,
        where: str | None = None,
    ) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except Exception as exc:  # a broken CUDA install raises more than ImportError
            raise RuntimeError(f"the TensorRT backend cannot start ({exc}): {TENSORRT_HELP}") from exc
        self.output_kind = check_output_kind(output_kind)
        self._trt, self._cuda = trt, cuda
        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        try:
            # A bundle's engine comes as the bytes its sha256 was checked on (Bundle.read_verified).
            data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
            where = where or ("the serialized engine" if isinstance(engine, bytes) else str(engine))
            self._setup(data, where, input_name, output_name)
        except BaseException:
            self._ctx.pop()
            self._ctx.detach()
            raise
        self._ctx.pop()
        self.name = f"tensorrt[{trt.__version__}]"

    def _setup(self, data: bytes, engine_path: str, input_name: str | None, output_name: str | None) -> None:
        trt, cuda = self._trt, self._cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} cannot deserialize {engine_path}: an engine only runs with "
                "the TensorRT version and GPU it was built on; rebuild it on this device with "
                "`rrise-export --engine tensorrt --bundle BUNDLE`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name = pick_name(input_name, ins, "input", engine_path)
        self.output_name = pick_name(output_name, outs, "output", engine_path)
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.fixed_batch = shape[0] != -1  # a fixed batch: a shorter chunk is padded to it
        if shape[0] == -1:  # dynamic batch: optimization profile 0 bounds it
            max_shape = tuple(self.engine.get_tensor_profile_shape(self.input_name, 0)[2])
        else:
            max_shape = shape
        self.sample_shape = tuple(int(d) for d in max_shape[1:])
        self.batch_capacity = int(max_shape[0])  # the optimization profile's largest batch
        in_dtype = _numpy_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        out_dtype = _numpy_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        self.context.set_input_shape(self.input_name, max_shape)
        out_max = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
        self._h_in = cuda.pagelocked_empty(int(np.prod(max_shape)), in_dtype)
        self._h_out = cuda.pagelocked_empty(int(np.prod(out_max)), out_dtype)
        self._d_in = cuda.mem_alloc(self._h_in.nbytes)
        self._d_out = cuda.mem_alloc(self._h_out.nbytes)
        self.context.set_tensor_address(self.input_name, int(self._d_in))
        self.context.set_tensor_address(self.output_name, int(self._d_out))
        self._stream = cuda.Stream()
        self._bound_batch = self.batch_capacity

    def run(self, x: np.ndarray) -> np.ndarray:
        x = check_batch_input(x)
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"engine expects [B, {', '.join(map(str, self.sample_shape))}], got {x.shape}")
        self._ctx.push()
        try:
            step = self.batch_capacity
            probs = [self._run_chunk(x[i : i + step]) for i in range(0, len(x), step)]
        finally:
            self._ctx.pop()
        return probs[0] if len(probs) == 1 else np.concatenate(probs)

    def _run_chunk(self, x: np.ndarray) -> np.ndarray:
        rows = len(x)
        if self.fixed_batch and rows < self.batch_capacity:  # the engine takes its one batch only
            x = np.concatenate([x, np.repeat(x[-1:], self.batch_capacity - rows, axis=0)])
        cuda, b = self._cuda, len(x)
        if b != self._bound_batch:
            self.context.set_input_shape(self.input_name, (b, *self.sample_shape))
            self._bound_batch = b
        out_shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
        h_in, h_out = self._h_in[: x.size], self._h_out[: int(np.prod(out_shape))]
        np.copyto(h_in, x.ravel(), casting="same_kind")
        cuda.memcpy_htod_async(self._d_in, h_in, self._stream)
        if not self.context.execute_async_v3(stream_handle=self._stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        cuda.memcpy_dtoh_async(h_out, self._d_out, self._stream)
        self._stream.synchronize()
        return to_probs(h_out.reshape(out_shape)[:rows].copy(), self.output_kind)

    def close(self) -> None:
        """Free the engine's GPU memory and release the CUDA context."""
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            return
        self._ctx = None
        ctx.push()
        try:
            for attr in ("_d_in", "_d_out"):
                getattr(self, attr).free()
            del self.context, self.engine, self._stream
        finally:
            ctx.pop()
            ctx.detach()
