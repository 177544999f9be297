"""`rrise build`: every stage of the work folder on the user's own classifier and images.

:func:`build` loads the user's model (:func:`~rrise.calibrate.user_model.load_user_model`) and
images (:func:`~rrise.calibrate.user_data.load_images`), refuses what does not fit before writing
anything, and opens a work folder whose ``run.json`` records where both come from (dataset
``user``, key ``user``), so that every stage command (``rrise calibrate --workdir DIR``, ...)
reloads them. The user's model *is* the base model: the ``train-base`` stage of such a folder
writes its canonical ONNX to ``base.onnx`` (and ``base.pt``, a JSON record of where it came from)
instead of training one. Then: targets → train-surrogate → select-rule → calibrate → certify
(Cohen's MC on the test split) → evaluate → bundle, each skipped when current.

The images are split into surrogate targets, selection, calibration and test by a seeded hash of
each image's identity (:func:`~rrise.calibrate.user_data.split_images`); ``--train-data`` images
(ones the base model trained on) only add surrogate targets.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .folder_data import combine, load_sets

__all__ = ["BUILD_STAGES", "USER_DATASET", "build", "mc_budget"]

USER_DATASET = "user"
# The stages `rrise build` runs after importing the base model, in order.
BUILD_STAGES = ("targets", "train-surrogate", "select-rule", "calibrate", "certify", "evaluate", "bundle")


# --------------------------------------------------------------------------------------------------
# What the Monte Carlo costs


def mc_budget(w) -> dict[str, int]:
    """Base-model evaluations each MC stage of a `rrise build` folder spends (0 for one already done)."""
    from . import provenance as prov
    from .stages import ALL_STAGES

    p, sp = w.prof, w.splits()
    plan = {
        "targets": (len(sp["targets"]) + len(sp["selection"])) * p.target_draws,
        "train-surrogate": p.fresh_steps * p.fresh_batch * p.fresh_draws,  # fresh targets (0 when off)
        "select-rule": len(sp["rules"]) * p.n_cal if p.n_rule else 0,
        # with cap draws, at most every calibration input gets N₂ more (only those at the cap do)
        "calibrate": len(sp["calibration"]) * (p.n_cal + p.cap_draws),
        "certify": len(sp["test"]) * (p.n0 + p.n),
    }
    done = {}
    for name in plan:
        try:
            done[name] = prov.is_current(w.root, ALL_STAGES, name) and prov.read_record(w.root, name)
        except Exception:  # noqa: BLE001 - only an estimate
            done[name] = False
    return {k: (0 if done[k] else v) for k, v in plan.items()}


def probe_rate(w, draws: int = 512) -> float:
    """Noisy base-model evaluations per second on this machine (onnxruntime, a short timed probe)."""
    from .mc import prepare_model, sample_counts

    ds = w.data("test")
    x = np.asarray(ds.images[w.splits()["test"][:2]], dtype=np.float32)
    prepared = prepare_model(str(w.path("base.onnx")), "onnxruntime")
    kw = {"sigma": w.config.sigma, "batch_size": w.prof.batch_size, "seed": 0}
    sample_counts(prepared, x[:1], 32, **kw)  # warm-up
    t0 = time.perf_counter()
    sample_counts(prepared, x, draws, **kw)
    return len(x) * draws / max(time.perf_counter() - t0, 1e-9)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------------------------------
# The command


def build(
    model,
    data: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    sigma: float = 0.25,
    profile: str = "quick",
    seed: int = 0,
    train_data: str | os.PathLike | None = None,
    output: str | None = None,
    output_kind: str | None = None,
    input_size: Sequence[int] | int | None = None,
    channels: str | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    weights: str | os.PathLike | None = None,
    surrogate_arch: str = "auto",
    data_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every stage on the user's model and images; return the bundle's path (``workdir/bundle``).

    ``model``: a path (``.onnx``, ``.pt2``), ``package.module:attribute`` or an ``nn.Module``;
    ``data``/``train_data``: an ImageFolder, an ``.npz`` or a built-in name (see
    :func:`~rrise.calibrate.user_data.load_images`); the rest as ``rrise build``'s options. A rerun
    on the same folder skips every stage that is current. Raises ``ValueError`` (``UserModelError``,
    ``UserDataError``, ``StageNotReady``, ...) on bad input; a folder this call created is removed
    again when it fails so before its first Monte Carlo stage (after that the folder stays, to be
    resumed; a bundle is only ever written whole).
    """
    root = Path(workdir)
    existed = root.exists()
    state = {"stages": False}
    try:
        return _build(
            model, data, root, sigma=sigma, profile=profile, seed=seed, train_data=train_data,
            model_options={
                "weights": None if weights is None else str(Path(weights).resolve()),
                "output": output,
                "output_kind": output_kind,
                "input_size": None if input_size is None else list(np.atleast_1d(input_size).tolist()),
                "channels": channels,
                "mean": mean if mean is None or np.isscalar(mean) else list(mean),
                "std": std if std is None or np.isscalar(std) else list(std),
            },
            surrogate_arch=surrogate_arch, data_dir=data_dir, show_progress=show_progress, log=log,
            state=state,
        )  # fmt: skip
    except ValueError:
        # refused before any Monte Carlo: leave no folder behind (after it, the folder stays, resumable)
        if not existed and not state["stages"] and root.exists():
            shutil.rmtree(root, ignore_errors=True)
        raise


def _checked_inputs(model, data, train_data, model_options, surrogate_arch, data_dir, prof, seed, log):
    """The user's model and images, loaded and checked before anything is written: the model, the
    ``user`` record of run.json and the data splits."""
    from torch import nn

    from rrise.runtime.preprocess import preprocess_spec

    from .user_data import split_images
    from .user_model import UserModelError, load_user_model

    um = load_user_model(model, **model_options)
    for note in um.notes:
        log(f"[model] {note}")
    if um.onnx is None:
        raise UserModelError(
            f"MODEL {um.name} does not export to ONNX, which the bundle needs (see the notes above)"
        )
    c, h, w_ = um.input_shape
    preprocess = preprocess_spec(um.channels, (h, w_))
    user = {
        "model": None if isinstance(model, nn.Module) else _source(model),
        "model_options": model_options,
        "data": _source(data),
        "train_data": None if train_data is None else _source(train_data),
        "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
        "preprocess": preprocess,
        "input_shape": [c, h, w_],
        "surrogate_arch": str(surrogate_arch),
    }
    images, train = load_sets(user)
    um.check_classes(images.num_classes, images.classes)
    sp = split_images(images, prof, alpha=prof.alphas[0], seed=seed, train=train)
    for note in sp.notes:
        log(f"[data] {note}")
    log(f"[data] {sp.summary()}")
    user["data_sha256"] = images.sha256
    user["data_name"] = images.name
    return um, user, sp


def _log_budget(w, log) -> None:
    """Say how many base-model evaluations the stages will spend, and how long at the measured rate."""
    budget = mc_budget(w)
    total = sum(budget.values())
    if not total:
        log("[build] Monte Carlo: every count store is current (0 base-model evaluations)")
        return
    rate = probe_rate(w)
    parts = ", ".join(f"{k} {v:,}" for k, v in budget.items() if v)
    log(
        f"[build] Monte Carlo: {total:,} base-model evaluations ({parts}); at the measured "
        f"{rate:,.0f} evaluations/s that is about {_duration(total / rate)}"
    )


def _source(x) -> str:
    """A path as an absolute path (stage commands run from anywhere); a name as it is."""
    text = os.fspath(x)
    return str(Path(text).resolve()) if Path(text).exists() else text


def _build(model, data, root: Path, *, sigma, profile, seed, train_data, model_options,
           surrogate_arch, data_dir, show_progress, log, state) -> Path:  # fmt: skip
    from rrise.fileio import atomic_write_json

    from .profiles import get_profile
    from .provenance import file_sha256
    from .stages import run_stage
    from .workdir import RunConfig, Workdir

    if not 0 < float(sigma) <= 1:
        raise ValueError(f"--sigma must be in (0, 1] ([0,1]-pixel units), got {sigma}")
    prof = get_profile(profile, USER_DATASET)

    # 1. everything the user gave, checked before anything is written
    um, user, sp = _checked_inputs(model, data, train_data, model_options, surrogate_arch, data_dir,
                                   prof, seed, log)  # fmt: skip

    # 2. the work folder; the user's model is its base model
    config = RunConfig(dataset=USER_DATASET, profile=prof.name, sigma=float(sigma), seed=int(seed), user=user)
    w = Workdir.open(root, config, show_progress=show_progress, log=log)
    w.user_model = um
    w._user = combine(sp, prof)
    atomic_write_json(w.path("data_splits.json"), sp.to_dict())
    stale_base = file_sha256(w.path("base.onnx")) not in (None, um.onnx_sha256)
    run_stage(w, "train-base", force=stale_base)

    # 3. what the Monte Carlo will cost, at a measured rate
    _log_budget(w, log)

    # 4. the stages
    state["stages"] = True
    for name in BUILD_STAGES:
        run_stage(w, name)
    return w.path("bundle")
