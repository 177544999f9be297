"""Assemble a bundle and give every precision variant its own conformal quantile.

A bundle is published whole or not at all: it is built in a temp folder next to its destination,
verified with :meth:`rrise.Bundle.load`, and renamed into place. Adding a variant later works the
same way on a hard-linked copy, so a crash never leaves a half-written bundle at the destination.

Engine-aware recalibration (docs/CERTIFICATE.md, "Numerics"): a quantile holds only for the numerics
it was computed with, so each variant's q̂ comes from that variant's own probabilities on the
calibration inputs, scored against the full MC count vectors stored in ``calibration.npz``. This
module runs no torch; onnxruntime is imported only to run the fp32 ONNX. The recomputation itself
(:func:`calibration_outputs`, :func:`variant_recalibration`, :func:`verify_quantiles`) lives in
:mod:`rrise.recalibration`, shared with ``rrise inspect --verify``; it is re-exported here.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rrise import __version__
from rrise.bundle import MANIFEST, Bundle, bundle_guarantee, required_schema_version, write_manifest
from rrise.calibration import Calibration
from rrise.fileio import sha256_file, umask
from rrise.onnx_session import open_session
from rrise.recalibration import (
    CALIBRATION_FILE,
    NOT_VERIFIABLE,
    calibration_images,
    calibration_outputs,
    check_calibration_arrays,
    onnx_probs_runner,
    read_calibration_npz,
    variant_recalibration,
    verify_quantiles,
)

from .onnx_export import INPUT_NAME, OUTPUT_NAME

__all__ = [
    "CALIBRATION_FILE",
    "NOT_VERIFIABLE",
    "PREPROCESS_KEYS",
    "BundleSources",
    "add_file",
    "add_variant",
    "build_bundle",
    "pack_bundle",
    "calibration_outputs",
    "default_preprocess",
    "onnx_probs_runner",
    "recalibrate_variant",
    "variant_recalibration",
    "verify_quantiles",
]

SURROGATE_FILE = "surrogate.onnx"
BASE_FILE = "base.onnx"
PREPROCESS_KEYS = ("color", "resize", "interpolation", "layout")
OPTIONAL_PREPROCESS_KEYS = ("crop", "crop_fraction")  # centre crop, as the runtime applies it


def default_preprocess(input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The manifest ``preprocess`` for a model trained on dataset images as they are: grey (C=1) or
    RGB (C=3) frames, resized to the model's H×W with area interpolation, fed as NCHW."""
    c, h, w = (int(d) for d in input_shape)
    if c not in (1, 3):
        raise ValueError(f"no default preprocessing for {c}-channel inputs; pass preprocess explicitly")
    return {"color": "gray" if c == 1 else "rgb", "resize": [h, w], "interpolation": "area", "layout": "NCHW"}


def _variant_quantile_keys(cal: Calibration) -> dict[str, Any]:
    """A variant entry's quantile keys: ``quantile``, and ``bin_quantiles`` when calibrated by bins."""
    keys: dict[str, Any] = {"quantile": float(cal.quantile)}
    if cal.bin_edges:
        keys["bin_quantiles"] = cal.to_dict()["bin_quantiles"]
    return keys


def _check_onnx(path: Path, input_shape: tuple[int, ...], num_classes: int, role: str, names: bool) -> None:
    """Load ``path`` in onnxruntime and check it maps [B, C, H, W] to [B, K]."""
    try:
        session = open_session(path, "onnxruntime-cpu")
    except ValueError as exc:
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
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0o700; a bundle is for others to read
    return tmp


@dataclass(frozen=True, kw_only=True)
class BundleSources:
    """What a new bundle is made of (:func:`pack_bundle`); every value is checked here.

    Parameters
    ----------
    surrogate_onnx, base_onnx : Path
        The surrogate's ONNX (whose probabilities were calibrated) and the base classifier's ONNX
        (whose Monte Carlo counts were used; kept for audits).
    calibration : rrise.Calibration
        The record; its ``base_sha256``/``surrogate_sha256`` must be those of the two files.
    calibration_npz : Path
        ``counts`` int [m, K] summing to ``n_mc`` and ``images`` float32 [m, C, H, W].
    labels : tuple of str
        One name per class.
    preprocess : dict
        The manifest's ``preprocess`` (:data:`PREPROCESS_KEYS`, optionally ``crop``, ``crop_fraction``).
    dataset : str
        The calibration data's name.
    input_shape : tuple of int
        The model input ``(C, H, W)``.
    parity_max_abs_diff : float or None
        max |logits torch − onnxruntime| of the export, when known.
    adaptive : dict or None
        The manifest's ``adaptive`` entry (``{"routing": RoutingRule.to_dict()}``), when adaptive
        certification's routing rule was chosen; the guarantee text then states the composition.
    """

    surrogate_onnx: Path
    base_onnx: Path
    calibration: Calibration
    calibration_npz: Path
    labels: tuple[str, ...]
    preprocess: dict[str, Any]
    dataset: str
    input_shape: tuple[int, int, int]
    parity_max_abs_diff: float | None = None
    adaptive: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        for key in ("surrogate_onnx", "base_onnx", "calibration_npz"):
            put(self, key, Path(getattr(self, key)))
        put(self, "labels", tuple(str(label) for label in self.labels))
        cal = self.calibration
        if not isinstance(cal, Calibration):
            raise TypeError(f"calibration must be an rrise.Calibration, got {type(cal).__name__}")
        if not math.isfinite(cal.quantile):
            raise ValueError(
                f"the calibration quantile is {cal.quantile}: every certificate would abstain "
                "(more than an α share of the calibration inputs got no Monte Carlo vote for the "
                "surrogate's class; a surrogate that follows the base model more closely, more "
                "calibration images or a larger α would help)"
            )
        shape = tuple(int(d) for d in self.input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape!r}")
        put(self, "input_shape", shape)
        missing = [k for k in PREPROCESS_KEYS if k not in self.preprocess]
        if missing:
            raise ValueError(f"preprocess lacks {', '.join(missing)} (needs {', '.join(PREPROCESS_KEYS)})")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError("dataset must name the calibration data, e.g. 'fashion-mnist'")
        diff = self.parity_max_abs_diff
        if diff is not None and not (math.isfinite(diff) and diff >= 0):
            raise ValueError(f"parity_max_abs_diff must be a finite number >= 0, got {diff}")

    @property
    def files(self) -> dict[str, Path]:
        """The three input files by role."""
        return {
            "surrogate": self.surrogate_onnx,
            "base model": self.base_onnx,
            "calibration": self.calibration_npz,
        }


def _check_files(sources: BundleSources) -> None:
    for role, f in sources.files.items():
        if not f.is_file():
            raise FileNotFoundError(f"{role} file {f} does not exist")
    _check_provenance(sources.calibration, sources.base_onnx, sources.surrogate_onnx)


def _checked_calibration_data(
    files: dict[str, Path], calibration: Calibration, shape: tuple[int, int, int], num_labels: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The calibration counts (both stages) and images, checked against the record, the labels and
    both models."""
    counts, cap_counts, images = read_calibration_npz(files["calibration"])
    check_calibration_arrays(counts, images, calibration, shape)
    num_classes = counts.shape[1]
    if num_labels != num_classes:
        raise ValueError(f"{num_labels} labels given, but the calibration counts have {num_classes} classes")
    _check_onnx(files["surrogate"], shape, num_classes, "surrogate", names=True)
    _check_onnx(files["base model"], shape, num_classes, "base model", names=False)
    return counts, cap_counts, images


def _check_provenance(calibration: Calibration, base_onnx: Path, surrogate_onnx: Path) -> None:
    """The calibration must say which models it came from, and they must be the ones packed: a
    certificate about another model than the one shipped is worse than none."""
    for role, recorded, path in (
        ("base model", calibration.base_sha256, base_onnx),
        ("surrogate", calibration.surrogate_sha256, surrogate_onnx),
    ):
        key = "base_sha256" if role == "base model" else "surrogate_sha256"
        if recorded is None:
            raise ValueError(
                f"the calibration record has no {key}: it does not say which {role} its "
                f"{'MC counts' if role == 'base model' else 'probabilities'} came from; recalibrate"
            )
        actual = sha256_file(path)
        if recorded != actual:
            raise ValueError(
                f"{role} {path} (sha256 {actual[:12]}…) is not the {role} the calibration was made "
                f"with ({key} {recorded[:12]}…): rerun calibration with this {role}"
            )


def _manifest(sources: BundleSources, fp32: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    record = sources.calibration.to_dict()
    record["dataset"] = sources.dataset
    parity = sources.parity_max_abs_diff
    return {
        "schema_version": required_schema_version({"calibration": record, "variants": [fp32]}),
        "rrise_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {
            "file": SURROGATE_FILE,
            "sha256": None,
            "input": {
                "name": INPUT_NAME,
                "shape": [None, *sources.input_shape],
                "dtype": "float32",
                "range": [0.0, 1.0],
            },
            "output": {"name": OUTPUT_NAME, "kind": "logits"},
            "num_classes": len(sources.labels),
            "labels": list(sources.labels),
        },
        "preprocess": {
            k: sources.preprocess[k]
            for k in (*PREPROCESS_KEYS, *OPTIONAL_PREPROCESS_KEYS)
            if k in sources.preprocess
        },
        "smoothing": {"sigma": float(sources.calibration.sigma)},
        "calibration": record,
        "base_model": {"file": BASE_FILE, "sha256": None},
        "variants": [fp32],
        "guarantee": bundle_guarantee(adaptive=sources.adaptive is not None),
        "export": {
            "parity_max_abs_diff": None if parity is None else float(parity),
            "onnxruntime_version": ort.__version__,
        },
        **({} if sources.adaptive is None else {"adaptive": dict(sources.adaptive)}),
    }


def _variant_entry(
    precision: str,
    backend: str,
    file: str,
    probs: np.ndarray,
    cal: Calibration,
    *,
    calibrated_with: str,
    max_batch: int,
    images: np.ndarray,
    **extra: Any,
) -> dict[str, Any]:
    """A calibrated variant's manifest entry: its own quantile(s), the numerics they hold for
    (``calibrated_with``, ``max_batch``) and the calibration-time reference of the shift monitor
    (``images``: the calibration inputs ``probs`` were computed on)."""
    if not math.isfinite(cal.quantile):
        raise ValueError(f"the {precision}/{backend} variant's quantile is infinite: it would always abstain")
    return {
        "precision": precision,
        "backend": backend,
        "file": file,
        "sha256": None,
        **_variant_quantile_keys(cal),
        "calibrated_with": calibrated_with,
        "max_batch": int(max_batch),
        "monitor": _monitor_entry(probs, cal, images),
        **extra,
    }


def _publish_folder(
    out_dir: Path, fill: Callable[[Path], None], manifest: dict[str, Any], overwrite: bool
) -> None:
    """Fill a temp folder beside ``out_dir``, write its manifest, verify it, and rename it into place."""
    tmp = _temp_folder(out_dir)
    try:
        fill(tmp)
        write_manifest(tmp, manifest)
        Bundle.load(tmp)
        _check_replaceable(out_dir, overwrite)  # again: something may have appeared meanwhile
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pack_bundle(out_dir: str | os.PathLike, sources: BundleSources, *, overwrite: bool = False) -> Bundle:
    """Write a bundle folder at ``out_dir`` from ``sources`` and return it, loaded and verified.

    It holds ``surrogate.onnx``, ``base.onnx``, ``calibration.npz`` (a copy of the sources') and
    ``manifest.json`` whose ``calibration`` is the given record. The fp32 variant gets its own q̂ from
    ``surrogate.onnx``'s CPU outputs at batch 1, with the micro-batch size that reproduces them
    (:func:`calibration_outputs`). Nothing is written at ``out_dir`` unless the whole bundle passed
    :meth:`Bundle.load`; an existing ``out_dir`` is replaced only with ``overwrite=True`` and only if
    it is a bundle (or empty).

    Parameters
    ----------
    out_dir : str or os.PathLike
        The bundle folder to write.
    sources : BundleSources
        The models, the calibration record and its arrays, labels and preprocessing.
    overwrite : bool
        Replace an existing bundle at ``out_dir``.

    Returns
    -------
    rrise.Bundle
        The bundle, loaded and verified.

    Raises
    ------
    ValueError
        On inconsistent inputs (a model that is not the calibrated one, arrays that do not fit).
    FileExistsError
        When refusing to overwrite.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, overwrite)
    _check_files(sources)
    files = sources.files
    counts, cap_counts, images = _checked_calibration_data(
        files, sources.calibration, sources.input_shape, len(sources.labels)
    )
    probs, max_batch = calibration_outputs(onnx_probs_runner(files["surrogate"]), images)
    cal = sources.calibration
    fp32 = _variant_entry(
        "fp32",
        "onnxruntime",
        SURROGATE_FILE,
        probs,
        cal.recalibrate(probs, counts, cap_counts=cap_counts, surrogate_sha256=cal.surrogate_sha256),
        calibrated_with="onnxruntime-cpu",
        max_batch=max_batch,
        images=images,
    )

    def fill(tmp: Path) -> None:
        shutil.copyfile(files["surrogate"], tmp / SURROGATE_FILE)
        shutil.copyfile(files["base model"], tmp / BASE_FILE)
        shutil.copyfile(files["calibration"], tmp / CALIBRATION_FILE)

    _publish_folder(out_dir, fill, _manifest(sources, fp32), overwrite)
    return Bundle.load(out_dir)


def build_bundle(out_dir: str | os.PathLike, *, overwrite: bool = False, **sources: Any) -> Bundle:
    """Deprecated: :func:`pack_bundle` with ``BundleSources(**sources)`` (the keyword form of
    earlier releases: ``surrogate_onnx``, ``base_onnx``, ``calibration``, ``calibration_npz``,
    ``labels``, ``preprocess``, ``dataset``, ``input_shape``, ``parity_max_abs_diff``)."""
    warnings.warn(
        "rrise.export.bundler.build_bundle is deprecated: use pack_bundle(out_dir, BundleSources(...))",
        DeprecationWarning,
        stacklevel=2,
    )
    return pack_bundle(out_dir, BundleSources(**sources), overwrite=overwrite)


def _monitor_entry(probs: np.ndarray, calibration: Calibration, images: np.ndarray) -> dict[str, Any]:
    """A variant's ``monitor`` entry: the calibration-time distribution of its top-class
    probability and abstentions, for the runtime's distribution-shift alarm (rrise.monitor), and
    its ``ood`` reference for the per-frame out-of-distribution p-value (rrise.ood), both from this
    variant's own ``probs`` on the calibration ``images``."""
    from rrise.monitor import reference_from_probs

    return reference_from_probs(probs, calibration, images=images)


def recalibrate_variant(bundle_dir: str | os.PathLike, probs: np.ndarray) -> float:
    """The conformal quantile q̂ of a variant with ``probs`` on the calibration images of the bundle
    at ``bundle_dir`` (verified first): see :func:`variant_recalibration`."""
    return variant_recalibration(Bundle.load(bundle_dir), probs).quantile


def _variant_manifest(bundle: Bundle, entry: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The manifest with ``entry`` replacing any variant of its precision/backend, and the bundle
    files to keep (a replaced variant's file is dropped)."""
    manifest = dict(bundle.manifest)
    manifest.pop("files", None)
    key = (entry["precision"], entry["backend"])
    kept = [v for v in manifest["variants"] if (v.get("precision"), v.get("backend")) != key]
    entries = [manifest["model"], manifest["base_model"], *kept]
    dropped = {v["file"] for v in manifest["variants"]} - {e["file"] for e in entries}
    keep_files = [f for f in bundle.manifest["files"] if f not in dropped]
    if entry["file"] in keep_files:
        raise ValueError(f"{entry['file']} is already a file of bundle {bundle.path}; choose another name")
    manifest["variants"] = [*kept, entry]
    return manifest, keep_files


def _uncalibrated_entry(
    precision: str, backend: str, name: str, calibrated_with: str | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """The entry of a variant that could not be run where it was made: null quantile, and why."""
    if not extra.get("needs_recalibration"):
        raise ValueError(
            f"the {precision}/{backend} variant has no outputs to calibrate from: pass probs, or say "
            "why in needs_recalibration"
        )
    entry = {"precision": precision, "backend": backend, "file": name, "sha256": None, "quantile": None}
    if calibrated_with:
        entry["calibrated_with"] = calibrated_with
    return {**entry, **extra}


def _recalibrated_entry(
    bundle: Bundle,
    key: tuple[str, str, str],
    probs: np.ndarray,
    calibrated_with: str | None,
    max_batch: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The entry of variant ``key`` = (precision, backend, file name) with its quantile recomputed
    from its own ``probs`` on the bundle's calibration images."""
    precision, backend, name = key
    if calibrated_with is None:
        raise ValueError(f"the {precision}/{backend} variant must say which numerics it was calibrated with")
    extra = {k: v for k, v in extra.items() if k != "needs_recalibration"}
    cal = variant_recalibration(bundle, probs)
    images = calibration_images(bundle)
    return _variant_entry(
        precision, backend, name, probs, cal,
        calibrated_with=calibrated_with, max_batch=max_batch, images=images, **extra,
    )  # fmt: skip


def _linked_copy(src_dir: Path, keep_files: list[str], new_file: Path, name: str) -> Callable[[Path], None]:
    """A folder filler: ``keep_files`` of ``src_dir`` hard-linked (or copied), and ``new_file`` as
    ``name``."""

    def fill(tmp: Path) -> None:
        for rel in keep_files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src_dir / rel, dst)
            except OSError:
                shutil.copyfile(src_dir / rel, dst)
        shutil.copyfile(new_file, tmp / name)

    return fill


def add_variant(
    bundle_dir: str | os.PathLike,
    file: str | os.PathLike,
    *,
    precision: str,
    backend: str,
    probs: np.ndarray | None,
    calibrated_with: str | None = None,
    max_batch: int = 1,
    name: str | None = None,
    **extra: Any,
) -> Bundle:
    """Add (or replace) the ``precision``/``backend`` variant: copy ``file`` into the bundle with its
    q̂ recalibrated from ``probs`` (that variant's own batch-1 outputs on the calibration images, as
    :func:`calibration_outputs` gives them), the numerics they hold for (``calibrated_with``:
    ``onnxruntime-cpu``, ``onnxruntime-cuda`` or ``tensorrt``; ``max_batch``) and ``extra`` keys
    (engines: ``trt_version``, ``compute_capability``).

    ``probs=None`` records a variant that could not be run here: its ``quantile`` is null and
    ``extra`` must say why in ``needs_recalibration``; the runtime refuses it until it is
    recalibrated where it can run. The bundle is rebuilt in a hard-linked copy and renamed into
    place, so readers see the old bundle or the new one. The manifest changes, so a signature
    (``manifest.sig``) no longer holds and is not carried over: sign the result again
    (:func:`rrise.bundle.sign_bundle`). Raises ValueError if the quantile is infinite.
    """
    bundle = Bundle.load(bundle_dir)
    src = Path(file)
    name = name or f"surrogate.{precision}.{backend}{src.suffix}"
    if probs is None:
        entry = _uncalibrated_entry(precision, backend, name, calibrated_with, extra)
    else:
        key = (precision, backend, name)
        entry = _recalibrated_entry(bundle, key, probs, calibrated_with, max_batch, extra)
    manifest, keep_files = _variant_manifest(bundle, entry)
    _publish_folder(bundle.path, _linked_copy(bundle.path, keep_files, src, name), manifest, overwrite=True)
    return Bundle.load(bundle.path)


def add_file(
    bundle_dir: str | os.PathLike, file: str | os.PathLike, name: str, manifest: dict[str, Any]
) -> Bundle:
    """Rewrite the bundle at ``bundle_dir`` with ``file`` copied in as ``name`` (replacing a file of
    that name) and ``manifest`` as its manifest (``files`` recomputed), in a hard-linked copy renamed
    into place as :func:`add_variant` does; a signature no longer holds and is not carried over.
    Raises BundleError or ValueError when the result does not load; the bundle is unchanged then."""
    bundle = Bundle.load(bundle_dir)
    keep_files = [f for f in bundle.manifest["files"] if f != name]
    manifest = {k: v for k, v in manifest.items() if k != "files"}
    _publish_folder(
        bundle.path, _linked_copy(bundle.path, keep_files, Path(file), name), manifest, overwrite=True
    )
    return Bundle.load(bundle.path)
