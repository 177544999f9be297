"""The training stages of the work folder: the base classifier, the surrogate and the JS baseline."""

from __future__ import annotations

from pathlib import Path

from .counts import TARGET_STORES, load_store_counts
from .workdir import Workdir, model_spec

__all__ = ["stage_train_base", "stage_train_baseline", "stage_train_surrogate"]


def stage_train_base(w: Workdir) -> list[Path]:
    """Train the base classifier with Gaussian noise augmentation; write base.pt and base.onnx."""
    from rrise.export.onnx_export import export_onnx

    from .models import build_model, save_model
    from .train import train_base

    ds, idx, p = w.data("train"), w.splits()["base"], w.prof
    spec = model_spec(w)
    model = build_model(p.base_arch, seed=w.config.seed, **spec)
    train_base(
        model,
        ds.images[idx],
        ds.labels[idx],
        sigma=w.config.sigma,
        epochs=p.base_epochs,
        seed=w.config.seed,
        show_progress=w.show_progress,
    )
    meta = {"labels": ds.classes, "dataset": w.config.dataset, "sigma": w.config.sigma}
    save_model(model, w.path("base.pt"), arch=p.base_arch, **spec, **meta)
    export_onnx(model, w.path("base.onnx"), ds.shape)
    return [w.path("base.pt"), w.path("base.onnx")]


def _initial_surrogate(w: Workdir, arch: str):
    """``(model, arch)``: the base model's weights (``arch="base"``) or a fresh seeded architecture."""
    from .models import ARCHS, build_model, load_model

    if arch == "base":
        return load_model(w.path("base.pt"))[0], w.prof.base_arch
    if arch in ARCHS:
        return build_model(arch, seed=w.config.seed, **model_spec(w)), arch
    raise ValueError(f"unknown surrogate arch {arch!r}; expected base or one of {', '.join(ARCHS)}")


def _fit_surrogate(
    w: Workdir, loss: str, stem: str, arch: str | None = None, augment: str | None = None
) -> list[Path]:
    """Train a surrogate on the MC targets, checkpointed every epoch and resumed after a crash."""
    from rrise.export.onnx_export import export_onnx

    from .models import save_model
    from .train import train_surrogate

    ds, p = w.data("train"), w.prof
    tr_index, tr_counts = load_store_counts(w, TARGET_STORES["targets"])
    sel_index, sel_counts = load_store_counts(w, TARGET_STORES["selection"])
    augment = augment or p.surrogate_augment
    model, arch = _initial_surrogate(w, arch or p.surrogate_arch)
    ckpt = w.path(f"{stem}.ckpt")
    model, history = train_surrogate(
        model,
        ds.images[tr_index],
        tr_counts,
        epochs=p.surrogate_epochs,
        seed=w.config.seed,
        val_images=ds.images[sel_index],
        val_counts=sel_counts,
        show_progress=w.show_progress,
        loss=loss,
        augment=augment,
        checkpoint=ckpt,
    )
    meta = {"labels": ds.classes, "dataset": w.config.dataset, "sigma": w.config.sigma}
    meta.update(history=history, loss=loss, augment=augment)
    save_model(model, w.path(f"{stem}.pt"), arch=arch, **model_spec(w), **meta)
    export_onnx(model, w.path(f"{stem}.onnx"), ds.shape)
    ckpt.unlink(missing_ok=True)  # the finished model supersedes it
    return [w.path(f"{stem}.pt"), w.path(f"{stem}.onnx")]


def stage_train_surrogate(w: Workdir, arch: str | None = None, augment: str | None = None) -> list[Path]:
    """Fit the surrogate to counts/N (soft-label cross-entropy), selected by held-out KL.

    ``arch``: ``base`` (start from the base model's weights, the profile's default) or a fresh
    network (``cnn``, ``cnn-small``); ``augment``: see :data:`rrise.calibrate.train.AUGMENTATIONS`.
    """
    return _fit_surrogate(w, "ce", "surrogate", arch, augment)


def stage_train_baseline(w: Workdir) -> list[Path]:
    """Fit the Accelerated Smoothing baseline: the same surrogate trained with Jensen–Shannon loss."""
    return _fit_surrogate(w, "js", "baseline_js")
