"""Surrogate (or base model) → one self-contained ONNX file, and its parity with torch.

The exported graph takes ``input`` (float32 ``[batch, C, H, W]`` pixels in [0, 1], dynamic batch) and
returns ``logits`` (``[batch, K]``); the normalization layer is part of the model, so nothing outside
the graph touches the numbers (docs/CERTIFICATE.md). Torch is imported inside the functions that need it, so
:func:`onnx_logits` and :func:`atomic_write_bytes` work on an edge device without torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rrise.bundle import _umask

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "atomic_write_bytes",
    "export_onnx",
    "onnx_logits",
    "onnx_parity",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename.

    A reader sees the old file or the whole new one, never a partial write; a crash leaves at most
    a ``.tmp`` file beside it. The file gets the usual permissions (``0o666`` less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp.{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0o600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive ints, got {input_shape!r}")
    return tuple(int(d) for d in shape)  # type: ignore[return-value]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int],
    opset: int = 17,
) -> Path:
    """Export ``model`` to ``path`` as one ONNX file and return the path.

    Guarantees: the graph has one input ``input`` (float32 ``[batch, C, H, W]``, batch dynamic) and
    one output ``logits`` (``[batch, K]``); all weights are inside the file (no external data); the
    file passes ``onnx.checker`` and is written atomically (a crash never leaves a partial file at
    ``path``). The model is exported in eval mode and left in the mode it was in.
    """
    import onnx
    import torch

    c, h, w = _check_shape(input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    # Batch 2, not 1: a size-1 batch lets the tracer fold the batch axis into constants.
    dummy = torch.rand(2, c, h, w, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(dummy)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model must map [B, {c}, {h}, {w}] to logits [B, K], got {shape}")
        # Export into a private folder: whatever the exporter writes stays there and is removed.
        work = Path(tempfile.mkdtemp(prefix=f".tmp.{path.name}.", dir=path.parent))
        try:
            raw = work / "model.onnx"
            with torch.no_grad(), warnings.catch_warnings():
                # dynamo=False is deliberate: the TorchScript exporter gives plain opset-17 graphs
                # with a symbolic batch axis for these CNNs; torch flags that path as deprecated.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                torch.onnx.export(
                    model,
                    (dummy,),
                    str(raw),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
            proto = onnx.load(str(raw), load_external_data=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        model.train(was_training)
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()  # raises if the weights exceed protobuf's 2 GiB limit
    return atomic_write_bytes(path, data)


def onnx_logits(onnx_path: str | os.PathLike, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``[B, K]`` (float32) of an exported model on ``x`` (``[B, C, H, W]`` or ``[C, H, W]``)
    with onnxruntime on the CPU, in batches of at most ``batch_size``."""
    import onnxruntime as ort

    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or len(arr) == 0:
        raise ValueError(f"x must be [B, C, H, W] with B >= 1 or [C, H, W], got shape {arr.shape}")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: np.ascontiguousarray(arr[i : i + batch_size])})[0]
        for i in range(0, len(arr), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32, copy=False)


def onnx_parity(model: nn.Module, onnx_path: str | os.PathLike, x: np.ndarray) -> float:
    """Largest absolute difference between the logits of ``model`` (torch, eval mode) and of the
    ONNX file (onnxruntime CPU) on ``x``. The model is left in the mode it was in."""
    import torch

    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    ort_out = onnx_logits(onnx_path, arr)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch_out = model(torch.from_numpy(np.ascontiguousarray(arr)).to(device)).cpu().numpy()
    finally:
        model.train(was_training)
    if torch_out.shape != ort_out.shape:
        raise ValueError(f"torch gives logits {torch_out.shape}, the ONNX file {ort_out.shape}")
    return float(np.max(np.abs(torch_out.astype(np.float64) - ort_out.astype(np.float64))))
