"""The TensorRT variant of a bundle: an engine built on this device, with its own quantile.

:func:`add_engine` builds a TensorRT engine from the bundle's ONNX of one precision
(:func:`rrise.export.tensorrt_build.build_engine`), runs it on the calibration images through
:class:`rrise.trt_session.TensorRTBackend`, the engine runner the runtime uses too (the numerics
deployment will see), at batch size 1 and in the runtime's micro-batches
(:func:`rrise.recalibration.calibration_outputs`), and
adds it with the quantile of its batch-1 outputs, ``calibrated_with: "tensorrt"`` and ``max_batch``
(the largest micro-batch whose outputs are bit-identical to batch 1's; an engine whose kernels
change with the batch size gets 1). TensorRT and pycuda are imported only when it runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rrise import trt_session
from rrise.bundle import Bundle
from rrise.numerics import MICRO_BATCH_LIMIT
from rrise.recalibration import calibration_images, calibration_outputs, micro_batched, onnx_probs_runner

from . import tensorrt_build
from .bundler import add_variant
from .precision import PRECISIONS, variant_file_name

__all__ = ["CALIBRATED_WITH_TENSORRT", "add_engine", "engine_outputs"]

CALIBRATED_WITH_TENSORRT = "tensorrt"


def engine_outputs(engine_path: str | os.PathLike, images: np.ndarray) -> tuple[np.ndarray, int]:
    """The engine's batch-1 probabilities on ``images`` and the largest runtime micro-batch that
    reproduces them exactly, run through the runtime's engine runner
    (:class:`rrise.trt_session.TensorRTBackend`)."""
    backend = trt_session.TensorRTBackend(engine_path)
    try:
        return calibration_outputs(backend.run, images)
    finally:
        backend.close()


def _parity(onnx_file: Path, source: str, images: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """How far the engine's outputs are from its source ONNX on onnxruntime's CPU provider."""
    entry: dict[str, Any] = {"reference": f"{source} on onnxruntime-cpu"}
    try:
        reference = micro_batched(onnx_probs_runner(onnx_file), images)
    except Exception as exc:  # e.g. an fp16 ONNX the CPU provider has no kernels for
        entry["error"] = str(exc)[:200]
        return entry
    entry["max_abs_diff_probs"] = float(np.max(np.abs(probs - reference)))
    entry["argmax_agreement"] = float(np.mean(probs.argmax(1) == reference.argmax(1)))
    return entry


def add_engine(
    bundle_dir: str | os.PathLike,
    precision: str = "fp32",
    *,
    timing_cache: str | os.PathLike | None = None,
    max_batch: int = MICRO_BATCH_LIMIT,
    info: dict[str, Any] | None = None,
) -> Bundle:
    """Build a TensorRT engine on this machine from the bundle's ONNX of ``precision`` and add it
    (replacing any earlier one) with its own recalibrated quantile.

    The engine accepts batches 1..``max_batch`` (its optimization profile; the runtime hands it at
    most :data:`rrise.numerics.MICRO_BATCH_LIMIT` frames at once). Its entry records
    ``calibrated_with: "tensorrt"``, ``max_batch`` (exact-numerics micro-batch, at most the profile's),
    ``trt_version``, ``compute_capability``, ``device``, ``built_from`` and the parity with its source
    ONNX on the CPU. ``info`` is :func:`rrise.export.tensorrt_build.engine_info` (looked up if not
    given). fp16 and int8 engines are built strongly typed from the bundle's fp16 / int8 QDQ ONNX,
    which must be in the bundle already. Raises RuntimeError (no TensorRT, build failure),
    BundleError or ValueError naming the problem; the bundle is unchanged then.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    info = info if info is not None else tensorrt_build.engine_info()
    bundle = Bundle.load(bundle_dir)
    source = bundle.variant(precision, "onnxruntime")["file"]
    images = calibration_images(bundle)
    with tempfile.TemporaryDirectory(prefix="rrise-engine-") as work:
        engine_path = tensorrt_build.build_engine(
            bundle.file(source),
            Path(work) / "surrogate.engine",
            opt_batch=min(8, max_batch),
            max_batch=max_batch,
            timing_cache=timing_cache,
            strongly_typed=precision != "fp32",
        )
        probs, exact_batch = engine_outputs(engine_path, images)
        return add_variant(
            bundle.path,
            engine_path,
            precision=precision,
            backend="tensorrt",
            probs=probs,
            calibrated_with=CALIBRATED_WITH_TENSORRT,
            # Batches above the profile's max are split by the backend: exact when the check passed.
            max_batch=min(exact_batch, max_batch),
            name=variant_file_name(precision, "tensorrt"),
            trt_version=info["trt_version"],
            compute_capability=info["compute_capability"],
            device=info.get("device"),
            built_from=source,
            batch_range=[1, max_batch],
            parity=_parity(bundle.file(source), source, images, probs),
        )
