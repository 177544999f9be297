"""Precision variants of a bundle's surrogate (int8, fp16), each with its own conformal quantile.

A conformal quantile holds only for the numerics it was computed with (docs/CERTIFICATE.md,
"Numerics"), so every variant made here is run on the bundle's calibration images with onnxruntime
on the CPU — the exact file and execution provider the runtime will use for it — at batch size 1
and in the runtime's micro-batches (:func:`rrise.recalibration.calibration_outputs`), and its q̂ is
recomputed from the batch-1 outputs against the full MC count vectors in ``calibration.npz``
(:func:`rrise.export.bundler.add_variant`). The variant entry says so: ``"calibrated_with":
"onnxruntime-cpu"`` and ``max_batch`` (the largest micro-batch with bit-identical outputs); the
runtime pins such a variant to onnxruntime's CPU execution provider.

- ``int8``: onnxruntime static quantization, QDQ format, int8 weights (per output channel) and int8
  activations, with activation ranges (MinMax) taken from ``quant_images``. Those images are a
  choice made from data, so by the certificate's rules they must come from a selection split (e.g. the
  surrogate's training or selection inputs), never from the conformal calibration split:
  :func:`selection_images` and :func:`check_disjoint` refuse the calibration file and any image that
  is also a calibration image.
- ``fp16``: a strongly typed FP16 ONNX — every weight and every intermediate tensor is float16; the
  graph input and output stay float32 with one Cast after the input and one before the output, so
  the runtime, the manifest's ``model.input`` and the preprocessing are the same for every variant.
  That file is what ``rrise-export add-variant --precision fp16 --engine tensorrt`` builds a
  TensorRT 10/11 engine from (strongly typed networks take their precision from the ONNX's own
  types; :mod:`rrise.export.engine`). Its onnxruntime-CPU quantile is not the engine's: the engine
  gets its own on the device. If onnxruntime's CPU provider cannot run the file, the variant is
  recorded with ``"quantile": null`` and ``needs_recalibration`` instead of an invented quantile,
  and the runtime refuses to run it.

:func:`add_to_bundle` is the one entry point of ``rrise-export add-variant``: an int8/fp16 variant,
a TensorRT engine, or both. Only onnx and onnxruntime are needed (no torch): a variant can be added
on the device itself.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rrise.bundle import Bundle
from rrise.fileio import atomic_write_bytes, load_npz, sha256_file
from rrise.numerics import MICRO_BATCH_LIMIT
from rrise.recalibration import (
    CALIBRATION_FILE,
    calibration_images,
    calibration_outputs,
    micro_batched,
    onnx_probs_runner,
)

from .bundler import add_variant
from .engine import add_engine
from .onnx_export import INPUT_NAME
from .options import VariantOptions
from .precision import DEFAULT_QUANT_SAMPLES, PRECISIONS, variant_file_name

__all__ = [
    "CALIBRATED_WITH_ORT_CPU",
    "DEFAULT_QUANT_SAMPLES",
    "PRECISIONS",
    "add_precision_variant",
    "add_to_bundle",
    "add_variant_options",
    "calibration_images",
    "check_disjoint",
    "convert_fp16",
    "float32_intermediates",
    "load_quant_data",
    "micro_batched",
    "quantize_int8",
    "selection_images",
    "variant_file_name",
]

CALIBRATED_WITH_ORT_CPU = "onnxruntime-cpu"


# --- data for int8 ranges ---------------------------------------------------------------------------
def _row_digests(images: np.ndarray) -> set[bytes]:
    flat = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
    return {hashlib.sha256(row.tobytes()).digest() for row in flat}


def check_disjoint(quant_images: np.ndarray, calibration_images: np.ndarray) -> None:
    """Raise ValueError if any quantization image is (bit for bit) a calibration image.

    Why: the int8 activation ranges are chosen from these images; a choice made from the conformal
    calibration split breaks the exchangeability the quantile's guarantee rests on (docs/CERTIFICATE.md).
    """
    cal = _row_digests(calibration_images)
    flat = np.ascontiguousarray(quant_images, dtype=np.float32).reshape(len(quant_images), -1)
    shared = [i for i, row in enumerate(flat) if hashlib.sha256(row.tobytes()).digest() in cal]
    if shared:
        raise ValueError(
            f"{len(shared)} of the {len(quant_images)} quantization images (first: row {shared[0]}) are "
            "calibration images; int8 ranges must come from a selection split (e.g. the surrogate's "
            "training or selection inputs), never from the conformal calibration split, or the "
            "quantile's guarantee is void"
        )


def load_quant_data(
    path: str | os.PathLike,
    input_shape: tuple[int, ...],
    *,
    max_images: int = DEFAULT_QUANT_SAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """``images`` float32 [n, C, H, W] in [0, 1] from the .npz at ``path`` (at most ``max_images``,
    drawn without replacement with ``seed``). Raises ValueError naming what is wrong."""
    path = Path(path)
    images = load_npz(path, ("images",), "quantization data")["images"]
    want = tuple(int(d) for d in input_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != want or len(images) == 0:
        raise ValueError(
            f"quantization data {path}: `images` must be [n, {', '.join(map(str, want))}] with n >= 1, "
            f"got {list(images.shape)}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"quantization data {path}: `images` must be float pixels in [0, 1], got {images.dtype}"
        )
    images = images.astype(np.float32, copy=False)
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1:
        raise ValueError(f"quantization data {path}: `images` must be pixels in [0, 1] (what the model sees)")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if len(images) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
        images = images[keep]
    return np.ascontiguousarray(images)


def selection_images(
    path: str | os.PathLike,
    calibration_npz: str | os.PathLike,
    *,
    max_images: int = DEFAULT_QUANT_SAMPLES,
) -> np.ndarray:
    """Images for the int8 activation ranges from ``path`` (see :func:`load_quant_data`), refused with
    ValueError if the file is the calibration file ``calibration_npz`` or shares an image with it."""
    if sha256_file(path) == sha256_file(calibration_npz):
        raise ValueError(
            f"--quant-data {path} is the calibration file: int8 ranges must come from a selection split, "
            "never the conformal calibration split, or the guarantee is void"
        )
    cal_images = load_npz(calibration_npz, ("images",), "calibration file")["images"]
    images = load_quant_data(path, cal_images.shape[1:], max_images=max_images)
    check_disjoint(images, cal_images)
    return images


# --- int8 -----------------------------------------------------------------------------------------
def _image_reader(x: np.ndarray, batch_size: int):
    """An onnxruntime ``CalibrationDataReader`` feeding ``x`` in batches of ``batch_size``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = ({INPUT_NAME: x[i : i + batch_size]} for i in range(0, len(x), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return _Reader()


def quantize_int8(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    quant_images: np.ndarray,
    *,
    per_channel: bool = True,
    batch_size: int = 64,
) -> Path:
    """Statically quantize ``onnx_path`` to int8 (QDQ) and write it atomically to ``out_path``.

    Activation ranges (MinMax) come from ``quant_images`` [n, C, H, W]; weights are int8 per output
    channel when ``per_channel``. The graph is first preprocessed with onnxruntime's
    ``quant_pre_process`` (shape inference and graph optimization). The output keeps the float32
    input ``input`` and output ``logits`` and the dynamic batch axis.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x = np.ascontiguousarray(quant_images, dtype=np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"quant_images must be [n, C, H, W] with n >= 1, got {x.shape}")
    out_path = Path(out_path)
    near = out_path.parent if out_path.parent.exists() else None
    with tempfile.TemporaryDirectory(prefix=".tmp.int8.", dir=near, ignore_cleanup_errors=True) as work:
        pre, q = Path(work) / "pre.onnx", Path(work) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(q),
            _image_reader(x, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        data = q.read_bytes()
    return atomic_write_bytes(out_path, data)


# --- fp16 -----------------------------------------------------------------------------------------
def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (the fp16
    converter appends the input Cast at the end, which onnx.checker rejects)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            names = ", ".join(n.name or n.op_type for n in pending[:3])
            raise ValueError(f"the fp16 graph has a cycle or a dangling input near {names}")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def float32_intermediates(model) -> list[str]:
    """Names of float32 tensors of an ONNX model other than its graph inputs and outputs (weights
    included): empty for a strongly typed FP16 model with float32 I/O."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    io = {t.name for t in [*inferred.graph.input, *inferred.graph.output]}
    f32 = onnx.TensorProto.FLOAT
    names = [t.name for t in inferred.graph.initializer if t.data_type == f32]
    names += [
        v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == f32 and v.name not in io
    ]
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.t.data_type == f32:
                    names.append(node.output[0])
    return names


def convert_fp16(onnx_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert ``onnx_path`` to a strongly typed FP16 ONNX at ``out_path`` (written atomically).

    Guarantees: every weight and intermediate tensor is float16 (checked with ONNX shape inference;
    ValueError otherwise); the graph input and output stay float32 (one Cast each), so the I/O
    contract of the fp32 model is unchanged; the file passes ``onnx.checker``.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _topological_sort(half.graph)
    onnx.checker.check_model(half, full_check=True)
    left = float32_intermediates(half)
    if left:
        raise ValueError(
            f"the fp16 conversion of {onnx_path} left float32 tensors ({', '.join(left[:5])}); "
            "it would not be a strongly typed FP16 model"
        )
    return atomic_write_bytes(out_path, half.SerializeToString())


# --- adding a variant to a bundle ----------------------------------------------------------------
def _cpu_outputs(onnx_path: Path, images: np.ndarray) -> tuple[np.ndarray, int]:
    """The variant's batch-1 probabilities on the calibration images and its ``max_batch``, on
    onnxruntime's CPU provider (what the runtime runs for an ``onnxruntime-cpu`` variant)."""
    return calibration_outputs(onnx_probs_runner(onnx_path, CALIBRATED_WITH_ORT_CPU), images)


def _make_int8(
    bundle: Bundle,
    out: Path,
    quant_images: np.ndarray | None,
    cal_images: np.ndarray,
    quant_source: str | None,
    per_channel: bool,
) -> dict[str, Any]:
    """Quantize the bundle's fp32 ONNX into ``out``; → the variant's ``quantization`` entry."""
    if quant_images is None:
        raise ValueError(
            "an int8 variant needs quantization data from a selection split (--quant-data); "
            "the calibration inputs may not be used"
        )
    input_shape = tuple(bundle.manifest["model"]["input"]["shape"][1:])
    if tuple(np.shape(quant_images)[1:]) != input_shape:
        raise ValueError(
            f"quantization images are {list(np.shape(quant_images))}, the model takes "
            f"[n, {', '.join(map(str, input_shape))}]"
        )
    check_disjoint(quant_images, cal_images)
    quantize_int8(bundle.file(bundle.manifest["model"]["file"]), out, quant_images, per_channel=per_channel)
    return {
        "quantization": {
            "method": "onnxruntime.quantize_static",
            "format": "QDQ",
            "weights": "int8, per channel" if per_channel else "int8, per tensor",
            "activations": "int8",
            "calibrate_method": "MinMax",
            "n_images": len(quant_images),
            "data": quant_source or "selection split",
        }
    }


def _make_fp16(bundle: Bundle, out: Path) -> dict[str, Any]:
    """Convert the bundle's fp32 ONNX into a strongly typed fp16 one at ``out``; → its entry keys."""
    convert_fp16(bundle.file(bundle.manifest["model"]["file"]), out)
    return {"numerics": "strongly typed fp16: float16 weights and tensors, float32 graph input and output"}


def _calibrate_and_add(
    bundle: Bundle, precision: str, out: Path, cal_images: np.ndarray, extra: dict[str, Any]
) -> Bundle:
    """Run the variant file ``out`` on the calibration images and add it with its own quantile and
    ``max_batch`` (or, for an fp16 file onnxruntime's CPU provider cannot run, with none)."""
    name = variant_file_name(precision)
    try:
        probs, max_batch = _cpu_outputs(out, cal_images)
    except Exception as exc:  # onnxruntime raises its own types when it has no kernel
        if precision != "fp16":
            raise
        why = (
            f"onnxruntime's CPU provider cannot run this fp16 model ({str(exc)[:200]}); build a "
            "TensorRT engine from it on the device (rrise-export --engine tensorrt --precision "
            "fp16 --bundle ...), which gets its own quantile"
        )
        return add_variant(
            bundle.path, out, precision=precision, backend="onnxruntime", probs=None, name=name,
            needs_recalibration=why, **extra,
        )  # fmt: skip
    fp32_probs = micro_batched(onnx_probs_runner(bundle.file(bundle.manifest["model"]["file"])), cal_images)
    extra["agreement_with_fp32"] = float(np.mean(probs.argmax(1) == fp32_probs.argmax(1)))
    extra["max_abs_diff_probs_vs_fp32"] = float(np.max(np.abs(probs - fp32_probs)))
    return add_variant(
        bundle.path, out, precision=precision, backend="onnxruntime", probs=probs, name=name,
        calibrated_with=CALIBRATED_WITH_ORT_CPU, max_batch=max_batch, **extra,
    )  # fmt: skip


def add_precision_variant(
    bundle_dir: str | os.PathLike,
    precision: str,
    *,
    quant_images: np.ndarray | None = None,
    quant_source: str | None = None,
    per_channel: bool = True,
) -> Bundle:
    """Add (or replace) the ``int8`` or ``fp16`` onnxruntime variant of the bundle at ``bundle_dir``.

    The variant is made from the bundle's fp32 ``surrogate.onnx``, run on ``calibration.npz``'s images
    with onnxruntime on the CPU at batch size 1 and in the runtime's micro-batches, and given the
    quantile computed from exactly those batch-1 outputs (its own argmax class per input, scored
    against that class's MC count) and ``max_batch``, the largest micro-batch that reproduces them.
    Guarantee: certificates made with this variant's quantile, from this file run on onnxruntime's
    CPU provider in batches of at most ``max_batch``, carry the bundle's 1 − α − β guarantee. The
    manifest is rewritten atomically (readers see the old bundle or the new).

    ``int8`` needs ``quant_images`` from a selection split (refused if any is a calibration image);
    ``quant_source`` (e.g. the file name) is recorded. Raises ValueError / BundleError naming the
    problem.
    """
    if precision not in ("int8", "fp16"):
        raise ValueError(f"precision variants made here are 'int8' and 'fp16', got {precision!r}")
    bundle = Bundle.load(bundle_dir)
    cal_images = calibration_images(bundle)
    with tempfile.TemporaryDirectory(prefix=".rrise-variant-") as work:
        out = Path(work) / variant_file_name(precision)
        if precision == "int8":
            extra = _make_int8(bundle, out, quant_images, cal_images, quant_source, per_channel)
        else:
            extra = _make_fp16(bundle, out)
        return _calibrate_and_add(bundle, precision, out, cal_images, extra)


def add_to_bundle(
    bundle_dir: str | os.PathLike,
    precision: str,
    *,
    engine: str | None = None,
    quant_images: np.ndarray | None = None,
    quant_source: str | None = None,
    timing_cache: str | os.PathLike | None = None,
    engine_max_batch: int = MICRO_BATCH_LIMIT,
    trt_info: dict[str, Any] | None = None,
) -> Bundle:
    """Add a ``precision`` variant to the bundle at ``bundle_dir``, each with its own quantile: the
    int8/fp16 onnxruntime variant (:func:`add_precision_variant`) and, with ``engine="tensorrt"``, a
    TensorRT engine built here from the bundle's ONNX of that precision
    (:func:`rrise.export.engine.add_engine`; an existing int8/fp16 ONNX variant is reused).

    ``trt_info`` (:func:`rrise.export.tensorrt_build.engine_info`) is looked up first when not given,
    so a machine without TensorRT fails before the bundle changes. Raises ValueError, RuntimeError
    or BundleError naming the problem.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if engine not in (None, "tensorrt"):
        raise ValueError(f"engine must be 'tensorrt' or None, got {engine!r}")
    if engine is None and precision == "fp32":
        raise ValueError("every bundle has its fp32 variant already; add an engine, or an int8/fp16 variant")
    if engine is not None and trt_info is None:
        from . import tensorrt_build

        trt_info = tensorrt_build.engine_info()
    bundle = Bundle.load(bundle_dir)
    have_onnx = any(
        (v.get("precision"), v.get("backend")) == (precision, "onnxruntime")
        for v in bundle.manifest["variants"]
    )
    if precision != "fp32" and not (engine is not None and have_onnx):
        bundle = add_precision_variant(
            bundle.path, precision, quant_images=quant_images, quant_source=quant_source
        )
    if engine is not None:
        bundle = add_engine(
            bundle.path, precision, timing_cache=timing_cache, max_batch=engine_max_batch, info=trt_info
        )
    return bundle


def add_variant_options(
    bundle_dir: str | os.PathLike, options: VariantOptions, *, trt_info: dict[str, Any] | None = None
) -> Bundle:
    """What ``rrise-export add-variant`` does with its options: read ``--quant-data`` (a selection
    split; refused if it is or shares an image with the bundle's ``calibration.npz``), then
    :func:`add_to_bundle`.

    Parameters
    ----------
    bundle_dir : str or os.PathLike
        The bundle to add to (rewritten atomically).
    options : VariantOptions
        The variant's precision, engine, quantization data and engine settings
        (:mod:`rrise.export.options`).
    trt_info : dict or None
        :func:`rrise.export.tensorrt_build.engine_info`, when already looked up.

    Returns
    -------
    rrise.Bundle
        The bundle with the variant added.

    Raises
    ------
    ValueError, RuntimeError, rrise.BundleError
        Naming the problem; the bundle is unchanged then.
    """
    options.check_for(new_bundle=False)
    quant, source = None, None
    if options.quant_data is not None:
        cal_npz = Bundle.load(bundle_dir).file(CALIBRATION_FILE)
        quant = selection_images(options.quant_data, cal_npz, max_images=options.quant_samples)
        source = options.quant_data.name
    return add_to_bundle(
        bundle_dir,
        options.precision.value,
        engine=None if options.engine is None else options.engine.value,
        quant_images=quant,
        quant_source=source,
        timing_cache=options.timing_cache,
        engine_max_batch=options.max_batch,
        trt_info=trt_info,
    )
