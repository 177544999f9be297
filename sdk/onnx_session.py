"""The one way the SDK opens an onnxruntime session.

A conformal quantile holds only for the numerics it was computed with, so a bundle variant records
``calibrated_with`` (e.g. ``onnxruntime-cpu``) and every reader of that variant (the runtime, the
audit, ``rrise inspect --verify``, export's recalibration) opens it here, on exactly those execution
providers. Monte Carlo, which certifies the base model rather than a calibrated variant, asks for
``"fastest"``: CUDA when present, else the CPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["CALIBRATED_WITH", "FASTEST", "open_session", "providers_for"]

# calibrated_with → the execution providers that reproduce those numerics, in order.
CALIBRATED_WITH: dict[str, tuple[str, ...]] = {
    "onnxruntime-cpu": ("CPUExecutionProvider",),
    "onnxruntime-cuda": ("CUDAExecutionProvider",),
}
FASTEST = "fastest"
_FASTEST_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        if _caused_by_ctrl_c(exc):  # a Ctrl-C while its extension loaded surfaces as an ImportError
            raise KeyboardInterrupt from None
        if importlib.util.find_spec("onnxruntime") is not None:
            raise RuntimeError(f"onnxruntime is installed but does not load: {exc}") from exc
        raise RuntimeError(
            "onnxruntime is not installed: pip install 'rrise[runtime]' (onnxruntime-gpu for CUDA)"
        ) from exc
    return ort


def _caused_by_ctrl_c(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among ``exc``'s causes and contexts."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def providers_for(calibrated_with: str) -> list[str]:
    """The providers for ``calibrated_with`` (a key of :data:`CALIBRATED_WITH`, or ``"fastest"``).

    Raises ValueError for an unknown value and RuntimeError when the numerics it names cannot be
    reproduced here (e.g. ``onnxruntime-cuda`` on a machine without CUDA).
    """
    available = set(_ort().get_available_providers())
    if calibrated_with == FASTEST:
        return [p for p in _FASTEST_PROVIDERS if p in available]
    if calibrated_with not in CALIBRATED_WITH:
        known = ", ".join(CALIBRATED_WITH)
        raise ValueError(f"unknown calibrated_with {calibrated_with!r}: expected one of {known}")
    wanted = list(CALIBRATED_WITH[calibrated_with])
    missing = [p for p in wanted if p not in available]
    if missing:
        raise RuntimeError(
            f"this variant was calibrated with {calibrated_with}, but onnxruntime here lacks "
            f"{', '.join(missing)}: its quantile would not hold with other kernels"
        )
    return wanted


def open_session(
    model: str | os.PathLike | bytes,
    calibrated_with: str,
    *,
    threads: int | None = None,
    quiet: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``model`` (a path or serialized bytes) running exactly
    the numerics ``calibrated_with`` names, with every provider fallback refused.

    ``threads``: intra-op threads (None: onnxruntime's default, one per core). Raises
    FileNotFoundError for a missing file and ValueError, naming the file, for one onnxruntime cannot
    load.
    """
    ort = _ort()
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise FileNotFoundError(f"ONNX model not found: {model}")
    providers = providers_for(calibrated_with)
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        opts.log_severity_level = 3  # errors only
    where = "serialized model" if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(
            model if isinstance(model, bytes) else os.fspath(model), sess_options=opts, providers=providers
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValueError(f"onnxruntime cannot load {where}: {exc}") from None
    got = session.get_providers()
    if calibrated_with != FASTEST and got[0] != providers[0]:
        raise RuntimeError(f"onnxruntime fell back from {providers[0]} to {got[0]} for {where}")
    return session
