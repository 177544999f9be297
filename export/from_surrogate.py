"""A calibrated surrogate → a verified bundle: what ``rrise-export bundle`` does.

:func:`bundle_from_surrogate` takes the surrogate's ONNX — the very file whose probabilities the calibration
was computed from (its sha256 is the record's ``surrogate_sha256``), so nothing is re-exported —
reads the checkpoint beside it (``surrogate.pt``: σ, labels, input shape, preprocessing, read with
``torch.load(weights_only=True)`` and no model code), cross-checks σ against the calibration record
and packs the fp32 bundle (:func:`rrise.export.bundler.pack_bundle`). Its inputs are
:class:`rrise.export.options.BundleInputs`, the options of ``rrise-export bundle``. Every check runs before
anything is written. Export never imports the calibrate stage.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rrise.bundle import Bundle
from rrise.calibration import Calibration
from rrise.fileio import load_npz

from .bundler import BundleSources, default_preprocess, pack_bundle
from .options import BundleInputs

__all__ = [
    "ExportResult",
    "SigmaMismatchError",
    "bundle_from_surrogate",
    "check_sigma",
    "export_bundle",
    "read_surrogate",
    "read_calibration_record",
    "surrogate_input_shape",
]

MODEL_FORMAT = "rrise.model/1"  # the checkpoint format of rrise.calibrate.model_files.save_model


class SigmaMismatchError(ValueError):
    """The calibration record and the surrogate disagree on σ."""


@dataclass(frozen=True)
class ExportResult:
    bundle: Bundle
    calibration: Calibration  # the record the bundle was built from
    parity: float | None  # max |logits torch − onnxruntime| as the checkpoint records it, if it does
    notes: tuple[str, ...] = ()  # what was assumed (e.g. default labels), for the user


def read_calibration_record(path: str | os.PathLike) -> Calibration:
    """The :class:`rrise.Calibration` in ``calibration.json``; ValueError naming the file otherwise."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    try:
        return Calibration.from_dict(record)
    except ValueError as exc:
        raise ValueError(f"{path} is not a calibration record: {exc}") from None


def read_surrogate(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(ONNX path, metadata)`` of a surrogate given as its ``.onnx`` or its ``.pt`` checkpoint: the
    two files live side by side (``rrise train-surrogate`` writes both); the metadata is the
    checkpoint's (empty when there is none beside an ``.onnx``)."""
    path = Path(path)
    onnx_path, checkpoint = (
        (path, path.with_suffix(".pt")) if path.suffix == ".onnx" else (path.with_suffix(".onnx"), path)
    )
    if not onnx_path.is_file():
        raise ValueError(
            f"the surrogate's ONNX {onnx_path} does not exist: pass the .onnx that was calibrated "
            "(rrise train-surrogate writes it beside the .pt)"
        )
    return onnx_path, (_checkpoint_meta(checkpoint) if checkpoint.is_file() else {})


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(f"reading {path} needs torch ({exc}): pip install 'rrise[export]'") from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a foreign file
        raise ValueError(f"cannot read the surrogate checkpoint {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an rrise model file (expected format {MODEL_FORMAT!r})")
    return {**payload.get("meta", {}), **payload.get("config", {})}


def _onnx_input_shape(onnx_path: Path) -> tuple[int, int, int]:
    from rrise.onnx_session import open_session

    shape = open_session(onnx_path, "onnxruntime-cpu").get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise ValueError(f"{onnx_path} takes {shape}: export needs a fixed [C, H, W] input")
    return int(shape[1]), int(shape[2]), int(shape[3])


def check_sigma(calibration: Calibration, meta: dict[str, Any], *, record: str, surrogate: str) -> bool:
    """Refuse (SigmaMismatchError) a surrogate trained for another σ than the calibration's.

    A quantile holds only for the noise level its MC counts were drawn with, and the surrogate
    predicts the smoothed classifier at its own σ: a mismatch would certify the wrong radii.
    Returns False when the surrogate records no σ (nothing to check against), True otherwise.
    """
    sigma = meta.get("sigma")
    if sigma is None:
        return False
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"the surrogate {surrogate} records sigma={sigma!r}, not a number") from None
    if not math.isclose(sigma, calibration.sigma, rel_tol=1e-9, abs_tol=1e-12):
        raise SigmaMismatchError(
            f"sigma mismatch: the calibration record {record} has sigma={calibration.sigma:g}, but the "
            f"surrogate {surrogate} was trained for sigma={sigma:g}; a quantile holds only for the "
            "noise level its MC counts were drawn with. Calibrate this surrogate at its own sigma, or "
            "pass the surrogate and calibration record of one run"
        )
    return True


def surrogate_input_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """The model input ``(C, H, W)`` a surrogate's metadata records."""
    try:
        if "input_shape" in meta:
            c, h, w = (int(d) for d in meta["input_shape"])
        else:
            size = meta["image_size"]
            h, w = (size, size) if isinstance(size, int) else size
            c = meta["in_channels"]
        return int(c), int(h), int(w)
    except (KeyError, TypeError, ValueError):
        raise ValueError("the surrogate does not record its input shape (in_channels, image_size)") from None


def _labels(labels: list[str] | None, meta: dict[str, Any], surrogate: str) -> tuple[list[str], list[str]]:
    """Class names: given, else the surrogate's, else 0..K-1 (with a note saying so)."""
    if labels is not None:
        return [str(s) for s in labels], []
    if meta.get("labels"):
        return [str(s) for s in meta["labels"]], []
    k = int(meta.get("num_classes", 0))
    return [str(i) for i in range(k)], [f"{surrogate} names no labels; using 0..{k - 1}"]


def calibration_classes(calibration_npz: str | os.PathLike) -> int:
    """The class count K of the calibration counts [m, K]."""
    return int(load_npz(calibration_npz, ("counts",), "calibration file")["counts"].shape[1])


def bundle_from_surrogate(inputs: BundleInputs, calibration: Calibration | None = None) -> ExportResult:
    """Build the fp32 bundle at ``inputs.out`` from a surrogate checkpoint and its calibration:
    what ``rrise-export bundle`` does.

    ``inputs.calibration`` holds the calibration ``images`` and full MC ``counts``; ``inputs.base``
    is the base classifier's ONNX (kept for audits). Labels default to the surrogate's, the dataset
    to the record's, then the surrogate's. σ is checked (:func:`check_sigma`), and every input,
    before anything is written.

    Parameters
    ----------
    inputs : BundleInputs
        The files and choices of ``rrise-export bundle`` (:mod:`rrise.export.options`).
    calibration : rrise.Calibration or None
        The record; read from ``inputs.calibration_record`` when None.

    Returns
    -------
    ExportResult
        The verified bundle, the record it was built from, the export parity and notes on what was
        assumed.

    Raises
    ------
    SigmaMismatchError
        The surrogate was trained for another σ than the record's.
    ValueError
        A missing input, an unreadable record, inconsistent files.
    FileExistsError
        ``inputs.out`` exists and ``inputs.overwrite`` is not set.
    RuntimeError
        torch is missing to read a ``.pt`` checkpoint.
    """
    missing = [f for f in inputs.missing() if not (f == "--calibration-record" and calibration is not None)]
    if missing:
        raise ValueError(f"building a bundle needs {', '.join(missing)}")
    record_name = "the calibration record"
    if inputs.calibration_record is not None:
        record_name = str(inputs.calibration_record)
    if calibration is None:
        calibration = read_calibration_record(inputs.calibration_record)
    return _bundle(inputs, calibration, record_name, inputs.label_names)


def _bundle(
    inputs: BundleInputs, calibration: Calibration, record_name: str, labels: list[str] | None
) -> ExportResult:
    out = Path(inputs.out)
    if out.exists() and not inputs.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    surrogate = str(inputs.surrogate)
    onnx_path, meta = read_surrogate(inputs.surrogate)
    notes = []
    if not check_sigma(calibration, meta, record=record_name, surrogate=surrogate):
        notes.append(f"{surrogate} records no sigma; it was not cross-checked with {record_name}")
    shape = surrogate_input_shape(meta) if meta else _onnx_input_shape(onnx_path)
    names, label_notes = _labels(
        labels, meta or {"num_classes": calibration_classes(inputs.calibration)}, surrogate
    )
    dataset = inputs.dataset or calibration.dataset or meta.get("dataset")
    if not dataset:
        raise ValueError(
            "neither the calibration record nor the surrogate names the calibration data: pass --dataset"
        )
    parity = meta.get("onnx_parity")
    sources = BundleSources(
        surrogate_onnx=onnx_path,
        base_onnx=inputs.base,
        calibration=calibration,
        calibration_npz=inputs.calibration,
        labels=names,
        preprocess=meta.get("preprocess") or default_preprocess(shape),
        dataset=dataset,
        input_shape=shape,
        parity_max_abs_diff=None if parity is None else float(parity),
    )
    bundle = pack_bundle(out, sources, overwrite=inputs.overwrite)
    return ExportResult(
        bundle, calibration, None if parity is None else float(parity), tuple(notes + label_notes)
    )


def export_bundle(surrogate: str | os.PathLike, **kwargs: Any) -> ExportResult:
    """Deprecated: :func:`bundle_from_surrogate`. Takes the keywords of earlier releases: ``base``,
    ``calibration_npz``, ``calibration`` (the record), ``out``, ``labels`` (a list), ``dataset``,
    ``overwrite`` and ``record_name``."""
    warnings.warn(
        "rrise.export.from_surrogate.export_bundle is deprecated: "
        "use bundle_from_surrogate(BundleInputs(...))",
        DeprecationWarning,
        stacklevel=2,
    )
    inputs = BundleInputs(
        surrogate=Path(surrogate),
        base=Path(kwargs["base"]),
        calibration=Path(kwargs["calibration_npz"]),
        out=Path(kwargs["out"]),
        dataset=kwargs.get("dataset"),
        overwrite=bool(kwargs.get("overwrite", False)),
    )
    labels = kwargs.get("labels")
    record_name = kwargs.get("record_name", "the calibration record")
    return _bundle(inputs, kwargs["calibration"], record_name, None if labels is None else list(labels))
