"""Surrogate (or base model) → one self-contained ONNX file, and its parity with torch.

The exported graph takes ``input`` (float32 ``[batch, C, H, W]`` pixels in [0, 1], dynamic batch) and
returns ``logits`` (``[batch, K]``); the normalization layer is part of the model, so nothing outside
the graph touches the numbers (docs/CERTIFICATE.md). Torch is imported inside the functions that need
it, so :func:`onnx_logits` works on an edge device without torch.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rrise.fileio import atomic_write_bytes
from rrise.onnx_session import open_session

if TYPE_CHECKING:
    from torch import nn

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "export_onnx", "onnx_logits", "onnx_parity"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


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
    shape = _check_shape(input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        dummy = _example_input(model, shape)
        proto = _trace(model, dummy, path.parent, opset)
    finally:
        model.train(was_training)
    return atomic_write_bytes(path, _self_contained(proto))


def _example_input(model: nn.Module, shape: tuple[int, int, int]):
    """A random batch on the model's device, after checking the model maps it to logits ``[B, K]``."""
    import torch

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    # Batch 2, not 1: a size-1 batch lets the tracer fold the batch axis into constants.
    dummy = torch.rand(2, *shape, device=device)
    with torch.no_grad():
        out = model(dummy)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        c, h, w = shape
        raise ValueError(f"the model must map [B, {c}, {h}, {w}] to logits [B, K], got {got}")
    return dummy


def _trace(model: nn.Module, dummy: Any, folder: Path, opset: int):
    """The ONNX ModelProto of ``model`` traced on ``dummy``, exported into a private temp folder in
    ``folder`` (whatever the exporter writes there is removed)."""
    import onnx
    import torch

    with tempfile.TemporaryDirectory(prefix=".tmp.onnx-export.", dir=folder) as work:
        raw = Path(work) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # dynamo=False is deliberate: the TorchScript exporter gives plain opset-17 graphs with a
            # symbolic batch axis for these CNNs; torch flags that path as deprecated.
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
        return onnx.load(str(raw), load_external_data=True)


def _self_contained(proto) -> bytes:
    """``proto`` with every weight inside it, checked by ``onnx.checker``, serialized."""
    import onnx

    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()  # raises if the weights exceed protobuf's 2 GiB limit


def onnx_logits(onnx_path: str | os.PathLike, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``[B, K]`` (float32) of an exported model on ``x`` (``[B, C, H, W]`` or ``[C, H, W]``)
    with onnxruntime on the CPU, in batches of at most ``batch_size``.

    A diagnostic (parity, audits): a variant's calibration outputs come from
    :func:`rrise.recalibration.calibration_outputs`, at the runtime's batch sizes."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or len(arr) == 0:
        raise ValueError(f"x must be [B, C, H, W] with B >= 1 or [C, H, W], got shape {arr.shape}")
    session = open_session(onnx_path, "onnxruntime-cpu")
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
