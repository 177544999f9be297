"""The training stages of the work folder: the base classifier, the surrogate and the JS baseline."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rrise.export.onnx_export import export_onnx
from rrise.fileio import atomic_write_json

from . import train
from .bases import base_of
from .counts import TARGET_STORES, load_store_counts, prepare_base_model
from .mc import sample_counts
from .store import IndexedRows
from .workdir import Workdir

__all__ = ["FRESH_COST", "fresh_pool", "stage_train_base", "stage_train_baseline", "stage_train_surrogate"]

# Base-model evaluations spent by fresh-target training (read by the report's cost).
FRESH_COST = "surrogate_cost.json"
# Seed stream of the fresh draws (the work folder's named streams are 1..6).
FRESH_SEED_STREAM = 100
# the distil-first phase's draws and image choice: a stream of their own
DISTIL_SEED_STREAM = 101
# Draws per pool image that find the hard examples (``hard_fraction`` > 0).
HARD_PROBE_DRAWS = 16


def stage_train_base(w: Workdir) -> list[Path]:
    """Train the base classifier with Gaussian noise augmentation (or import the user's); write
    base.pt and base.onnx."""
    return base_of(w).make()


def fresh_pool(w: Workdir) -> np.ndarray:
    """Indices into ``w.data("train")`` of every image fresh targets may be drawn from: all training
    images outside the selection and calibration splits (for a built-in dataset the base model's
    training images and its held-out ones; for `rrise build` the targets split and ``--train-data``)."""
    return w.folder_data().fresh_pool()


def _train_fresh(w: Workdir, model, ckpt: Path, fit: SurrogateFit) -> tuple[Any, dict]:
    """:func:`~rrise.calibrate.train.train_surrogate_fresh` with the work folder's base model
    (``base.onnx`` on onnxruntime) labelling each step's images, augmented with ``fit.augment``,
    with ``fit.draws`` draws each, for ``fit.steps`` steps, drawn as ``fit.hard_fraction`` says
    (:func:`_hard_weights`); selected on the selection store; records its evaluations. With
    ``fit.distil_steps``, a first phase distils the base model's own noisy votes (:func:`_distil`)."""
    ds, p = w.data("train"), w.prof
    sel_index, sel_counts = load_store_counts(w, TARGET_STORES["selection"])
    steps, draws = fit.steps, fit.draws
    pool = IndexedRows(ds.images, fresh_pool(w))
    planned = (steps * draws + fit.distil_steps) * p.fresh_batch
    base, _ = prepare_base_model(w, "onnxruntime", "cpu", pool[:1], planned)

    def labeller(stream: int, n: int):
        def label(x: np.ndarray, offset: int, n: int = n) -> np.ndarray:
            return sample_counts(
                base, x, n, w.config.sigma, batch_size=p.batch_size, num_classes=len(ds.classes),
                seed=1000 * w.config.seed + stream, index_offset=offset,
            )  # fmt: skip

        return label

    label = labeller(FRESH_SEED_STREAM, draws)
    batch = min(p.fresh_batch, len(pool))
    validation = {"val_images": ds.images[sel_index], "val_counts": sel_counts}
    model, distilled = _distil(w, model, pool, labeller(DISTIL_SEED_STREAM, 1), fit, batch, validation)
    w.log(
        f"[train-surrogate] fresh targets: {steps} steps × {batch} images × {draws} draws, "
        f"drawn from {len(pool):,} images"
    )
    weights, probe_cost = _hard_weights(w, pool, label, fit.hard_fraction, steps * batch)
    model, history = train.train_surrogate_fresh(
        model,
        pool,
        label,
        steps=steps,
        draws=draws,
        batch_size=batch,  # a small user data set: every image, every step
        seed=w.config.seed,
        eval_every=max(1, steps // 8),
        show_progress=w.show_progress,
        checkpoint=ckpt,
        augment=fit.augment,
        weights=weights,
        freeze_norm=fit.freeze_norm,
        **validation,
    )
    history["base_evaluations"] += probe_cost + distilled.get("base_evaluations", 0)
    if distilled:
        history["distil"] = distilled
    cost = {
        "fresh_steps": steps,
        "fresh_draws": draws,
        "fresh_batch": batch,
        "fresh_hard_fraction": fit.hard_fraction,
        "hard_probe_evaluations": probe_cost,
        "distil_steps": fit.distil_steps,
    }
    atomic_write_json(w.path(FRESH_COST), {"base_evaluations": history["base_evaluations"], **cost})
    return model, history


def _distil(w: Workdir, model, pool, label, fit: SurrogateFit, batch: int, validation: dict):
    """The distil-first phase: ``fit.distil_steps`` steps on which each image gets a single noisy
    base-model vote (one pass per noisy image, no counting), selected on the selection store like
    the fresh-target phase; ``(model, its history)``, or the model untouched and ``{}`` without it.
    A single vote is an unbiased, if noisy, target for the smoothed distribution, so this phase
    fits the same thing as the next at one draw per image instead of ``fit.draws``."""
    if not fit.distil_steps:
        return model, {}
    w.log(
        f"[train-surrogate] distil first: {fit.distil_steps} steps × {batch} images × 1 draw "
        "(the base model's own noisy votes)"
    )
    return train.train_surrogate_fresh(
        model,
        pool,
        label,
        steps=fit.distil_steps,
        draws=1,
        batch_size=batch,
        seed=1000 * w.config.seed + DISTIL_SEED_STREAM,
        eval_every=max(1, fit.distil_steps // 4),
        show_progress=w.show_progress,
        checkpoint=w.path(f"{fit.stem}-distil.ckpt"),
        augment=fit.augment,
        freeze_norm=fit.freeze_norm,
        **validation,
    )


def _hard_weights(w: Workdir, pool, label, hard_fraction: float, offset: int):
    """``(sampling weights over the pool or None, base-model evaluations spent)``: with
    ``hard_fraction`` > 0, ``HARD_PROBE_DRAWS`` draws on every pool image (input streams from
    ``offset`` on, after every training step's) weigh the images by how uncertain the smoothed
    classifier is on them (:func:`~rrise.calibrate.train.hard_example_weights`)."""
    if hard_fraction <= 0.0:
        return None, 0
    w.log(f"[train-surrogate] {HARD_PROBE_DRAWS} draws on each of {len(pool)} pool images to find hard ones")
    chunk = 4096
    probes = [
        label(np.asarray(pool[a : a + chunk]), offset + a, HARD_PROBE_DRAWS)
        for a in range(0, len(pool), chunk)
    ]
    counts = np.concatenate(probes)
    return train.hard_example_weights(counts, hard_fraction), len(pool) * HARD_PROBE_DRAWS


@dataclass(frozen=True)
class SurrogateFit:
    """How one surrogate is fitted: ``loss`` (``ce``: the surrogate; ``js``: the Accelerated
    Smoothing baseline), its files' ``stem``, and the profile's training settings with any the stage
    was given instead (:meth:`Profile` field names)."""

    loss: str
    stem: str
    arch: str
    augment: str
    steps: int
    draws: int
    hard_fraction: float
    # None: the base's default (:meth:`~rrise.calibrate.bases.UserBase.distil_steps`), set once the
    # initial surrogate is known
    distil_steps: int | None = None
    # set from the initial surrogate (a copy of the trained base keeps its batch-norm statistics)
    freeze_norm: bool = False

    @property
    def fresh(self) -> bool:
        """Whether each step labels new images with fresh base-model draws (else: the fixed store)."""
        return self.loss == "ce" and self.steps > 0

    @classmethod
    def of(cls, w: Workdir, loss: str, stem: str, given: dict[str, Any]) -> SurrogateFit:
        p = w.prof
        defaults = {
            "arch": w.config.model_spec.surrogate_arch,
            "augment": p.augment,
            "steps": p.steps,
            "draws": p.draws,
            "hard_fraction": p.hard_fraction,
            "distil_steps": None,  # the base's default, once the initial surrogate is known
        }
        unknown = set(given) - set(defaults)
        if unknown:
            raise TypeError(f"unknown surrogate setting {sorted(unknown)[0]!r}")
        chosen = {k: v if given.get(k) is None else given[k] for k, v in defaults.items()}
        return cls(loss=loss, stem=stem, **chosen)


def _fit_surrogate(w: Workdir, fit: SurrogateFit) -> list[Path]:
    """Train a surrogate on the MC targets (fresh ones, or the fixed store), checkpointed as it goes
    and resumed after a crash; save it as the base says (:mod:`rrise.calibrate.bases`)."""
    ds, base = w.data("train"), base_of(w)
    model, arch = base.initial_surrogate(fit.arch)
    distil = base.distil_steps(model, fit.arch) if fit.distil_steps is None else fit.distil_steps
    fit = replace(fit, freeze_norm=base.starts_from_weights(model, fit.arch), distil_steps=distil)
    ckpt = w.path(f"{fit.stem}.ckpt")
    if fit.fresh:
        model, history = _train_fresh(w, model, ckpt, fit)
    else:
        if fit.loss == "ce":
            w.path(FRESH_COST).unlink(missing_ok=True)  # no fresh draws behind this surrogate
        model, history = _train_on_store(w, model, ckpt, fit, base.surrogate_epochs)
    meta = {"labels": ds.classes, "dataset": w.config.dataset, "sigma": w.config.sigma}
    meta.update(history=history, loss=fit.loss, augment=fit.augment, freeze_norm=fit.freeze_norm)
    if fit.fresh:
        meta["hard_fraction"] = fit.hard_fraction
    base.save_surrogate(model, w.path(f"{fit.stem}.pt"), arch, meta)
    export_onnx(model, w.path(f"{fit.stem}.onnx"), ds.shape)
    ckpt.unlink(missing_ok=True)  # the finished model supersedes it
    w.path(f"{fit.stem}-distil.ckpt").unlink(missing_ok=True)
    return [w.path(f"{fit.stem}.pt"), w.path(f"{fit.stem}.onnx")]


def _train_on_store(w: Workdir, model, ckpt: Path, fit: SurrogateFit, epochs_for) -> tuple[Any, dict]:
    """:func:`~rrise.calibrate.train.train_surrogate` on the fixed target store, selected on the
    selection store; ``epochs_for(model, n_targets)`` gives the epochs."""
    ds = w.data("train")
    tr_index, tr_counts = load_store_counts(w, TARGET_STORES["targets"])
    sel_index, sel_counts = load_store_counts(w, TARGET_STORES["selection"])
    return train.train_surrogate(
        model,
        ds.images[tr_index],
        tr_counts,
        epochs=epochs_for(model, len(tr_index)),
        seed=w.config.seed,
        val_images=ds.images[sel_index],
        val_counts=sel_counts,
        show_progress=w.show_progress,
        loss=fit.loss,
        augment=fit.augment,
        checkpoint=ckpt,
        freeze_norm=fit.freeze_norm,
    )


def stage_train_surrogate(
    w: Workdir,
    arch: str | None = None,
    augment: str | None = None,
    steps: int | None = None,
    draws: int | None = None,
    hard_fraction: float | None = None,
    distil_steps: int | None = None,
) -> list[Path]:
    """Fit the surrogate to counts/N (soft-label cross-entropy), selected by held-out KL.

    ``arch``: ``base`` (start from the base model's weights, the profile's default) or a fresh
    network (``cnn``, ``cnn-small``); ``augment``: see :data:`rrise.calibrate.train.AUGMENTATIONS`;
    ``steps``/``draws``: fresh-target training steps and draws per image (default: the profile's;
    ``steps=0`` fits the fixed target store instead); ``hard_fraction``: the share of each
    fresh-target batch drawn towards images the smoothed classifier is unsure of (default: the
    profile's); ``distil_steps``: a first phase of that many steps on single noisy votes of the base
    model (default: the profile's ``distil_steps`` for a copy of your own model, else none; see
    :func:`_distil`).
    """
    given = {"arch": arch, "augment": augment, "steps": steps, "draws": draws, "hard_fraction": hard_fraction}
    given["distil_steps"] = distil_steps
    return _fit_surrogate(w, SurrogateFit.of(w, "ce", "surrogate", given))


def stage_train_baseline(w: Workdir) -> list[Path]:
    """Fit the Accelerated Smoothing baseline: the same surrogate trained with Jensen–Shannon loss."""
    return _fit_surrogate(w, SurrogateFit.of(w, "js", "baseline_js", {}))
