"""The pipeline's stage commands on a work folder: ``train-base``, ``targets``,
``train-surrogate``, ``select-rule``, ``calibrate``, ``cohen`` (``certify``: its former name, kept
as a deprecated alias), ``train-baseline``, ``reference``, ``evaluate`` and ``demo``, each bound to
its options (:mod:`rrise.cli.stage_options`). Each imports its stage when it runs.

Every stage also takes ``profile.FIELD=VALUE`` (and a ``profile:`` mapping in ``--config``): a
profile field set otherwise for this folder (``profile.n_targets=7``), recorded in its run.json
beside the profile's name; ``profile.name=quick`` is ``--profile quick``. A folder made with other
values is refused, as with another ``--profile``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import typer

from rrise.calibrate.profiles import Profile
from rrise.options import bind

from .app import app, fail
from .stage_options import (
    CalibrateOptions,
    DemoOptions,
    SelectRuleOptions,
    TargetsOptions,
    TrainSurrogateOptions,
    WorkdirOptions,
)

__all__ = ["PROFILE_FIELDS", "open_workdir"]

PROFILE_FIELDS = {"profile": Profile}  # the `profile.FIELD=VALUE` key group of every stage command

STAGE_HELP = {
    "train-base": "Train the base classifier with Gaussian noise augmentation (writes base.pt, base.onnx).",
    "certify": (
        "Cohen's Monte Carlo baseline: CERTIFY (n0 + n noisy draws per input) with the base model on "
        "the test inputs, for the report's comparison (writes certify.tsv, certify.npz)."
    ),
    "train-baseline": "Train the Accelerated Smoothing baseline (JS-divergence surrogate) for the report.",
    "evaluate": (
        "RRISE (the calibration in calibration.json, as bundled) beside Cohen's Monte Carlo baseline: "
        "report/metrics.json, report/report.md, certified_accuracy.png."
    ),
    "reference": (
        "High-budget reference MC (N_ref = 10⁵ draws on 200 test inputs with the full profiles) for "
        "`rrise evaluate`'s violation rates; not part of the demo."
    ),
}


def open_workdir(options: WorkdirOptions, profile: Mapping[str, Any] | None = None) -> Any:
    """Open a work folder; options left out take the folder's recorded values, then the defaults.
    ``profile``: the ``profile.FIELD=VALUE`` values given (``name`` is ``--profile``)."""
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config
    from rrise.datasets import DatasetNotFoundError

    fields_given = dict(profile or {})
    name = fields_given.pop("name", None)
    given = {
        "dataset": None if options.dataset is None else options.dataset.value,
        "profile": name if options.profile is None else options.profile.value,
        "sigma": options.sigma,
        "seed": options.seed,
    }
    data_dir = None if options.data_dir is None else str(options.data_dir)
    try:  # every value is checked (RunConfig) before the folder or its run.json is written
        have = recorded_config(options.workdir)
        fields = {k: v if v is not None else have.get(k) for k, v in given.items()}
        fields = {k: v for k, v in fields.items() if v is not None}
        user = have.get("user")  # a `rrise build` folder: its model and images, as recorded
        overrides = {**(have.get("profile_overrides") or {}), **fields_given}
        config = RunConfig(**fields, data_dir=data_dir, user=user, profile_overrides=overrides)
        w = Workdir.open(options.workdir, config, show_progress=not options.no_progress)
        w.splits()  # loads the data: a missing dataset fails here, with how to get it
    except (ValueError, DatasetNotFoundError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    return w


def _run_stage(options: WorkdirOptions, extras: Mapping[str, Any], stage: str, **settings: Any) -> Any:
    """Open the folder (``extras["profile"]``: its profile fields given) and run a stage; a stage
    run too early or on stale inputs (or any bad setting) exits 1 saying why. Returns the folder."""
    from rrise.calibrate.pipeline import run_stage

    w = open_workdir(options, extras["profile"])
    try:
        _echo_paths(run_stage(w, stage, force=options.force, **settings))
    except ValueError as exc:  # StageNotReady, StoreMismatchError, bad settings
        raise fail(str(exc)) from None
    return w


def _echo_paths(paths: Iterable[Path]) -> None:
    for path in paths:
        typer.echo(str(path))


def _stage_command(stage: str, summary: str, example: str) -> Any:
    @bind(WorkdirOptions, extras=PROFILE_FIELDS)
    def command(options: WorkdirOptions, extras: dict[str, dict[str, Any]]) -> None:
        _run_stage(options, extras, stage)

    command.__doc__ = f"{summary}\n\nExample: `{example}`"
    return command


for _name, _example in [
    ("train-base", "rrise train-base --workdir runs/fmnist --profile quick"),
    ("train-baseline", "rrise train-baseline --workdir runs/fmnist"),
    ("reference", "rrise reference --workdir runs/fmnist"),
    ("evaluate", "rrise evaluate --workdir runs/fmnist"),
]:
    app.command(_name)(_stage_command(_name, STAGE_HELP[_name], _example))

app.command("cohen")(_stage_command("certify", STAGE_HELP["certify"], "rrise cohen --workdir runs/fmnist"))
app.command("certify", deprecated=True)(
    _stage_command(
        "certify",
        f"The former name of `rrise cohen`, kept for old scripts. {STAGE_HELP['certify']}",
        "rrise cohen --workdir runs/fmnist",
    )
)


@app.command("select-rule")
@bind(SelectRuleOptions, extras=PROFILE_FIELDS)
def select_rule(options: SelectRuleOptions, extras: dict[str, dict[str, Any]]) -> None:
    """Choose the calibration rule (one quantile, confidence bins, learned score map) on the
    selection split, with full-size MC there: writes rules.json, which `rrise calibrate` then follows.

    Example: `rrise select-rule --workdir runs/fmnist --cap-draws 30000`
    """
    settings: dict[str, Any] = {} if options.cap_draws is None else {"cap_draws": options.cap_draws}
    if not options.clip_at_abstention:
        settings["clip_at_abstention"] = False
    _run_stage(options, extras, "select-rule", **settings)


@app.command("targets")
@bind(TargetsOptions, extras=PROFILE_FIELDS)
def targets(options: TargetsOptions, extras: dict[str, dict[str, Any]]) -> None:
    """Monte Carlo class counts of the base model: the surrogate's training targets.

    Writes sharded count stores (targets/train/, targets/selection/), each shard atomically; an
    interrupted run resumes where it stopped. Multi-GPU or multi-node: launch it with torchrun, e.g.
    `torchrun --nproc-per-node 4 -m rrise targets --workdir runs/fmnist` (each rank samples its shards).

    Example: `rrise targets --workdir runs/fmnist --profile quick profile.n_targets=5000`
    """
    from rrise.calibrate.pipeline import run_targets

    w = open_workdir(options, extras["profile"])
    try:
        paths = run_targets(w, force=options.force, resume=options.resume)
    except ValueError as exc:  # StageNotReady, StoreMismatchError
        raise fail(str(exc)) from None
    _echo_paths(paths)


@app.command("train-surrogate")
@bind(TrainSurrogateOptions, extras=PROFILE_FIELDS)
def train_surrogate(options: TrainSurrogateOptions, extras: dict[str, dict[str, Any]]) -> None:
    """Train the surrogate on counts/N (soft-label cross-entropy), selected on held-out KL.

    With the profile's fresh targets (the quick profile), each step labels a new batch of training
    images (never selection or calibration ones) with a few fresh base-model draws; otherwise it fits
    the `rrise targets` store. Checkpointed as it goes: run it again after a crash and it resumes
    where it stopped.

    Example: `rrise train-surrogate --workdir runs/fmnist --steps 6000 --draws 16`
    """
    _run_stage(options, extras, "train-surrogate", **options.stage_settings())


@app.command()
@bind(CalibrateOptions, extras=PROFILE_FIELDS)
def calibrate(options: CalibrateOptions, extras: dict[str, dict[str, Any]]) -> None:
    """Fresh MC on held-out calibration inputs, then the split-conformal quantile q̂.

    Refuses too few calibration inputs and names the smallest m that works. The MC counts are kept:
    calibrating again with another --alpha, --delta or --score costs one surrogate pass.

    Example: `rrise calibrate --workdir runs/fmnist --alpha 0.01 --delta 0.05`
    """
    w = _run_stage(options, extras, "calibrate", **options.stage_settings())
    typer.echo(w.path("calibration.json").read_text())


@app.command()
@bind(DemoOptions, extras=PROFILE_FIELDS)
def demo(options: DemoOptions, extras: dict[str, dict[str, Any]]) -> None:
    """The whole pipeline on this machine: base model → MC targets → surrogate → calibration →
    Cohen MC baseline → report → bundle → runtime on a video, publishing records over ZeroMQ.

    Example: `rrise demo --workdir runs/demo --profile quick --dataset fashion-mnist`
    """
    from rrise.calibrate.pipeline import run_demo
    from rrise.summary import print_demo_summary

    w = open_workdir(options, extras["profile"])
    try:
        result = run_demo(w, force=options.force)
    except ValueError as exc:  # e.g. too few calibration inputs, a count store made otherwise
        raise fail(str(exc)) from None
    print_demo_summary(w.root, result)
