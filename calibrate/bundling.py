"""The bundle stage: the work folder's surrogate, base model and calibration, packed by
:func:`rrise.export.bundler.build_bundle` (the one bundle builder, also behind ``rrise-export``)."""

from __future__ import annotations

from pathlib import Path

from .calibrating import load_calibration, load_calibration_npz
from .workdir import Workdir

__all__ = ["stage_bundle"]


def stage_bundle(w: Workdir) -> list[Path]:
    """Bundle the surrogate, the base model and the calibration: what the runtime loads."""
    from rrise.export.bundler import build_bundle, default_preprocess
    from rrise.export.onnx_export import onnx_parity

    from .models import load_model

    ds = w.data("train")
    cal, _ = load_calibration(w)  # refuses a calibration made with other models than these
    if w.is_user:  # `rrise build`: any surrogate arch, and the data's own preprocessing
        from .building import user_model
        from .surrogates import load_surrogate

        u = w.config.user
        base = user_model(w) if u.get("model") is None else None
        model, _ = load_surrogate(w.path("surrogate.pt"), base=base, trust_code=True)
        preprocess, dataset = u["preprocess"], u.get("data_name") or w.config.dataset
    else:
        model, _ = load_model(w.path("surrogate.pt"))
        preprocess, dataset = default_preprocess(ds.shape), w.config.dataset
    parity = onnx_parity(model, w.path("surrogate.onnx"), load_calibration_npz(w)["images"][:256])
    build_bundle(
        w.path("bundle"),
        surrogate_onnx=w.path("surrogate.onnx"),
        base_onnx=w.path("base.onnx"),
        calibration=cal,
        calibration_npz=w.path("calibration.npz"),
        labels=ds.classes,
        preprocess=preprocess,
        dataset=dataset if w.is_user else (cal.dataset or w.config.dataset),
        input_shape=ds.shape,
        parity_max_abs_diff=parity,
        overwrite=True,
    )
    return [w.path("bundle")]
