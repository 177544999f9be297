"""The bundle stage: the work folder's surrogate, base model and calibration, packed by
:func:`rrise.export.bundler.pack_bundle` (the one bundle builder, also behind ``rrise-export``),
with the profile it was made with (``made_with``) and the routing rule of adaptive certification
(``adaptive`` → ``routing``, chosen on the selection split, :mod:`rrise.calibrate.adaptive_workdir`;
absent where the profile samples no rule-selection counts) recorded in the manifest, and the selection
split's images written beside it (``selection.npz``) for ``rrise-export … --quant-data``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rrise.bundle import Bundle, write_manifest
from rrise.export.bundler import BundleSources, pack_bundle
from rrise.export.onnx_export import onnx_parity
from rrise.fileio import atomic_path

from .adaptive_workdir import bundle_adaptive
from .bases import base_of
from .calibrating import load_calibration, load_calibration_npz
from .workdir import Workdir

__all__ = ["SELECTION_NPZ", "record_profile", "stage_bundle", "write_selection_npz"]

SELECTION_NPZ = "selection.npz"


def stage_bundle(w: Workdir) -> list[Path]:
    """Bundle the surrogate, the base model and the calibration: what the runtime loads."""
    ds = w.data("train")
    cal, _ = load_calibration(w)  # refuses a calibration made with other models than these
    model = base_of(w).load_surrogate(w.path("surrogate.pt"))
    preprocess, dataset = w.folder_data().bundle_data(cal.dataset or w.config.dataset)
    parity = onnx_parity(model, w.path("surrogate.onnx"), load_calibration_npz(w)["images"][:256])
    sources = BundleSources(
        surrogate_onnx=w.path("surrogate.onnx"),
        base_onnx=w.path("base.onnx"),
        calibration=cal,
        calibration_npz=w.path("calibration.npz"),
        labels=tuple(ds.classes),
        preprocess=preprocess,
        dataset=dataset,
        input_shape=ds.shape,
        parity_max_abs_diff=parity,
        adaptive=bundle_adaptive(w, cal),
    )
    pack_bundle(w.path("bundle"), sources, overwrite=True)
    record_profile(w.path("bundle"), w.prof.name, w.prof.note)
    return [w.path("bundle"), write_selection_npz(w)]


def record_profile(bundle_dir: Path, profile: str, note: str = "") -> None:
    """Add ``made_with`` {``profile``, ``profile_note``} to the bundle's manifest (rewritten
    atomically, then loaded and verified again), so ``rrise inspect`` shows what the bundle was made
    with and a quick bundle does not pass for a full one."""
    manifest = dict(Bundle.load(bundle_dir).manifest)
    manifest["made_with"] = {"profile": profile, "profile_note": note or None}
    write_manifest(bundle_dir, manifest)
    Bundle.load(bundle_dir)


def write_selection_npz(w: Workdir) -> Path:
    """Write the selection split's model inputs to ``selection.npz`` in the work folder and return
    its path: ``images`` float32 [n, C, H, W] in [0, 1] and ``labels`` int64, no pickled objects.
    These images are held out of calibration (the splits are disjoint by construction), so they may
    choose an int8 variant's activation ranges (``rrise-export … --quant-data``) without voiding the
    calibration's guarantee."""
    ds, index = w.data("train"), w.splits()["selection"]
    images = np.ascontiguousarray(ds.images[index], dtype=np.float32)
    labels = np.asarray(ds.labels[index], dtype=np.int64)
    out = w.path(SELECTION_NPZ)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=images, labels=labels)
    return out
