"""A precision variant's quantile from its own outputs on the bundle's calibration inputs.

A conformal quantile holds only for the numerics it was computed with (docs/CERTIFICATE.md,
"Numerics"), so each variant's q̂ comes from that variant's own batch-1 probabilities on the images
of ``calibration.npz``, scored against the full MC count vectors stored beside them: a variant that
picks another class than fp32 is scored against that class's count. This module is the one home of
that recomputation: export uses it to give a new variant its quantile (:func:`calibration_outputs`,
:func:`variant_recalibration`) and ``rrise inspect --verify`` to check every recorded one with its
monitor reference (:func:`verify_quantiles`), the record against the arrays and the counts against
fresh draws of the base model (:func:`verify_counts`). numpy and onnxruntime only
(:mod:`rrise.onnx_session`); a TensorRT engine runs through :mod:`rrise.trt_session` where it was built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, BundleError
from .calibration import Calibration
from .count_check import SpotCheckOptions, spot_check_counts
from .fileio import load_npz
from .numerics import MICRO_BATCH_LIMIT, to_probs
from .onnx_session import open_session

__all__ = [
    "CALIBRATION_FILE",
    "NOT_VERIFIABLE",
    "calibration_images",
    "calibration_outputs",
    "check_calibration_arrays",
    "micro_batched",
    "monitor_differences",
    "onnx_probs_runner",
    "read_calibration_npz",
    "record_problems",
    "variant_recalibration",
    "verify_counts",
    "verify_quantiles",
]

CALIBRATION_FILE = "calibration.npz"


def onnx_probs_runner(
    path: str | os.PathLike | bytes, calibrated_with: str = "onnxruntime-cpu", output_kind: str = "logits"
):
    """A function ``[B, C, H, W] float32 → [B, K] float64 probabilities`` running the ONNX model at
    ``path`` exactly as a variant ``calibrated_with`` this runs at deployment (one session factory),
    its output read as ``output_kind`` (``logits`` or ``probs``) as the runtime reads it."""
    session = open_session(path, calibrated_with)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return to_probs(session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0], output_kind)

    return run


def calibration_outputs(
    run: Callable[[np.ndarray], np.ndarray], images: np.ndarray
) -> tuple[np.ndarray, int]:
    """A variant's probabilities on the calibration ``images`` at batch size 1 (the runtime's
    per-frame path), and the largest runtime micro-batch whose outputs are bit-identical to them.

    ``run`` maps ``[B, C, H, W]`` float32 to ``[B, K]`` probabilities. The returned ``max_batch`` is
    :data:`rrise.numerics.MICRO_BATCH_LIMIT` when every batch of that size (the last one may be
    shorter) reproduces the batch-1 outputs exactly, else 1: a quantile holds only for the numerics
    it was computed with, so the runtime must never run this variant in larger batches.
    """
    x = np.ascontiguousarray(images, dtype=np.float32)
    probs = np.concatenate([np.asarray(run(x[i : i + 1]), dtype=np.float64) for i in range(len(x))])
    step = MICRO_BATCH_LIMIT
    for i in range(0, len(x), step):
        batched = np.asarray(run(x[i : i + step]), dtype=np.float64)
        if not np.array_equal(batched, probs[i : i + step]):
            return probs, 1
    return probs, step


def read_calibration_npz(path: Path | bytes) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(counts, cap_counts, images)`` of a ``calibration.npz``, read without unpickling;
    ``cap_counts`` (the second-stage draws at the cap) is None for a calibration without them."""
    z = load_npz(path, ("counts", "images"), "calibration file")
    return z["counts"], z.get("cap_counts"), z["images"]


def check_calibration_arrays(
    counts: np.ndarray, images: np.ndarray, calibration: Calibration, input_shape: tuple[int, ...]
) -> None:
    """Refuse (ValueError) calibration arrays that do not fit the record: integer counts ``[m, K]``
    with ``m`` rows, float32 images ``[m, *input_shape]`` with pixels in [0, 1]."""
    if counts.ndim != 2 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"calibration counts must be integer [m, K], got {counts.dtype} {counts.shape}")
    if len(counts) != calibration.m:
        raise ValueError(
            f"calibration.npz has {len(counts)} count rows but the calibration says m={calibration.m}"
        )
    if images.shape != (len(counts), *input_shape):
        want = [len(counts), *input_shape]
        raise ValueError(f"calibration images must be [m, C, H, W] = {want}, got {list(images.shape)}")
    if images.dtype != np.float32:
        raise ValueError(f"calibration images must be float32 (what the model sees), got {images.dtype}")
    if images.size and (images.min() < 0 or images.max() > 1 or not np.all(np.isfinite(images))):
        raise ValueError("calibration images must be pixels in [0, 1]")


def calibration_images(bundle: Bundle) -> np.ndarray:
    """The bundle's calibration images ``[m, C, H, W]`` (``calibration.npz``, read without unpickling)."""
    if CALIBRATION_FILE not in bundle.manifest["files"]:
        raise BundleError(f"bundle {bundle.path} has no {CALIBRATION_FILE}; it cannot be recalibrated")
    return load_npz(bundle.read_verified(CALIBRATION_FILE), ("images",), "calibration file")["images"]


def micro_batched(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """``run`` over ``images`` in the runtime's micro-batches: a diagnostic reference (agreement,
    parity), not calibration outputs (those come from :func:`calibration_outputs`)."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    step = MICRO_BATCH_LIMIT
    return np.concatenate(
        [np.asarray(run(x[i : i + step]), dtype=np.float64) for i in range(0, len(x), step)]
    )


def variant_recalibration(bundle: Bundle, probs: np.ndarray) -> Calibration:
    """The calibration of a variant whose probabilities on the bundle's calibration images
    (``calibration.npz['images']``, in order) are ``probs`` [m, K]: the bundle's own record
    (α, β, N, δ, score, bins, map) recomputed with those outputs against the stored full MC count
    vectors, so a variant that picks another class than fp32 is scored against that class's count."""
    if CALIBRATION_FILE not in bundle.manifest["files"]:
        raise BundleError(f"bundle {bundle.path} has no {CALIBRATION_FILE}; it cannot be recalibrated")
    counts, cap_counts, _ = read_calibration_npz(bundle.read_verified(CALIBRATION_FILE))
    if np.shape(probs) != counts.shape:
        raise ValueError(
            f"probs must be [m, K] = {list(counts.shape)} (the variant on the bundle's calibration "
            f"images, in order), got {list(np.shape(probs))}"
        )
    return bundle.calibration().recalibrate(probs, counts, cap_counts=cap_counts)


# --- rrise inspect --verify ------------------------------------------------------------------------
NOT_VERIFIABLE = "not verifiable on this machine"


def verify_quantiles(bundle: Bundle) -> list[dict[str, Any]]:
    """Recompute every variant's quantile from ``calibration.npz`` and that variant's own model, as
    it was calibrated (batch-1 outputs on the numerics of its ``calibrated_with``), and compare.

    One result per variant: ``variant`` (precision/backend), ``file``, ``status`` (``ok``,
    ``mismatch``, ``uncalibrated`` or :data:`NOT_VERIFIABLE` for a TensorRT engine or numerics this
    machine lacks), ``recorded`` and ``recomputed`` quantiles, and ``detail`` (what differs, or why
    it cannot be checked). A variant is ``ok`` only when its quantile (and each confidence-bin
    quantile) agrees to 1e-6 and its ``max_batch`` is reproduced."""
    if CALIBRATION_FILE not in bundle.manifest["files"]:
        raise BundleError(f"bundle {bundle.path} has no {CALIBRATION_FILE}; its quantiles cannot be verified")
    counts, cap_counts, images = read_calibration_npz(bundle.read_verified(CALIBRATION_FILE))
    record = bundle.calibration()
    check_calibration_arrays(counts, images, record, tuple(images.shape[1:]))
    if counts.shape[1] != bundle.num_classes:
        raise BundleError(
            f"{CALIBRATION_FILE} of bundle {bundle.path} counts {counts.shape[1]} classes, but the "
            f"manifest says num_classes = {bundle.num_classes}"
        )
    counts_by_stage = (counts, cap_counts)
    return [_verify_variant(bundle, v, images, counts_by_stage, record) for v in bundle.manifest["variants"]]


def _verify_variant(
    bundle: Bundle,
    v: dict[str, Any],
    images: np.ndarray,
    counts_by_stage: tuple[np.ndarray, np.ndarray | None],
    record: Calibration,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "variant": f"{v['precision']}/{v['backend']}",
        "file": v["file"],
        "recorded": v["quantile"],
        "recomputed": None,
    }
    if v["quantile"] is None:
        return {**out, "status": "uncalibrated", "detail": v.get("needs_recalibration")}
    if v["backend"] == "tensorrt":
        why = "a TensorRT engine runs only where it was built; rebuild it there to recompute its quantile"
        return {**out, "status": NOT_VERIFIABLE, "detail": why}
    kind = v.get("output_kind") or bundle.manifest["model"]["output"]["kind"]
    try:
        model = bundle.read_verified(v["file"], v.get("sha256"))  # the bytes checked are the bytes run
        run = onnx_probs_runner(model, v["calibrated_with"], output_kind=kind)
    except RuntimeError as exc:  # e.g. onnxruntime-cuda numerics on a machine without CUDA
        return {**out, "status": NOT_VERIFIABLE, "detail": str(exc)}
    probs, max_batch = calibration_outputs(run, images)
    counts, cap_counts = counts_by_stage
    fresh = record.recalibrate(probs, counts, cap_counts=cap_counts)
    recorded = bundle.calibration(v)
    out["recomputed"] = fresh.quantile
    differs = [
        f"{name} {a:.9g} recorded, {b:.9g} recomputed"
        for name, a, b in [
            ("quantile", recorded.quantile, fresh.quantile),
            *(
                (f"bin_quantiles[{i}]", a, b)
                for i, (a, b) in enumerate(zip(recorded.bin_quantiles, fresh.bin_quantiles))
            ),
        ]
        if not (a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6))
    ]
    differs += monitor_differences(v.get("monitor"), probs, images, recorded)
    if int(v["max_batch"]) > max_batch:
        differs.append(
            f"max_batch {v['max_batch']} recorded, but only batch size {max_batch} reproduces its outputs"
        )
    if differs:
        return {**out, "status": "mismatch", "detail": "; ".join(differs)}
    return {**out, "status": "ok", "detail": None}


def _same(a: Any, b: Any) -> bool:
    """Whether two manifest values agree, numbers to 1e-6 (JSON keeps what the bundler wrote)."""
    try:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        return a == b
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=1e-6, atol=1e-6, equal_nan=True))


def monitor_differences(
    monitor: dict[str, Any] | None, probs: np.ndarray, images: np.ndarray, calibration: Calibration
) -> list[str]:
    """What a variant's ``monitor`` entry records that its own ``probs`` on the calibration
    ``images`` do not give: the shift reference (bin edges and counts of ŝ, abstentions, m) and the
    out-of-distribution reference (:func:`rrise.ood.ood_reference`: every key, its fit and sorted
    reference scores included).
    The simulated thresholds are not recomputed."""
    from .certificate import certify_from_probs
    from .ood import ood_reference

    if not monitor:
        return []
    out: list[str] = []
    cert = certify_from_probs(probs, calibration)
    score = np.asarray(cert.score, dtype=np.float64)
    edges = np.asarray(monitor.get("edges") or [], dtype=np.float64)
    counts = np.bincount(np.searchsorted(edges, score, side="right"), minlength=len(edges) + 1)
    if not _same(counts, monitor.get("counts")) or monitor.get("m") != len(score):
        out.append("monitor.counts (the shift reference) do not follow from the variant's outputs")
    abstain = int(np.count_nonzero(cert.abstain))
    if monitor.get("abstain") != abstain:
        out.append(f"monitor.abstain {monitor.get('abstain')} recorded, {abstain} recomputed")
    stored = monitor.get("ood")
    if stored:
        fresh = ood_reference(images, probs, version=int(stored.get("version", 1)))
        bad = [k for k in sorted({*stored, *fresh}) if not _same(stored.get(k), fresh.get(k))]
        if bad:
            out.append(
                f"monitor.ood ({', '.join(bad)}) does not follow from the calibration images and outputs"
            )
    return out


def record_problems(
    bundle: Bundle, counts: np.ndarray, cap_counts: np.ndarray | None, images: np.ndarray
) -> list[str]:
    """Every disagreement between the manifest (σ, labels, num_classes, input shape), the
    calibration record (σ, N, m, cap draws) and the arrays of ``calibration.npz``; empty when they
    all agree."""
    m, record = bundle.manifest, bundle.calibration()
    k = bundle.num_classes
    out: list[str] = []
    sigma, cal_sigma = m["smoothing"]["sigma"], m["calibration"].get("sigma")
    if cal_sigma is not None and float(cal_sigma) != float(sigma):
        out.append(f"calibration.sigma {cal_sigma} differs from smoothing.sigma {sigma}")
    labels = m["model"].get("labels")
    if labels is not None and len(labels) != k:
        out.append(f"{len(labels)} labels for num_classes = {k}")
    if counts.ndim != 2 or counts.shape[1] != k:
        out.append(f"counts are {list(counts.shape)}, not [m, num_classes = {k}]")
    if len(counts) != record.m:
        out.append(f"{len(counts)} count rows, but the calibration says m = {record.m}")
    sums = counts.sum(axis=1) if counts.ndim == 2 else np.array([])
    if sums.size and not np.all(sums == record.n_mc):
        out.append(f"count rows sum to {sorted({int(s) for s in sums})[:3]}, not n_mc = {record.n_mc}")
    if (cap_counts is None) != (record.cap_draws is None):
        out.append(
            f"cap_counts {'missing' if cap_counts is None else 'present'}, cap_draws = {record.cap_draws}"
        )
    elif cap_counts is not None and not np.all(np.isin(cap_counts.sum(axis=1), [0, record.cap_draws])):
        out.append(f"cap_counts rows must sum to 0 or cap_draws = {record.cap_draws}")
    want = [len(counts), *(d for d in m["model"]["input"]["shape"][1:])]
    if len(want) != images.ndim or any(w is not None and w != g for w, g in zip(want, images.shape)):
        out.append(f"images are {list(images.shape)}, not {want} (m and the model input)")
    return out


def verify_counts(bundle: Bundle, options: SpotCheckOptions | None = None) -> dict[str, Any]:
    """The calibration record checked against ``calibration.npz`` (``record``: the list of
    :func:`record_problems`) and the stored counts against fresh draws through the base model at the
    manifest's σ (``spot_check``: :func:`rrise.count_check.spot_check_counts`; None when the record
    already disagrees with the arrays)."""
    if CALIBRATION_FILE not in bundle.manifest["files"]:
        raise BundleError(f"bundle {bundle.path} has no {CALIBRATION_FILE}; its counts cannot be verified")
    counts, cap_counts, images = read_calibration_npz(bundle.read_verified(CALIBRATION_FILE))
    problems = record_problems(bundle, counts, cap_counts, images)
    if problems:
        return {"record": problems, "spot_check": None}
    return {"record": [], "spot_check": spot_check_counts(bundle, counts, images, options)}
