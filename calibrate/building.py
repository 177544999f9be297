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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rrise.fileio import atomic_write_json, read_json
from rrise.runtime.backends import OnnxRuntimeBackend
from rrise.runtime.preprocess import preprocess_spec

from .build_cost import apply_budget, log_budget
from .folder_data import combine, load_sets
from .options import BuildOptions
from .profiles import Profile, get_profile
from .provenance import file_sha256
from .specs import USER_DATASET, ImageData, UserModelSpec
from .stages import run_stage
from .user_data import DataSplits, split_images
from .user_model import UserModel, UserModelError, load_user_model
from .verdict import verdict_lines
from .workdir import RunConfig, Workdir, recorded_config

__all__ = [
    "ACCURACY_SAMPLE",
    "BUILD_STAGES",
    "NEAR_CHANCE",
    "USER_DATASET",
    "base_accuracy",
    "build",
    "build_options",
    "class_mapping",
]

# The stages `rrise build` runs after importing the base model, in order.
BUILD_STAGES = ("targets", "train-surrogate", "select-rule", "calibrate", "certify", "evaluate", "bundle")


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


def _source(x: str | os.PathLike) -> str:
    """A path as an absolute path (stage commands run from anywhere); a name as it is."""
    text = os.fspath(x)
    return str(Path(text).resolve()) if Path(text).exists() else text


def _budget_sizes(options: BuildOptions) -> dict[str, Any]:
    """The sizes a ``--budget-minutes`` run chose for this folder (run.json), so that a rerun, with
    the flag or without it, resumes at them; none for a new folder (sized once its base model is in)."""
    return dict(recorded_config(options.workdir).get("profile_overrides") or {})


def _build(options: BuildOptions, module: Any, log: Callable[[str], None], state: dict[str, bool]) -> Path:
    """:func:`build`'s work; ``state["stages"]`` turns True once the Monte Carlo stages start."""
    prof = get_profile(options.profile.value, USER_DATASET)

    # 1. everything the user gave, checked before anything is written
    um, model = _load_model(options, module, log)
    data, sp = _load_images(options, um, prof, log)

    # 2. the work folder; the user's model is its base model
    config = RunConfig(dataset=USER_DATASET, profile=prof.name, sigma=float(options.sigma), seed=options.seed,
                       model=model, data=data, profile_overrides=_budget_sizes(options))  # fmt: skip
    w = Workdir.open(options.workdir, config, show_progress=not options.no_progress, log=log)
    w.user_model = um
    w.loaded_data = combine(data, sp, prof)
    atomic_write_json(w.path("data_splits.json"), sp.to_dict())
    stale_base = file_sha256(w.path("base.onnx")) not in (None, um.onnx_sha256)
    run_stage(w, "train-base", force=stale_base)
    _check_base_model(w, sp, options.force, log)

    # 3. the sizes (fitted to --budget-minutes), and what they will cost at the measured rates
    if options.budget_minutes is not None:
        w = apply_budget(w, options.budget_minutes, log)
    log_budget(w, log)

    # 4. the stages
    state["stages"] = True
    for name in BUILD_STAGES:
        run_stage(w, name)
    metrics = read_json(w.path("report/metrics.json"))
    if metrics:
        for line in verdict_lines(metrics):
            log(line)
    return w.path("bundle")
