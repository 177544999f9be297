"""`rrise build`: every stage of the work folder on the user's own classifier and images.

:func:`build` takes :class:`~rrise.calibrate.options.BuildOptions` (or the same values as
keywords), loads the user's model (:func:`~rrise.calibrate.user_model.load_user_model`) and
images (:func:`~rrise.calibrate.user_data.load_images`), refuses what does not fit before writing
anything, and opens a work folder whose config holds both as typed specs
(:class:`~rrise.calibrate.specs.UserModelSpec`, :class:`~rrise.calibrate.specs.ImageData`;
``run.json`` records them as dataset ``user``, key ``user``), so that every stage command
(``rrise calibrate --workdir DIR``, ...) reloads them. The user's model *is* the base model: the
``train-base`` stage of such a folder writes its canonical ONNX to ``base.onnx`` (and ``base.pt``,
a JSON record of where it came from) instead of training one. Then: targets → train-surrogate →
select-rule → calibrate → certify (Cohen's MC on the test split) → evaluate → bundle, each skipped
when current.

The images are split into surrogate targets, selection, calibration and test by a seeded hash of
each image's identity (:func:`~rrise.calibrate.user_data.split_images`); ``--train-data`` images
(ones the base model trained on) only add surrogate targets.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rrise.fileio import atomic_write_json, read_json
from rrise.runtime.backends import OnnxRuntimeBackend
from rrise.runtime.preprocess import preprocess_spec
from rrise.scores import p_cap
from rrise.stats import norm_ppf

from . import provenance as prov
from .folder_data import combine, load_sets
from .mc import prepare_model, sample_counts
from .options import BuildOptions
from .profiles import Profile, get_profile
from .provenance import file_sha256
from .specs import USER_DATASET, ImageData, UserModelSpec
from .stages import ALL_STAGES, run_stage
from .user_data import DataSplits, split_images
from .user_model import UserModel, UserModelError, load_user_model
from .verdict import verdict_lines
from .workdir import RunConfig, Workdir

__all__ = [
    "ACCURACY_SAMPLE",
    "BUILD_STAGES",
    "NEAR_CHANCE",
    "USER_DATASET",
    "base_accuracy",
    "build",
    "build_options",
    "class_mapping",
    "mc_budget",
    "probe_rate",
]

# The stages `rrise build` runs after importing the base model, in order.
BUILD_STAGES = ("targets", "train-surrogate", "select-rule", "calibrate", "certify", "evaluate", "bundle")


# --------------------------------------------------------------------------------------------------
# What the Monte Carlo costs


def mc_budget(w: Workdir) -> dict[str, int]:
    """Base-model evaluations each MC stage of a `rrise build` folder spends (0 for one already done)."""
    p, sp = w.prof, w.splits()
    plan = {
        "targets": (len(sp["targets"]) + len(sp["selection"])) * p.target_draws,
        "train-surrogate": p.steps * p.fresh_batch * p.draws,  # fresh targets (0 when off)
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


def probe_rate(w: Workdir, draws: int = 512) -> float:
    """Noisy base-model evaluations per second on this machine (onnxruntime, a short timed probe)."""
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
    model: BuildOptions | str | os.PathLike | Any = None,
    data: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    *,
    log: Callable[[str], None] = print,
    **flags: Any,
) -> Path:
    """Run every stage on the user's model and images; return the bundle's path (``workdir/bundle``).

    Parameters
    ----------
    model
        A :class:`~rrise.calibrate.options.BuildOptions` (then nothing else but ``log``), or the
        classifier: a path (``.onnx``, ``.pt2``), ``package.module:attribute`` or an ``nn.Module``.
    data
        The images the model did not train on: an ImageFolder, an ``.npz`` or a built-in name (see
        :func:`~rrise.calibrate.user_data.load_images`).
    workdir
        The work folder; a rerun on the same folder skips every stage that is current.
    log
        Where progress lines go (``print``).
    **flags
        Any other :class:`~rrise.calibrate.options.BuildOptions` field by name (``sigma``,
        ``profile``, ``seed``, ``train_data``, ``output``, ``output_kind``, ``input_size``,
        ``channels``, ``mean``, ``std``, ``weights``, ``surrogate_arch``, ``data_dir``,
        ``no_progress``); ``show_progress=False`` is ``no_progress=True``.

    Returns
    -------
    Path
        ``workdir/bundle``, the bundle the runtime loads.

    Raises ``ValueError`` (``UserModelError``, ``UserDataError``, ``StageNotReady``, ...) on bad
    input; a folder this call created is removed again when it fails before its first Monte Carlo
    stage (after that the folder stays, to be resumed; a bundle is only ever written whole).

    Examples
    --------
    >>> import rrise.calibrate as rc
    >>> from rrise.calibrate.options import BuildOptions
    >>> options = BuildOptions(model="model.onnx", data="images/", workdir="runs/mine", sigma=0.25)
    >>> options.profile.value
    'quick'
    >>> rc.build(options)  # doctest: +SKIP
    PosixPath('runs/mine/bundle')
    >>> rc.build(model="model.onnx", data="images/", workdir="runs/mine",
    ...          sigma=0.25, profile="quick")  # doctest: +SKIP
    PosixPath('runs/mine/bundle')
    """
    options, module = build_options(model, data, workdir, **flags)
    existed, state = options.workdir.exists(), {"stages": False}
    try:
        return _build(options, module, log, state)
    except ValueError:
        # refused before any Monte Carlo: leave no folder behind (after it, the folder stays, resumable)
        if not existed and not state["stages"] and options.workdir.exists():
            shutil.rmtree(options.workdir, ignore_errors=True)
        raise


def build_options(
    model: BuildOptions | str | os.PathLike | Any = None,
    data: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    **flags: Any,
) -> tuple[BuildOptions, Any]:
    """``(options, module)``: :func:`build`'s arguments as one :class:`BuildOptions`, and the
    ``nn.Module`` passed as ``model`` (None for a path or factory string)."""
    if isinstance(model, BuildOptions):
        if data is not None or workdir is not None or flags:
            raise TypeError("build(options) takes no other arguments but log")
        return model, None
    if "show_progress" in flags:
        flags["no_progress"] = not flags.pop("show_progress")
    module = None
    if model is not None and not isinstance(model, (str, os.PathLike)):
        module, model = model, f"nn.Module {type(model).__name__}"
    if model is None or data is None or workdir is None:
        raise TypeError("build needs model, data and workdir (or one BuildOptions)")
    return BuildOptions(model=model, data=data, workdir=workdir, **flags), module


def _model_spec(options: BuildOptions, module: Any) -> UserModelSpec:
    """The user's model as :func:`~rrise.calibrate.user_model.load_user_model` will load it
    (``input_shape`` is filled in once it is loaded)."""
    o = options
    return UserModelSpec(
        source=None if module is not None else _source(o.model),
        input_shape=(0, 0, 0),
        weights=None if o.weights is None else str(o.weights.resolve()),
        output=o.output,
        output_kind=None if o.output_kind is None else o.output_kind.value,
        input_size=o.input_size,
        channels=None if o.channels is None else o.channels.value,
        mean=o.mean,
        std=o.std,
        surrogate_arch=o.surrogate_arch,
    )


def _load_model(
    options: BuildOptions, module: Any, log: Callable[[str], None]
) -> tuple[UserModel, UserModelSpec]:
    """The user's model, loaded and checked before anything is written, and its spec."""
    spec = _model_spec(options, module)
    um = load_user_model(module if module is not None else spec.source, **spec.load_options())
    for note in um.notes:
        log(f"[model] {note}")
    if um.onnx is None:
        raise UserModelError(
            f"MODEL {um.name} does not export to ONNX, which the bundle needs (see the notes above)"
        )
    return um, replace(spec, input_shape=tuple(um.input_shape))


def _load_images(options: BuildOptions, um: UserModel, prof: Profile, log: Callable[[str], None]):
    """The user's images as the model takes them, checked against it and split: ``(spec, splits)``."""
    c, h, w = um.input_shape
    spec = ImageData(
        data=_source(options.data),
        preprocess=preprocess_spec(um.channels, (h, w)),
        input_shape=(c, h, w),
        train_data=None if options.train_data is None else _source(options.train_data),
        data_dir=None if options.data_dir is None else str(options.data_dir.resolve()),
    )
    images, train = load_sets(spec)
    um.check_classes(images.num_classes, images.classes)
    sp = split_images(images, prof, alpha=prof.alphas[0], seed=options.seed, train=train)
    for note in sp.notes:
        log(f"[data] {note}")
    log(f"[data] {sp.summary()}")
    return replace(spec, sha256=images.sha256, name=images.name), sp


# How many images of the targets split the base model's top-1 accuracy is checked on, and the
# accuracy (a multiple of chance, 1/K) at or below which `rrise build` refuses without --force.
ACCURACY_SAMPLE = 200
NEAR_CHANCE = 1.5


def class_mapping(classes: list[str], show: int = 20) -> str:
    """``index name`` of every class (the first and last ones when there are more than ``show``)."""
    pairs = [f"{k} {name}" for k, name in enumerate(classes)]
    if len(pairs) > show:
        pairs = [*pairs[: show - 3], f"... ({len(pairs) - show + 2} more)", *pairs[-2:]]
    return ", ".join(pairs)


def base_accuracy(w: Workdir, sp: DataSplits, n: int = ACCURACY_SAMPLE) -> tuple[float, int]:
    """``(top-1 accuracy, images)`` of the work folder's base model on up to ``n`` images of the
    targets split (the first by the seeded hash: every class in proportion; topped up from the
    selection split where DATA's targets are fewer), no noise."""
    index = sp.first_by_hash("targets", n)
    if len(index) < n:
        index = np.concatenate([index, sp.first_by_hash("selection", n - len(index))])
    ds = w.data("test")
    backend = OnnxRuntimeBackend(w.path("base.onnx"))
    pred = np.concatenate(
        [
            backend.run(np.asarray(ds.images[part])).argmax(1)
            for part in np.array_split(index, max(1, len(index) // 50))
        ]
    )
    return float(np.mean(pred == np.asarray(ds.labels)[index])), len(index)


def _check_base_model(w: Workdir, sp: DataSplits, force: bool, log: Callable[[str], None]) -> None:
    """Print the class-to-index mapping and the base model's top-1 accuracy on a sample of DATA;
    refuse (unless ``force``) when it is near chance, before any Monte Carlo is spent."""
    classes = list(sp.data.classes)
    log(f"[check] class index → name (sorted folder names): {class_mapping(classes)}")
    acc, n = base_accuracy(w, sp)
    chance = 1.0 / len(classes)
    log(f"[check] your model's top-1 accuracy on {n} images of DATA: {acc:.1%} (chance {chance:.1%})")
    if acc > NEAR_CHANCE * chance:
        return
    near = f"your model's top-1 accuracy on {n} images of DATA is {acc:.1%}, near chance ({chance:.1%})"
    if force:
        log(f"[check] --force: going on although {near}")
        return
    raise UserModelError(
        f"{near}: are its outputs in the order of the sorted class names above, and its input as "
        "--channels and --mean/--std say? (--force goes on anyway)"
    )


def radius_caps(prof: Profile, sigma: float) -> dict[str, float]:
    """The largest radius each method can certify with ``prof``'s sizes, before any draw is spent:
    RRISE ``σ·Φ⁻¹(β^(1/N_cal))`` (``N_cal + cap_draws`` draws at the cap; a calibration quantile
    above 0 lowers it further), Cohen ``σ·Φ⁻¹(α^(1/n))`` (every one of n draws on one class).

    >>> from rrise.calibrate.profiles import get_profile
    >>> caps = radius_caps(get_profile("quick"), 0.25)
    >>> round(caps["rrise"], 3), round(caps["cohen"], 3)
    (0.616, 0.616)
    """
    n_top = prof.n_cal + prof.cap_draws if prof.cap_draws else prof.n_cal
    return {
        "rrise": sigma * float(norm_ppf(p_cap(prof.beta, n_top))),
        "cohen": sigma * float(norm_ppf(p_cap(prof.mc_alpha, prof.n))),
    }


def _log_caps(w: Workdir, log: Callable[[str], None]) -> None:
    """Say, before any draw is spent, the largest radius these sizes can certify, and when they
    cap RRISE below what Cohen's test on the same run can reach."""
    p, sigma = w.prof, w.config.sigma
    caps = radius_caps(p, sigma)
    log(
        f"[build] largest radius these sizes can certify: RRISE {caps['rrise']:.3f} (N_cal = "
        f"{p.n_cal:,}, β = {p.beta:g}, less its calibration quantile), Cohen {caps['cohen']:.3f} "
        f"(n = {p.n:,}, α = {p.mc_alpha:g}); σ = {sigma:g}"
    )
    if caps["rrise"] < caps["cohen"] - 1e-9:
        log(
            f"[build] N_cal = {p.n_cal:,} caps RRISE below Cohen's {caps['cohen']:.3f}: a larger "
            "profile (or profile.n_cal=N, profile.cap_draws=N) lifts it"
        )


def _log_budget(w: Workdir, log: Callable[[str], None]) -> None:
    """Say how many base-model evaluations the stages will spend, and how long at the measured
    rate, and the largest radius the sizes can certify."""
    _log_caps(w, log)
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


def _source(x: str | os.PathLike) -> str:
    """A path as an absolute path (stage commands run from anywhere); a name as it is."""
    text = os.fspath(x)
    return str(Path(text).resolve()) if Path(text).exists() else text


def _build(options: BuildOptions, module: Any, log: Callable[[str], None], state: dict[str, bool]) -> Path:
    """:func:`build`'s work; ``state["stages"]`` turns True once the Monte Carlo stages start."""
    prof = get_profile(options.profile.value, USER_DATASET)

    # 1. everything the user gave, checked before anything is written
    um, model = _load_model(options, module, log)
    data, sp = _load_images(options, um, prof, log)

    # 2. the work folder; the user's model is its base model
    config = RunConfig(dataset=USER_DATASET, profile=prof.name, sigma=float(options.sigma), seed=options.seed,
                       model=model, data=data)  # fmt: skip
    w = Workdir.open(options.workdir, config, show_progress=not options.no_progress, log=log)
    w.user_model = um
    w.loaded_data = combine(data, sp, prof)
    atomic_write_json(w.path("data_splits.json"), sp.to_dict())
    stale_base = file_sha256(w.path("base.onnx")) not in (None, um.onnx_sha256)
    run_stage(w, "train-base", force=stale_base)
    _check_base_model(w, sp, options.force, log)

    # 3. what the Monte Carlo will cost, at a measured rate
    _log_budget(w, log)

    # 4. the stages
    state["stages"] = True
    for name in BUILD_STAGES:
        run_stage(w, name)
    metrics = read_json(w.path("report/metrics.json"))
    if metrics:
        for line in verdict_lines(metrics):
            log(line)
    return w.path("bundle")
