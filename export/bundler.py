"""Assemble a bundle and give every precision variant its own conformal quantile.

A bundle is published whole or not at all: it is built in a temp folder next to its destination,
verified with :meth:`rrise.Bundle.load`, and renamed into place. Adding a variant later works the
same way on a hard-linked copy, so a crash never leaves a half-written bundle at the destination.

Engine-aware recalibration (docs/CERTIFICATE.md, "Numerics"): a quantile holds only for the numerics
it was computed with, so each variant's q̂ comes from that variant's own probabilities on the
calibration inputs, scored against the full MC count vectors stored in ``calibration.npz``. This
module runs no torch; onnxruntime is imported only to run the fp32 ONNX.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rrise import __version__
from rrise.bundle import GUARANTEE, MANIFEST, SCHEMA_VERSION, Bundle, BundleError, _umask, write_manifest
from rrise.certificate import Calibration, p_cap

from .onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_logits

__all__ = [
    "CALIBRATION_FILE",
    "PREPROCESS_KEYS",
    "add_variant",
    "build_bundle",
    "default_preprocess",
    "recalibrate_variant",
    "softmax",
    "variant_quantile",
]

SURROGATE_FILE = "surrogate.onnx"
BASE_FILE = "base.onnx"
CALIBRATION_FILE = "calibration.npz"
PREPROCESS_KEYS = ("color", "resize", "interpolation", "layout")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (shifted by the row maximum, so it never overflows)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def default_preprocess(input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The manifest ``preprocess`` for a model trained on dataset images as they are: grey (C=1) or
    RGB (C=3) frames, resized to the model's H×W with area interpolation, fed as NCHW."""
    c, h, w = (int(d) for d in input_shape)
    if c not in (1, 3):
        raise ValueError(f"no default preprocessing for {c}-channel inputs; pass preprocess explicitly")
    return {"color": "gray" if c == 1 else "rgb", "resize": [h, w], "interpolation": "area", "layout": "NCHW"}


def variant_calibration(probs: np.ndarray, counts: np.ndarray, template: Calibration) -> Calibration:
    """One variant's calibration: ``template``'s settings (σ, α, β, N, score, δ, confidence-bin
    edges) with the quantile(s) recomputed from the variant's own ``probs`` [m, K] on the
    calibration inputs, scored against the full MC count vectors ``counts`` [m, K].

    ``Â_i = argmax probs[i]``, so a variant that picks another class than fp32 is scored against that
    class's count. Guarantee: deployed with the same numerics, the variant's certificates carry the
    1 − α − β guarantee (rrise.calibrate.conformal.calibrate_from_counts). Raises ValueError on
    mismatched shapes, non-probabilities, or counts that do not add up to N.
    """
    from rrise.calibrate.conformal import calibrate_from_counts  # numpy + scipy: no torch

    p = np.asarray(probs, dtype=np.float64)
    k = np.asarray(counts)
    if p.ndim != 2 or k.ndim != 2 or p.shape != k.shape:
        raise ValueError(f"probs {p.shape} and counts {k.shape} must both be [m, K]")
    if not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"counts must be integers, got {k.dtype}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1 or not np.allclose(p.sum(1), 1, atol=1e-3):
        raise ValueError("probs must be probabilities (rows of a softmax), not logits")
    n_mc = template.n_mc
    bad = np.flatnonzero((k.sum(axis=1) != n_mc) | (k.min(axis=1) < 0))
    if bad.size:
        row = k[bad[0]]
        raise ValueError(
            f"counts row {bad[0]} sums to {int(row.sum())} with min {int(row.min())}; every row must be "
            f"non-negative and sum to n_mc={n_mc} (the MC draws per calibration input)"
        )
    return calibrate_from_counts(
        p,
        k,
        n_mc=n_mc,
        sigma=template.sigma,
        alpha=template.alpha,
        beta=template.beta,
        score=template.score,
        delta=template.delta,
        bin_edges=template.bin_edges,
        score_map=template.score_map,
    )


def variant_quantile(
    probs: np.ndarray,
    counts: np.ndarray,
    *,
    n_mc: int,
    alpha: float,
    beta: float,
    score: str = "probit",
) -> float:
    """The single conformal quantile q̂ of one variant (see :func:`variant_calibration`)."""
    template = Calibration(
        sigma=1.0, quantile=0.0, alpha=alpha, beta=beta, n_mc=n_mc, m=len(probs), score=score
    )
    return variant_calibration(probs, counts, template).quantile


def _variant_quantile_keys(cal: Calibration) -> dict[str, Any]:
    """A variant entry's quantile keys: ``quantile``, and ``bin_quantiles`` when calibrated by bins."""
    keys: dict[str, Any] = {"quantile": float(cal.quantile)}
    if cal.bin_edges:
        keys["bin_quantiles"] = cal.to_dict()["bin_quantiles"]
    return keys


def _read_calibration_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable .npz file: {exc}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz with counts and images")
    with z:
        missing = [k for k in ("counts", "images") if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)} (has {', '.join(z.files)})")
        return z["counts"], z["images"]


def _check_calibration_arrays(
    counts: np.ndarray, images: np.ndarray, calibration: Calibration, input_shape: tuple[int, ...]
) -> None:
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


def _check_onnx(path: Path, input_shape: tuple[int, ...], num_classes: int, role: str, names: bool) -> None:
    """Load ``path`` in onnxruntime and check it maps [B, C, H, W] to [B, K]."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValueError(f"{role} {path} is not a loadable ONNX model: {exc}") from None
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(ins) != 1 or len(outs) != 1:
        raise ValueError(f"{role} {path} must have one input and one output")
    if names and (ins[0].name != INPUT_NAME or outs[0].name != OUTPUT_NAME):
        raise ValueError(
            f"{role} {path} must take '{INPUT_NAME}' and return '{OUTPUT_NAME}' "
            f"(has {ins[0].name!r} -> {outs[0].name!r}); export it with rrise.export.export_onnx"
        )
    shape = list(ins[0].shape)  # onnxruntime gives a symbolic dimension as a str or None
    if len(shape) != 4 or (names and isinstance(shape[0], int)):
        raise ValueError(f"{role} {path} input must be [batch, C, H, W] with a dynamic batch, got {shape}")
    if any(isinstance(d, int) and d != want for d, want in zip(shape[1:], input_shape, strict=True)):
        raise ValueError(f"{role} {path} takes {shape}, but the bundle's input is [batch, {input_shape}]")
    out = list(outs[0].shape)
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != num_classes):
        raise ValueError(f"{role} {path} returns {out}, but the calibration has {num_classes} classes")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir``, replacing an old bundle there."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; refusing to replace it")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(
            f"{out_dir} is not an rrise bundle (no {MANIFEST}); refusing to replace its contents"
        )


def _temp_folder(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0o700; a bundle is for others to read
    return tmp


def build_bundle(
    out_dir: str | os.PathLike,
    *,
    surrogate_onnx: str | os.PathLike,
    base_onnx: str | os.PathLike,
    calibration: Calibration,
    calibration_npz: str | os.PathLike,
    labels: list[str],
    preprocess: dict[str, Any],
    dataset: str,
    input_shape: tuple[int, int, int],
    parity_max_abs_diff: float | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle folder at ``out_dir`` and return it, loaded and verified.

    The folder holds ``surrogate.onnx``, ``base.onnx``, ``calibration.npz`` (a byte copy of
    ``calibration_npz``, which needs ``counts`` int [m, K] summing to ``n_mc`` per row and ``images``
    float32 [m, C, H, W]) and ``manifest.json`` with every key of the manifest format. The manifest's
    ``calibration.quantile`` is the given record's; the fp32 onnxruntime variant gets its own q̂,
    recomputed from ``surrogate.onnx``'s outputs on the calibration images (engine-aware).

    Guarantees: nothing is written at ``out_dir`` unless the whole bundle was built and passed
    :meth:`Bundle.load`; an existing ``out_dir`` is replaced only with ``overwrite=True`` and only if
    it is an rrise bundle (or empty). Raises ValueError on inconsistent inputs (shapes, class count,
    m, counts) and FileExistsError when refusing to overwrite.
    """
    out_dir = Path(out_dir)
    surrogate_onnx, base_onnx, calibration_npz = Path(surrogate_onnx), Path(base_onnx), Path(calibration_npz)
    _check_replaceable(out_dir, overwrite)
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be an rrise.Calibration, got {type(calibration).__name__}")
    if not math.isfinite(calibration.quantile):
        raise ValueError(
            f"the calibration quantile is {calibration.quantile}: every certificate would abstain"
        )
    cap = p_cap(calibration.beta, calibration.n_mc)
    if not math.isclose(calibration.p_cap, cap, rel_tol=1e-12):
        raise ValueError(f"calibration p_cap {calibration.p_cap} is not beta^(1/n_mc) = {cap}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    missing = [k for k in PREPROCESS_KEYS if k not in preprocess]
    if missing:
        raise ValueError(f"preprocess lacks {', '.join(missing)} (needs {', '.join(PREPROCESS_KEYS)})")
    if not isinstance(dataset, str) or not dataset:
        raise ValueError("dataset must name the calibration data, e.g. 'fashion-mnist'")
    if parity_max_abs_diff is not None and not (
        math.isfinite(parity_max_abs_diff) and parity_max_abs_diff >= 0
    ):
        raise ValueError(f"parity_max_abs_diff must be a finite number >= 0, got {parity_max_abs_diff}")
    for role, f in (
        ("surrogate", surrogate_onnx),
        ("base model", base_onnx),
        ("calibration", calibration_npz),
    ):
        if not f.is_file():
            raise FileNotFoundError(f"{role} file {f} does not exist")

    counts, images = _read_calibration_npz(calibration_npz)
    _check_calibration_arrays(counts, images, calibration, shape)
    num_classes = counts.shape[1]
    labels = [str(label) for label in labels]
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given, but the calibration counts have {num_classes} classes")
    _check_onnx(surrogate_onnx, shape, num_classes, "surrogate", names=True)
    _check_onnx(base_onnx, shape, num_classes, "base model", names=False)
    base_out = onnx_logits(base_onnx, images[:2])
    if base_out.shape != (min(2, len(images)), num_classes):
        raise ValueError(f"base model {base_onnx} gives {base_out.shape} on two calibration images")
    probs = softmax(onnx_logits(surrogate_onnx, images))
    fp32 = variant_calibration(probs, counts, calibration)
    quantile = fp32.quantile
    if not math.isfinite(quantile):
        raise ValueError("the fp32 ONNX variant's quantile is infinite: every certificate would abstain")

    import onnxruntime as ort

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "rrise_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {
            "file": SURROGATE_FILE,
            "sha256": None,
            "input": {"name": INPUT_NAME, "shape": [None, *shape], "dtype": "float32", "range": [0.0, 1.0]},
            "output": {"name": OUTPUT_NAME, "kind": "logits"},
            "num_classes": num_classes,
            "labels": labels,
        },
        "preprocess": {k: preprocess[k] for k in PREPROCESS_KEYS},
        "smoothing": {"sigma": float(calibration.sigma)},
        "calibration": {
            "score": calibration.score,
            "alpha": float(calibration.alpha),
            "beta": float(calibration.beta),
            "m": int(calibration.m),
            "n_mc": int(calibration.n_mc),
            "quantile": float(calibration.quantile),
            "p_cap": float(calibration.p_cap),
            "dataset": dataset,
            **_optional_calibration_keys(calibration),
        },
        "base_model": {"file": BASE_FILE, "sha256": None},
        "variants": [
            {
                "precision": "fp32",
                "backend": "onnxruntime",
                "file": SURROGATE_FILE,
                "sha256": None,
                **_variant_quantile_keys(fp32),
                "calibrated_with": "onnxruntime-cpu",
                "monitor": _monitor_entry(probs, fp32),
            },
        ],
        "guarantee": GUARANTEE,
        "export": {
            "parity_max_abs_diff": None if parity_max_abs_diff is None else float(parity_max_abs_diff),
            "onnxruntime_version": ort.__version__,
        },
    }
    tmp = _temp_folder(out_dir)
    try:
        shutil.copyfile(surrogate_onnx, tmp / SURROGATE_FILE)
        shutil.copyfile(base_onnx, tmp / BASE_FILE)
        shutil.copyfile(calibration_npz, tmp / CALIBRATION_FILE)
        write_manifest(tmp, manifest)
        Bundle.load(tmp)
        _check_replaceable(out_dir, overwrite)  # again: something may have appeared meanwhile
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(out_dir)


def _optional_calibration_keys(calibration: Calibration) -> dict[str, Any]:
    """Calibration-record keys beyond the manifest format's, present only when used: the PAC δ and the
    confidence-bin edges and quantiles of a Mondrian calibration, the knots of a learned score map."""
    d = calibration.to_dict()
    keys: dict[str, Any] = {}
    if calibration.delta is not None:
        keys["delta"] = float(calibration.delta)
    if calibration.bin_edges:
        keys["bin_edges"] = d["bin_edges"]
        keys["bin_quantiles"] = d["bin_quantiles"]
    if calibration.score_map is not None:
        keys["score_map_x"] = d["score_map_x"]
        keys["score_map_y"] = d["score_map_y"]
    return keys


def _monitor_entry(probs: np.ndarray, calibration: Calibration) -> dict[str, Any]:
    """A variant's ``monitor`` entry: the calibration-time distribution of its top-class
    probability and abstentions, for the runtime's distribution-shift alarm (rrise.monitor)."""
    from rrise.monitor import reference_from_probs

    return reference_from_probs(probs, calibration)


def _bundle_variant_calibration(bundle: Bundle, probs: np.ndarray) -> Calibration:
    path = bundle.file(CALIBRATION_FILE)
    if CALIBRATION_FILE not in bundle.manifest["files"]:
        raise BundleError(f"bundle {bundle.path} has no {CALIBRATION_FILE}; it cannot be recalibrated")
    with np.load(path, allow_pickle=False) as z:
        counts = z["counts"]
    if np.shape(probs) != counts.shape:
        raise ValueError(
            f"probs must be [m, K] = {list(counts.shape)} (the variant on the bundle's calibration "
            f"images, in order), got {list(np.shape(probs))}"
        )
    return variant_calibration(probs, counts, bundle.calibration())


def recalibrate_variant(bundle_dir: str | os.PathLike, probs: np.ndarray) -> float:
    """The conformal quantile q̂ of a variant whose probabilities on the bundle's calibration images
    (``calibration.npz['images']``, in order) are ``probs`` [m, K].

    Uses the stored full MC count vectors, so a variant that picks a different class than fp32 on
    some inputs is scored against that class's count; α, β, N and the score transform come from the
    manifest. The bundle is verified first (Bundle.load). See :func:`variant_quantile`.
    """
    return _bundle_variant_calibration(Bundle.load(bundle_dir), probs).quantile


def add_variant(
    bundle_dir: str | os.PathLike,
    file: str | os.PathLike,
    *,
    precision: str,
    backend: str,
    probs: np.ndarray | None,
    name: str | None = None,
    **extra: Any,
) -> Bundle:
    """Add (or replace) the ``precision``/``backend`` variant: copy ``file`` into the bundle with the
    q̂ recalibrated from ``probs`` (that variant's own outputs on the calibration images) and
    ``extra`` keys (for engines: ``trt_version``, ``compute_capability``).

    ``probs=None`` records a variant that could not be run here: its ``quantile`` is null and
    ``extra`` must say why in ``needs_recalibration``; the runtime refuses to run it until it is
    recalibrated where it can run. The bundle is rebuilt in a hard-linked copy and renamed into
    place, so readers see the old bundle or the new one. Raises ValueError if the variant's quantile
    is infinite.
    """
    bundle = Bundle.load(bundle_dir)
    src = Path(file)
    if probs is None:
        if not extra.get("needs_recalibration"):
            raise ValueError(
                f"the {precision}/{backend} variant has no outputs to calibrate from: pass probs, or say "
                "why in needs_recalibration"
            )
        quantile, cal = None, None
    else:
        extra.pop("needs_recalibration", None)
        cal = _bundle_variant_calibration(bundle, probs)
        quantile = cal.quantile
        if not math.isfinite(quantile):
            raise ValueError(
                f"the {precision}/{backend} variant's quantile is infinite: it would always abstain"
            )
    name = name or f"surrogate.{precision}.{backend}{src.suffix}"
    manifest = dict(bundle.manifest)
    manifest.pop("files", None)
    kept = [v for v in manifest["variants"] if (v.get("precision"), v.get("backend")) != (precision, backend)]
    entries = [manifest["model"], manifest["base_model"], *kept]
    dropped = {v["file"] for v in manifest["variants"]} - {e["file"] for e in entries}
    keep_files = [f for f in bundle.manifest["files"] if f not in dropped]
    if name in keep_files:
        raise ValueError(f"{name} is already a file of bundle {bundle.path}; choose another name")
    manifest["variants"] = [
        *kept,
        {
            "precision": precision,
            "backend": backend,
            "file": name,
            "sha256": None,
            **({"quantile": None} if cal is None else _variant_quantile_keys(cal)),
            **({} if cal is None else {"monitor": _monitor_entry(probs, cal)}),
            **extra,
        },
    ]
    out_dir = bundle.path
    tmp = _temp_folder(out_dir)
    try:
        for rel in keep_files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(out_dir / rel, dst)
            except OSError:
                shutil.copyfile(out_dir / rel, dst)
        shutil.copyfile(src, tmp / name)
        write_manifest(tmp, manifest)
        Bundle.load(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(out_dir)
