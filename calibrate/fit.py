"""The training stages of the work folder: the base classifier, the surrogate and the JS baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .counts import TARGET_STORES, load_store_counts
from .user_base import import_base, user_model
from .workdir import Workdir, model_spec

__all__ = ["FRESH_COST", "fresh_pool", "stage_train_base", "stage_train_baseline", "stage_train_surrogate"]

# Base-model evaluations spent by fresh-target training (read by the report's cost).
FRESH_COST = "surrogate_cost.json"
# Seed stream of the fresh draws (the work folder's named streams are 1..6).
FRESH_SEED_STREAM = 100
# Draws per pool image that find the hard examples (``fresh_hard_fraction`` > 0).
HARD_PROBE_DRAWS = 16


def stage_train_base(w: Workdir) -> list[Path]:
    """Train the base classifier with Gaussian noise augmentation; write base.pt and base.onnx."""
    from rrise.export.onnx_export import export_onnx

    if w.is_user:  # `rrise build`: the user's model is the base, nothing is trained
        return import_base(w)

    from .model_files import save_model
    from .models import build_model
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
    from .model_files import load_model
    from .models import ARCHS, build_model

    if w.is_user:
        return _user_surrogate(w, arch), arch
    if arch == "base":
        return load_model(w.path("base.pt"))[0], w.prof.base_arch
    if arch in ARCHS:
        return build_model(arch, seed=w.config.seed, **model_spec(w)), arch
    raise ValueError(f"unknown surrogate arch {arch!r}; expected base or one of {', '.join(ARCHS)}")


def _user_surrogate(w: Workdir, arch: str):
    """`rrise build`: :func:`rrise.calibrate.surrogates.build_surrogate` for the user's base."""
    from .surrogates import build_surrogate

    ds = w.data("train")
    base = user_model(w) if arch in ("auto", "base") else None
    model = build_surrogate(base, ds.shape, len(ds.classes), arch=arch, seed=w.config.seed)
    from .surrogates import surrogate_spec

    w.log(f"[train-surrogate] surrogate: {surrogate_spec(model)['why']}")
    return model


# `rrise build`: a surrogate that does not start from the base's weights gets at least this many
# optimizer steps (batches of 128): the profiles' epoch counts are sized for fine-tuning a copy.
FRESH_MIN_STEPS = 300
FRESH_MAX_EPOCHS = 60


def _user_epochs(w: Workdir, model, n_targets: int) -> int:
    from .surrogates import surrogate_spec

    epochs = w.prof.surrogate_epochs
    if surrogate_spec(model)["arch"] == "base":
        return epochs
    fresh = min(FRESH_MAX_EPOCHS, -(-FRESH_MIN_STEPS * 128 // max(n_targets, 1)))
    if fresh > epochs:
        w.log(
            f"[train-surrogate] a fresh network on {n_targets} targets: {fresh} epochs "
            f"(at least {FRESH_MIN_STEPS} steps; the profile's {epochs} are for a copy of the base)"
        )
    return max(epochs, fresh)


def fresh_pool(w: Workdir) -> np.ndarray:
    """Indices into ``w.data("train")`` of every image fresh targets may be drawn from: all training
    images outside the selection and calibration splits (for a built-in dataset the base model's
    training images and its held-out ones; for `rrise build` the targets split and ``--train-data``)."""
    sp = w.splits()
    if w.is_user:
        return np.sort(sp["targets"])
    taken = np.concatenate([sp["selection"], sp["calibration"]])
    return np.setdiff1d(np.arange(len(w.data("train"))), taken)


def _train_fresh(w: Workdir, model, val_images, val_counts, ckpt: Path, settings: dict):
    """:func:`~rrise.calibrate.train.train_surrogate_fresh` with the work folder's base model
    (``base.onnx`` on onnxruntime) labelling each step's images, augmented with ``augment``, with
    ``draws`` draws each, for ``steps`` steps (``settings``), drawn as ``hard_fraction`` says
    (:func:`_hard_weights`); records its evaluations."""
    from rrise.fileio import atomic_write_json

    from .counts import prepare_base_model
    from .mc import sample_counts
    from .store import IndexedRows
    from .train import train_surrogate_fresh

    ds, p = w.data("train"), w.prof
    steps, draws = settings["steps"], settings["draws"]
    pool = IndexedRows(ds.images, fresh_pool(w))
    base, _ = prepare_base_model(w, "onnxruntime", "cpu", pool[:1], steps * p.fresh_batch * draws)
    seed = 1000 * w.config.seed + FRESH_SEED_STREAM

    def label(x: np.ndarray, offset: int, n: int = draws) -> np.ndarray:
        return sample_counts(
            base,
            x,
            n,
            w.config.sigma,
            batch_size=p.batch_size,
            num_classes=len(ds.classes),
            seed=seed,
            index_offset=offset,
        )

    batch = min(p.fresh_batch, len(pool))
    weights, probe_cost = _hard_weights(w, pool, label, settings["hard_fraction"], steps * batch)
    model, history = train_surrogate_fresh(
        model,
        pool,
        label,
        steps=steps,
        draws=draws,
        batch_size=batch,  # a small user data set: every image, every step
        seed=w.config.seed,
        val_images=val_images,
        val_counts=val_counts,
        eval_every=max(1, steps // 8),
        show_progress=w.show_progress,
        checkpoint=ckpt,
        augment=settings["augment"],
        weights=weights,
    )
    history["base_evaluations"] += probe_cost
    cost = {
        "fresh_steps": steps,
        "fresh_draws": draws,
        "fresh_batch": batch,
        "fresh_hard_fraction": settings["hard_fraction"],
        "hard_probe_evaluations": probe_cost,
    }
    atomic_write_json(w.path(FRESH_COST), {"base_evaluations": history["base_evaluations"], **cost})
    return model, history


def _hard_weights(w: Workdir, pool, label, hard_fraction: float, offset: int):
    """``(sampling weights over the pool or None, base-model evaluations spent)``: with
    ``hard_fraction`` > 0, ``HARD_PROBE_DRAWS`` draws on every pool image (input streams from
    ``offset`` on, after every training step's) weigh the images by how uncertain the smoothed
    classifier is on them (:func:`~rrise.calibrate.train.hard_example_weights`)."""
    from .train import hard_example_weights

    if hard_fraction <= 0.0:
        return None, 0
    w.log(f"[train-surrogate] {HARD_PROBE_DRAWS} draws on each of {len(pool)} pool images to find hard ones")
    chunk = 4096
    probes = [
        label(np.asarray(pool[a : a + chunk]), offset + a, HARD_PROBE_DRAWS)
        for a in range(0, len(pool), chunk)
    ]
    counts = np.concatenate(probes)
    return hard_example_weights(counts, hard_fraction), len(pool) * HARD_PROBE_DRAWS


def _fit_surrogate(
    w: Workdir,
    loss: str,
    stem: str,
    arch: str | None = None,
    augment: str | None = None,
    steps: int | None = None,
    draws: int | None = None,
    hard_fraction: float | None = None,
) -> list[Path]:
    """Train a surrogate on the MC targets, checkpointed every epoch and resumed after a crash.

    Fresh targets (``loss="ce"``) run for ``steps`` steps with ``draws`` draws per image and
    ``hard_fraction`` of each batch drawn towards uncertain images, each defaulting to the profile's;
    ``steps`` given turns them on where the profile fits a fixed store."""
    from rrise.export.onnx_export import export_onnx

    from .model_files import save_model, save_surrogate
    from .train import train_surrogate

    ds, p = w.data("train"), w.prof
    tr_index, tr_counts = load_store_counts(w, TARGET_STORES["targets"])
    sel_index, sel_counts = load_store_counts(w, TARGET_STORES["selection"])
    augment = augment or p.surrogate_augment
    default = w.config.user.get("surrogate_arch", "auto") if w.is_user else p.surrogate_arch
    model, arch = _initial_surrogate(w, arch or default)
    ckpt = w.path(f"{stem}.ckpt")
    steps = p.fresh_steps if steps is None else steps
    if loss == "ce" and steps > 0:
        settings = {
            "steps": steps,
            "draws": p.fresh_draws if draws is None else draws,
            "augment": augment,
            "hard_fraction": p.fresh_hard_fraction if hard_fraction is None else hard_fraction,
        }
        model, history = _train_fresh(w, model, ds.images[sel_index], sel_counts, ckpt, settings)
    else:
        if loss == "ce":
            w.path(FRESH_COST).unlink(missing_ok=True)  # no fresh draws behind this surrogate
        epochs = _user_epochs(w, model, len(tr_index)) if w.is_user else p.surrogate_epochs
        model, history = train_surrogate(
            model,
            ds.images[tr_index],
            tr_counts,
            epochs=epochs,
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
    if loss == "ce" and steps > 0:
        meta["hard_fraction"] = settings["hard_fraction"]
    if w.is_user:
        save_surrogate(model, w.path(f"{stem}.pt"), **meta)
    else:
        save_model(model, w.path(f"{stem}.pt"), arch=arch, **model_spec(w), **meta)
    export_onnx(model, w.path(f"{stem}.onnx"), ds.shape)
    ckpt.unlink(missing_ok=True)  # the finished model supersedes it
    return [w.path(f"{stem}.pt"), w.path(f"{stem}.onnx")]


def stage_train_surrogate(
    w: Workdir,
    arch: str | None = None,
    augment: str | None = None,
    steps: int | None = None,
    draws: int | None = None,
    hard_fraction: float | None = None,
) -> list[Path]:
    """Fit the surrogate to counts/N (soft-label cross-entropy), selected by held-out KL.

    ``arch``: ``base`` (start from the base model's weights, the profile's default) or a fresh
    network (``cnn``, ``cnn-small``); ``augment``: see :data:`rrise.calibrate.train.AUGMENTATIONS`;
    ``steps``/``draws``: fresh-target training steps and draws per image (default: the profile's;
    ``steps=0`` fits the fixed target store instead); ``hard_fraction``: the share of each
    fresh-target batch drawn towards images the smoothed classifier is unsure of (default: the
    profile's).
    """
    return _fit_surrogate(w, "ce", "surrogate", arch, augment, steps, draws, hard_fraction)


def stage_train_baseline(w: Workdir) -> list[Path]:
    """Fit the Accelerated Smoothing baseline: the same surrogate trained with Jensen–Shannon loss."""
    return _fit_surrogate(w, "js", "baseline_js")
