"""The TensorRT variant of a bundle: an engine built on this device, with its own quantile.

:func:`add_engine` builds a TensorRT engine from the bundle's ONNX of one precision
(:func:`rrise.export.tensorrt_build.build_engine`), runs it on the calibration images through
:class:`rrise.trt_session.TensorRTBackend`, the engine runner the runtime uses too (the numerics
deployment will see), at batch size 1 and in the runtime's micro-batches
(:func:`rrise.recalibration.calibration_outputs`), and
adds it with the quantile of its batch-1 outputs, ``calibrated_with: "tensorrt"`` and ``max_batch``
(the largest micro-batch whose outputs are bit-identical to batch 1's; an engine whose kernels
change with the batch size gets 1). TensorRT and pycuda are imported only when it runs.

It also builds an engine of the bundle's base classifier (``base_model.file``) on this device
(:func:`add_base_engine`, fp32 numerics: :func:`rrise.export.tensorrt_build.build_base_engine`), the
engine adaptive certification runs its Monte Carlo draws through on ``rrise run --backend tensorrt
--mc-budget N``. The manifest lists it under ``base_model.engines`` (``file``, ``sha256``,
``trt_version``, ``compute_capability``, ``device``, ``max_batch``, ``built_from`` and the parity of its
votes with the base ONNX on onnxruntime's CPU provider), one entry per GPU and TensorRT version.
The base model's numerics carry no quantile: Monte Carlo certifies whatever classifier it runs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rrise import trt_session
from rrise.bundle import Bundle
from rrise.numerics import MICRO_BATCH_LIMIT
from rrise.recalibration import calibration_images, calibration_outputs, micro_batched, onnx_probs_runner
from rrise.sequential import DEFAULT_MC_BATCH

from . import tensorrt_build
from .bundler import add_file, add_variant
from .precision import PRECISIONS, variant_file_name

__all__ = [
    "CALIBRATED_WITH_TENSORRT",
    "add_base_engine",
    "add_engine",
    "base_engine_file_name",
    "engine_outputs",
]

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
    (replacing any earlier one) with its own recalibrated quantile; then an fp32 engine of the
    base classifier (:func:`add_base_engine`), which ``rrise run --backend tensorrt --mc-budget N``
    runs its Monte Carlo draws on.

    The engine accepts batches 1..``max_batch`` (its optimization profile; the runtime hands it at
    most :data:`rrise.numerics.MICRO_BATCH_LIMIT` frames at once). Its entry records
    ``calibrated_with: "tensorrt"``, ``max_batch`` (exact-numerics micro-batch, at most the profile's),
    ``trt_version``, ``compute_capability``, ``device``, ``built_from`` and the parity with its source
    ONNX on the CPU. ``info`` is :func:`rrise.export.tensorrt_build.engine_info` (looked up if not
    given). fp16 and int8 engines are built strongly typed from the bundle's fp16 / int8 QDQ ONNX,
    which must be in the bundle already. Raises RuntimeError (no TensorRT, build failure),
    BundleError or ValueError naming the problem; the bundle is unchanged then, unless only the
    base model's engine failed (a RuntimeError saying the surrogate's engine was added).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    info = info if info is not None else tensorrt_build.engine_info()
    _add_surrogate_engine(bundle_dir, precision, timing_cache, max_batch, info)
    try:
        return add_base_engine(bundle_dir, timing_cache=timing_cache, info=info)
    except (RuntimeError, ValueError, OSError) as exc:
        raise RuntimeError(
            f"the surrogate's {precision} engine was added to {bundle_dir}, but the base model's engine "
            f"failed ({exc}); `rrise run --backend tensorrt --mc-budget N` needs it: fix that and rerun"
        ) from exc


def _add_surrogate_engine(
    bundle_dir: str | os.PathLike,
    precision: str,
    timing_cache: str | os.PathLike | None,
    max_batch: int,
    info: dict[str, Any],
) -> Bundle:
    """The surrogate's engine of ``precision``, recalibrated, as a variant (see :func:`add_engine`)."""
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


def base_engine_file_name(info: dict[str, Any]) -> str:
    """The bundle file name of the base model's engine for the GPU and TensorRT ``info`` describes.

    >>> base_engine_file_name({"trt_version": "10.3.0", "compute_capability": "8.7"})
    'base.sm87.trt10.3.0.engine'
    """
    cc = str(info["compute_capability"]).replace(".", "")
    return f"base.sm{cc}.trt{info['trt_version']}.engine"


def _base_parity(onnx_bytes: bytes, source: str, engine_path: Path, images: np.ndarray) -> dict[str, Any]:
    """How often the engine's vote (argmax) is the base ONNX's on onnxruntime's CPU provider, over
    the calibration images."""
    entry: dict[str, Any] = {"reference": f"{source} on onnxruntime-cpu", "inputs": int(len(images))}
    backend = trt_session.TensorRTBackend(engine_path, output_kind="probs")
    try:
        engine_votes = backend.run(images).argmax(1)
    finally:
        backend.close()
    try:
        run = onnx_probs_runner(onnx_bytes, output_kind="probs")
        reference = np.concatenate([run(x[None]) for x in np.asarray(images, np.float32)]).argmax(1)
    except Exception as exc:  # the CPU provider cannot run it: say so rather than invent a number
        entry["error"] = str(exc)[:200]
        return entry
    entry["argmax_agreement"] = float(np.mean(engine_votes == reference))
    return entry


def add_base_engine(
    bundle_dir: str | os.PathLike,
    *,
    timing_cache: str | os.PathLike | None = None,
    max_batch: int = DEFAULT_MC_BATCH,
    info: dict[str, Any] | None = None,
) -> Bundle:
    """Build an fp32 TensorRT engine of the bundle's base classifier on this machine and list it
    under ``base_model.engines`` (replacing an entry for the same GPU and TensorRT version).

    The engine is built from the bytes of ``base_model.file`` checked against the manifest
    (:func:`rrise.export.tensorrt_build.build_base_engine`), takes batches up to ``max_batch`` (the
    Monte Carlo draws per call, ``rrise run --mc-batch``; larger batches are split) and is run once
    on the calibration images, through the runtime's engine runner, for its ``parity`` with the base
    ONNX. ``info`` is :func:`rrise.export.tensorrt_build.engine_info` (looked up if not given).
    Raises RuntimeError (no TensorRT, build failure), BundleError or ValueError; the bundle is
    unchanged then.
    """
    info = info if info is not None else tensorrt_build.engine_info()
    bundle = Bundle.load(bundle_dir)
    base = dict(bundle.manifest["base_model"])
    onnx_bytes = bundle.read_verified(base["file"], base.get("sha256"))
    name = base_engine_file_name(info)
    with tempfile.TemporaryDirectory(prefix="rrise-base-engine-") as work:
        onnx_path = Path(work) / "base.onnx"
        onnx_path.write_bytes(onnx_bytes)
        engine_path = tensorrt_build.build_base_engine(
            onnx_path, Path(work) / name, max_batch=max_batch, timing_cache=timing_cache
        )
        entry = {
            "file": name,
            "sha256": hashlib.sha256(engine_path.read_bytes()).hexdigest(),
            "trt_version": str(info["trt_version"]),
            "compute_capability": str(info["compute_capability"]),
            "device": info.get("device"),
            "max_batch": int(max_batch),
            "built_from": base["file"],
            "parity": _base_parity(onnx_bytes, base["file"], engine_path, calibration_images(bundle)),
        }
        kept = [e for e in base.get("engines") or () if e.get("file") != name]
        manifest = {**bundle.manifest, "base_model": {**base, "engines": [*kept, entry]}}
        return add_file(bundle.path, engine_path, name, manifest)
