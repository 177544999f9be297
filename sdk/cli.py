"""The ``rrise`` command line. Every command imports its stage lazily: ``rrise --help`` needs no torch."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup, TyperOption

from rrise.export.precision import Precision

FOXGLOVE_DEFAULT = "127.0.0.1:8765"  # where `rrise run --foxglove` serves when given no HOST:PORT

# `rrise --help` lists the commands in the order a user runs them, then the tools around a bundle.
COMMAND_ORDER = (
    "demo",
    "build",
    "train-base",
    "targets",
    "train-surrogate",
    "select-rule",
    "calibrate",
    "certify",
    "train-baseline",
    "reference",
    "evaluate",
    "export",
    "inspect",
    "run",
    "subscribe",
    "audit",
)


class PipelineOrderGroup(TyperGroup):
    """Commands in :data:`COMMAND_ORDER`, any other after them in the order they were added."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


def _flags_without_metavar() -> None:
    """A flag takes no value, so --help shows no `<bool>` type beside it (typer shows one)."""
    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_without_metavar()

app = typer.Typer(
    name="rrise",
    cls=PipelineOrderGroup,
    help="Certified-robust image classification: randomized smoothing with a calibrated surrogate.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)


class ProfileName(str, Enum):
    quick = "quick"
    medium = "medium"
    full = "full"
    full_small = "full-small"


class RuleName(str, Enum):
    """Mirrors rrise.calibrate.rules.RULES (kept here: `rrise --help` must not import numpy-heavy code)."""

    single = "single"
    bins = "bins"
    map = "map"
    map_tau005 = "map-tau0.05"
    map_tau05 = "map-tau0.5"
    map_bins = "map+bins"
    scale = "scale"
    map_tau05_scale = "map-tau0.5+scale"


class AugmentName(str, Enum):
    """Mirrors rrise.calibrate.train.AUGMENTATIONS."""

    none = "none"
    shift = "shift"
    flip = "flip"
    shift_flip = "shift+flip"


class DatasetName(str, Enum):
    fashion_mnist = "fashion-mnist"
    mnist = "mnist"
    digits = "digits"


class DropPolicy(str, Enum):
    auto = "auto"
    latest = "latest"
    block = "block"


class BackendName(str, Enum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class RecordFormat(str, Enum):
    foxglove = "foxglove"
    ros2 = "ros2"


WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="Work folder of the pipeline.")]
DatasetOpt = Annotated[
    DatasetName | None, typer.Option(help="Dataset (default: the folder's, else fashion-mnist).")
]
ProfileOpt = Annotated[
    ProfileName | None,
    typer.Option(
        help="Sizes: quick (minutes on a CPU), medium (quick models, full-size MC on fewer inputs), "
        "full (the default sizes) or full-small (full sizes, edge-sized base model)."
    ),
]
SigmaOpt = Annotated[float | None, typer.Option(help="Noise level σ in [0,1]-pixel units (default 0.25).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for splits, training and Monte Carlo (default 0).")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Folder with MNIST/Fashion-MNIST *-ubyte.gz files.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its outputs exist.")]
QuietOpt = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


class _OneLineFormatter(logging.Formatter):
    """``warning: message``: a log line for a person, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _logging_to_stderr() -> Iterator[None]:
    """The SDK's info and warnings (retries, subscribers, records that went nowhere) on stderr."""
    logger = logging.getLogger("rrise")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


# Set when a command has said it was interrupted; typer turns any other Ctrl-C into a silent exit 130.
_interrupt_reported: list[bool] = []


def _messages_not_tracebacks(command: Callable[..., Any]) -> Callable[..., Any]:
    """For long-running commands: SDK logs on stderr, and SIGINT/SIGTERM before the command takes
    them over (while the bundle loads, the source opens…) end it with a message and exit 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            with _logging_to_stderr():
                return command(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupt_reported.append(True)
            raise _fail("interrupted: stopped before the end; every output opened was closed", 130) from None
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper


def _check_levels(**levels: float | None) -> None:
    """Probability options (``--alpha``, ``--beta``, ``--delta``), checked by name before any work."""
    for name, value in levels.items():
        if value is not None and not 0.0 < value < 1.0:
            raise _fail(f"--{name} must be in (0, 1), got {value:g}")


def _workdir(workdir: Path, dataset, profile, sigma, seed, data_dir, quiet: bool):
    """Open a work folder; options left out take the folder's recorded values, then the defaults."""
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config
    from rrise.datasets import DatasetNotFoundError

    given = {
        "dataset": dataset.value if dataset else None,
        "profile": profile.value if profile else None,
        "sigma": sigma,
        "seed": seed,
    }
    try:  # every value is checked (RunConfig) before the folder or its run.json is written
        have = recorded_config(workdir)
        fields = {k: v if v is not None else have.get(k) for k, v in given.items()}
        fields = {k: v for k, v in fields.items() if v is not None}
        user = have.get("user")  # a `rrise build` folder: its model and images, as recorded
        config = RunConfig(**fields, data_dir=str(data_dir) if data_dir else None, user=user)
        w = Workdir.open(workdir, config, show_progress=not quiet)
        w.splits()  # loads the data: a missing dataset fails here, with how to get it
    except (ValueError, DatasetNotFoundError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    return w


STAGE_HELP = {
    "train-base": "Train the base classifier with Gaussian noise augmentation (writes base.pt, base.onnx).",
    "targets": "Monte Carlo class counts of the base model: the surrogate's training targets.",
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


def _run_stage(w, stage: str, force: bool = False, **options):
    """Run a stage; a stage run too early or on stale inputs (or any bad setting) exits 1 saying why."""
    from rrise.calibrate.pipeline import run_stage

    try:
        return run_stage(w, stage, force=force, **options)
    except ValueError as exc:  # StageNotReady, StoreMismatchError, bad settings
        raise _fail(str(exc)) from None


def _stage_command(stage: str, example: str):
    def command(
        workdir: WorkdirOpt,
        dataset: DatasetOpt = None,
        profile: ProfileOpt = None,
        sigma: SigmaOpt = None,
        seed: SeedOpt = None,
        data_dir: DataDirOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        w = _workdir(workdir, dataset, profile, sigma, seed, data_dir, quiet)
        for path in _run_stage(w, stage, force=force):
            typer.echo(str(path))

    command.__doc__ = f"{STAGE_HELP[stage]}\n\nExample: `{example}`"
    return command


for _name, _example in [
    ("train-base", "rrise train-base --workdir runs/fmnist --profile quick"),
    ("train-baseline", "rrise train-baseline --workdir runs/fmnist"),
    ("reference", "rrise reference --workdir runs/fmnist"),
    ("certify", "rrise certify --workdir runs/fmnist"),
    ("evaluate", "rrise evaluate --workdir runs/fmnist"),
]:
    app.command(_name)(_stage_command(_name, _example))


@app.command("select-rule")
def select_rule(
    workdir: WorkdirOpt,
    cap_draws: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Compare the rules as `rrise calibrate --cap-draws N₂` will run them: rule-selection "
            "inputs whose N_cal draws all fell on one class get N₂ fresh draws (> N_cal); 0 = off "
            "(default: the profile's).",
        ),
    ] = None,
    dataset: DatasetOpt = None,
    profile: ProfileOpt = None,
    sigma: SigmaOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Choose the calibration rule (one quantile, confidence bins, learned score map) on the
    selection split, with full-size MC there: writes rules.json, which `rrise calibrate` then follows.

    Example: `rrise select-rule --workdir runs/fmnist --cap-draws 30000`
    """
    w = _workdir(workdir, dataset, profile, sigma, seed, data_dir, quiet)
    options = {} if cap_draws is None else {"cap_draws": cap_draws}
    for path in _run_stage(w, "select-rule", force=force, **options):
        typer.echo(str(path))


@app.command("targets")
def targets(
    workdir: WorkdirOpt,
    dataset: DatasetOpt = None,
    profile: ProfileOpt = None,
    sigma: SigmaOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    force: ForceOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Continue a partial count store if its metadata (base-model hash, σ, N, seed, dataset, "
            "split) matches, refusing and naming the field if not (default); --no-resume starts over.",
        ),
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Monte Carlo class counts of the base model: the surrogate's training targets.

    Writes sharded count stores (targets/train/, targets/selection/), each shard atomically; an
    interrupted run resumes where it stopped. Multi-GPU or multi-node: launch it with torchrun, e.g.
    `torchrun --nproc-per-node 4 -m rrise targets --workdir runs/fmnist` (each rank samples its shards).

    Example: `rrise targets --workdir runs/fmnist --resume`
    """
    from rrise.calibrate.pipeline import run_targets

    w = _workdir(workdir, dataset, profile, sigma, seed, data_dir, quiet)
    try:
        paths = run_targets(w, force=force, resume=resume)
    except ValueError as exc:  # StageNotReady, StoreMismatchError
        raise _fail(str(exc)) from None
    for path in paths:
        typer.echo(str(path))


class ScoreName(str, Enum):
    probit = "probit"
    logit = "logit"
    identity = "identity"


@app.command("train-surrogate")
def train_surrogate(
    workdir: WorkdirOpt,
    arch: Annotated[
        str | None,
        typer.Option(
            help="base: start from the base model's weights (the default); cnn or cnn-small: a fresh "
            "network, e.g. smaller for the edge."
        ),
    ] = None,
    augment: Annotated[
        AugmentName | None,
        typer.Option(
            help="Augment training inputs: default none. With fresh targets the draws are made on the "
            "augmented image (exact targets, more inputs); with a fixed store the targets stay the "
            "clean image's."
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Fresh-target training steps (default: the profile's; 0 fits the fixed `rrise "
            "targets` store). Each costs batch × draws base-model evaluations.",
        ),
    ] = None,
    draws: Annotated[
        int | None,
        typer.Option(min=1, help="Fresh base-model draws per image and step (default: the profile's)."),
    ] = None,
    hard_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.95,
            help="Share of each fresh-target batch drawn towards images the smoothed classifier is "
            "unsure of (found with 16 draws per training image, counted in the cost); default: the "
            "profile's (0.5 for full and full-small, 0 = uniform for quick).",
        ),
    ] = None,
    dataset: DatasetOpt = None,
    profile: ProfileOpt = None,
    sigma: SigmaOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the surrogate on counts/N (soft-label cross-entropy), selected on held-out KL.

    With the profile's fresh targets (the quick profile), each step labels a new batch of training
    images (never selection or calibration ones) with a few fresh base-model draws; otherwise it fits
    the `rrise targets` store. Checkpointed as it goes: run it again after a crash and it resumes
    where it stopped.

    Example: `rrise train-surrogate --workdir runs/fmnist --steps 6000 --draws 16`
    """
    w = _workdir(workdir, dataset, profile, sigma, seed, data_dir, quiet)
    named = {
        "arch": arch,
        "augment": augment and augment.value,
        "steps": steps,
        "draws": draws,
        "hard_fraction": hard_fraction,
    }
    options = {k: v for k, v in named.items() if v is not None}
    for path in _run_stage(w, "train-surrogate", force=force, **options):
        typer.echo(str(path))


@app.command()
def calibrate(
    workdir: WorkdirOpt,
    alpha: Annotated[float | None, typer.Option(help="Miscoverage α (default: the profile's, 0.01).")] = None,
    beta: Annotated[float | None, typer.Option(help="MC lower-bound level β (default 0.001).")] = None,
    delta: Annotated[
        float | None,
        typer.Option(
            help="Training-conditional (PAC) quantile: holds with probability ≥ 1−δ over calibration."
        ),
    ] = None,
    score: Annotated[ScoreName, typer.Option(help="Score transform T.")] = ScoreName.probit,
    rule: Annotated[
        RuleName | None,
        typer.Option(help="Calibration rule (default: the one `rrise select-rule` chose, else single)."),
    ] = None,
    bins: Annotated[
        int | None,
        typer.Option(
            help="Override the rule's number of confidence bins (Mondrian quantiles, edges from the "
            "selection split); 1 = one quantile."
        ),
    ] = None,
    cap_draws: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="More draws at the cap: calibration inputs whose N_cal draws all fell on one class get "
            "this many fresh draws (> N_cal), lifting the radius cap to σ·Φ⁻¹(β^(1/N₂)); 0 = off "
            "(default: those `rrise select-rule --cap-draws` chose the rule with, else the profile's).",
        ),
    ] = None,
    dataset: DatasetOpt = None,
    profile: ProfileOpt = None,
    sigma: SigmaOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fresh MC on held-out calibration inputs, then the split-conformal quantile q̂.

    Refuses too few calibration inputs and names the smallest m that works. The MC counts are kept:
    calibrating again with another --alpha, --delta or --score costs one surrogate pass.

    Example: `rrise calibrate --workdir runs/fmnist --alpha 0.01 --delta 0.05`
    """
    _check_levels(alpha=alpha, beta=beta, delta=delta)
    w = _workdir(workdir, dataset, profile, sigma, seed, data_dir, quiet)
    options = {k: v for k, v in {"alpha": alpha, "beta": beta, "delta": delta}.items() if v is not None}
    if score is not ScoreName.probit:
        options["score"] = score.value
    if bins is not None:
        options["bins"] = bins
    if rule is not None:
        options["rule"] = rule.value
    if cap_draws is not None:
        options["cap_draws"] = cap_draws
    for path in _run_stage(w, "calibrate", force=force, **options):
        typer.echo(str(path))
    typer.echo(w.path("calibration.json").read_text())


@app.command("build")
def build(
    model: Annotated[
        str,
        typer.Option(
            help="Your classifier: path.onnx, path.pt2 (torch.export) or package.module:attribute "
            "(an nn.Module or a function returning one)."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Images the model did NOT train on, from the deployment distribution: an ImageFolder "
            "(root/<class>/<image>), an .npz (images, labels, optional classes) or a built-in name."
        ),
    ],
    workdir: WorkdirOpt,
    sigma: Annotated[float, typer.Option(help="Noise level σ in [0,1]-pixel units.")] = 0.25,
    profile: Annotated[
        str, typer.Option(help="Sizes: quick, medium, full, full-small or smoke (tests only).")
    ] = "quick",
    train_data: Annotated[
        str | None, typer.Option(help="Images the model trained on (used only as surrogate targets).")
    ] = None,
    output: Annotated[str | None, typer.Option(help="Which model output holds the [B, K] scores.")] = None,
    output_kind: Annotated[str | None, typer.Option(help="logits or probs (default: detected).")] = None,
    input_size: Annotated[
        tuple[int, int] | None,
        typer.Option(help="H W of the model input, where the model does not fix it."),
    ] = None,
    channels: Annotated[str | None, typer.Option(help="rgb (default), bgr or gray.")] = None,
    mean: Annotated[
        list[str] | None,
        typer.Option(
            help="Normalization mean the model expects: one value or one per channel, e.g. "
            "--mean 0.485 0.456 0.406 (or 0.485,0.456,0.406)."
        ),
    ] = None,
    std: Annotated[
        list[str] | None,
        typer.Option(help="Normalization std the model expects, like --mean."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Weights for a factory MODEL: .pt (weights_only) or .safetensors.")
    ] = None,
    surrogate_arch: Annotated[
        str,
        typer.Option(
            help="auto (a copy of a torch base, else edge), base, edge, edge-resnet, cnn, cnn-small or "
            "package.module:function."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for splits, training and Monte Carlo.")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Certify your own classifier on your own images: every stage, then `WORKDIR/bundle`.

    Runs targets → surrogate → rule selection → calibration → Cohen's baseline on the test split →
    report → bundle; a rerun skips what is current, and every stage command works on the folder.

    Example: `rrise build --model model.onnx --data images/ --workdir runs/mine --sigma 0.25`
    """
    from rrise.calibrate.building import build as run_build
    from rrise.datasets import DatasetNotFoundError

    try:
        mean, std = _floats("--mean", mean), _floats("--std", std)
        bundle = run_build(
            model,
            data,
            workdir,
            sigma=sigma,
            profile=profile,
            seed=seed,
            train_data=train_data,
            output=output,
            output_kind=output_kind,
            input_size=list(input_size) if input_size else None,
            channels=channels,
            mean=mean,
            std=std,
            weights=weights,
            surrogate_arch=surrogate_arch,
            show_progress=not quiet,
        )
    except (ValueError, DatasetNotFoundError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(str(bundle))


@app.command()
def demo(
    workdir: WorkdirOpt = Path("runs/demo"),
    profile: ProfileOpt = None,
    dataset: DatasetOpt = None,
    sigma: SigmaOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The whole pipeline on this machine: base model → MC targets → surrogate → calibration →
    Cohen MC baseline → report → bundle → runtime on a video, publishing records over ZeroMQ.

    Example: `rrise demo --workdir runs/demo --profile quick --dataset fashion-mnist`
    """
    from rrise.calibrate.pipeline import run_demo

    from .summary import print_demo_summary

    w = _workdir(workdir, dataset, profile, sigma, seed, data_dir, quiet)
    try:
        result = run_demo(w, force=force)
    except ValueError as exc:  # e.g. too few calibration inputs, a count store made otherwise
        raise _fail(str(exc)) from None
    print_demo_summary(w.root, result)


def _mount_export() -> None:
    """`rrise export` is `rrise-export`: the same commands (`build`, `add-variant`), flat form,
    options and help (no torch at import)."""
    from rrise.export.cli import app as export_app

    app.add_typer(export_app, name="export")


_mount_export()


TrustOpt = Annotated[
    Path | None,
    typer.Option(
        "--trust",
        help="Ed25519 public key (KEY.pub from `rrise keys`): refuse a bundle unless its manifest.sig "
        "is this key's valid signature of its manifest.",
    ),
]


def _trusted_key(path: Path | None):
    """The public key in ``path`` (None when not given); exit 1 naming the file if it is unusable."""
    if path is None:
        return None
    from .signing import SigningError, load_public_key

    try:
        return load_public_key(path)
    except SigningError as exc:
        raise _fail(f"--trust: {exc}") from None


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Recompute each variant's quantile from calibration.npz and that variant's own model "
            "and refuse a mismatch (TensorRT engines: not verifiable off their device).",
        ),
    ] = False,
    trust: TrustOpt = None,
) -> None:
    """Show a bundle's manifest, id, signature, guarantee and integrity; exit 1 on any integrity
    failure (and, with --trust, unless a valid signature by that key covers the manifest).

    Example: `rrise inspect runs/demo/bundle --verify --trust keys/robot.pub`
    """
    from .inspect import format_inspection, inspect_bundle

    summary, problems = inspect_bundle(bundle, trust=_trusted_key(trust), verify=verify)
    if as_json:
        typer.echo(json.dumps({"summary": summary, "problems": problems, "ok": not problems}, indent=2))
    else:
        typer.echo(format_inspection(summary, problems))
    if problems:
        raise typer.Exit(1)


class KeyKind(str, Enum):
    signing = "signing"
    curve = "curve"


@app.command()
def keys(
    prefix: Annotated[Path, typer.Argument(help="Path prefix of the key files, e.g. keys/robot.")],
    kind: Annotated[
        KeyKind,
        typer.Option(
            "--kind",
            help="signing: an Ed25519 pair, PREFIX.key (0600, signs bundles: rrise-export --sign) and "
            "PREFIX.pub (rrise run/inspect --trust). curve: a ZeroMQ CURVE pair, PREFIX.curve.key "
            "(rrise run --curve-secret) and PREFIX.curve.pub (rrise subscribe --curve-server-key).",
        ),
    ],
) -> None:
    """Make a key pair: Ed25519 for signing bundles, or ZeroMQ CURVE for an encrypted record stream.
    Never overwrites a key.

    Example: `rrise keys keys/robot --kind signing`
    """
    try:
        if kind is KeyKind.signing:
            from .signing import key_fingerprint, load_public_key, write_signing_keypair

            public, secret = write_signing_keypair(prefix)
            note = f" (key {key_fingerprint(load_public_key(public))})"
        else:
            from .curve import write_curve_keypair

            public, secret = write_curve_keypair(prefix)
            note = ""
    except (ValueError, OSError) as exc:  # SigningError and CurveKeyError are ValueErrors
        raise _fail(str(exc)) from None
    typer.echo(f"public  {public}{note}")
    typer.echo(f"secret  {secret} (mode 0600: keep it private)")


@app.command()
@_messages_not_tracebacks
def run(
    bundle: Annotated[Path, typer.Option(help="Bundle folder (made by `rrise demo` or `rrise-export`).")],
    source: Annotated[
        str,
        typer.Option(
            help="Camera index, video file, RTSP/HTTP URL, GStreamer pipeline, image folder, or a "
            "recording to replay (.mcap file, ROS 2 bag folder)."
        ),
    ],
    publish: Annotated[
        str | None,
        typer.Option(
            help="ZeroMQ endpoint to bind and publish on, on one interface: e.g. tcp://127.0.0.1:5555 "
            "or tcp://192.168.1.10:5555 (tcp://*:5555 only with --curve-secret). Records published "
            "before a subscriber connects are lost: see --wait-subscribers."
        ),
    ] = None,
    jsonl: Annotated[
        str | None, typer.Option(help="Write records as JSON lines to a file, or '-' for stdout.")
    ] = None,
    backend: Annotated[BackendName, typer.Option(help="Inference backend.")] = BackendName.auto,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    wait_subscribers: Annotated[
        int,
        typer.Option(
            min=0,
            help="With --publish: wait (up to --wait-timeout s) for this many subscribers before the "
            "first frame, so a short file is not published to no one.",
        ),
    ] = 0,
    wait_timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds --wait-subscribers waits before starting anyway.")
    ] = 5.0,
    batch: Annotated[
        int, typer.Option(min=1, help="Certify up to this many queued frames per backend call.")
    ] = 1,
    drop_policy: Annotated[
        DropPolicy,
        typer.Option(
            help="latest: keep the newest frames, count drops (live default); block: every frame "
            "in order (file default); auto: by source."
        ),
    ] = DropPolicy.auto,
    queue_size: Annotated[
        int | None, typer.Option(min=1, help="Frames the capture queue holds (default by policy).")
    ] = None,
    status_interval: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds between status records on TOPIC.status (0: none)."),
    ] = 1.0,
    no_monitor: Annotated[
        bool,
        typer.Option(
            "--no-monitor", help="Turn the distribution-shift alarm and the out-of-distribution flag off."
        ),
    ] = False,
    monitor_window: Annotated[
        int | None,
        typer.Option(
            help="Records in each window of the distribution-shift test (default: the bundle's, 200)."
        ),
    ] = None,
    monitor_step: Annotated[
        int | None,
        typer.Option(help="Test the last window every this many records (default: a quarter of the window)."),
    ] = None,
    monitor_false_alarm: Annotated[
        float | None,
        typer.Option(
            help="Probability of a false shift alarm per window of in-distribution records "
            "(default: the bundle's, 0.001)."
        ),
    ] = None,
    ood_rate: Annotated[
        float | None,
        typer.Option(
            help="Flag a frame 'ood' when its out-of-distribution p-value (ood_p) is at most this: "
            "the rate clean frames are flagged at. 0: report ood_p only. Default 0.001, or 1/(n+1) "
            "for a bundle whose reference has n < 999 inputs."
        ),
    ] = None,
    no_ood: Annotated[
        bool, typer.Option("--no-ood", help="No per-frame out-of-distribution p-value or flag.")
    ] = False,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="Run the bundle's variant of this precision (certified with that variant's own quantile); "
            "default: an engine for this GPU if any, else fp32."
        ),
    ] = None,
    expect_id: Annotated[
        str | None,
        typer.Option(
            "--expect-id",
            help="Refuse any bundle whose id (shown by `rrise inspect`, carried by every record) "
            "is not this one.",
        ),
    ] = None,
    trust: TrustOpt = None,
    save_video: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Write every frame with its label, radius (and a bar against the largest radius "
            "the bundle can certify), abstain, error and alarm drawn on it (.mp4, .avi, .mkv).",
        ),
    ] = None,
    record: Annotated[
        Path | None,
        typer.Option(
            metavar="PATH",
            help="Record the frames (JPEG) and records, stamped with their capture time: a .mcap file "
            "that Foxglove opens as is, or with --record-format ros2 a ROS 2 bag folder.",
        ),
    ] = None,
    record_format: Annotated[
        RecordFormat,
        typer.Option(
            help="foxglove: Foxglove schemas (protobuf images, JSON records) in one .mcap file; ros2: a "
            "ROS 2 bag (CDR, rrise_msgs/CertifiedPrediction) for `ros2 bag play`."
        ),
    ] = RecordFormat.foxglove,
    foxglove: Annotated[
        str | None,
        typer.Option(
            metavar="[HOST:PORT]",
            help="Serve frames, records and status live to the Foxglove app (Foxglove WebSocket) "
            f"on HOST:PORT; alone: {FOXGLOVE_DEFAULT}.",
        ),
    ] = None,
    realtime: Annotated[
        bool,
        typer.Option(
            "--realtime",
            help="Replay a video file or a recording at its recorded pace, like the camera it came "
            "from (a model that falls behind drops frames); default: flat out, every frame.",
        ),
    ] = False,
    loop: Annotated[
        bool,
        typer.Option("--loop", help="Replay a video file or a recording over and over (soak tests)."),
    ] = False,
    retry: Annotated[
        str,
        typer.Option(
            help="Retry a source that is absent at start (camera unplugged, stream not up, file not "
            "yet written): a count, or 'forever'; backoff 0.5 s doubling to 8 s.",
        ),
    ] = "0",
    curve_secret: Annotated[
        Path | None,
        typer.Option(
            "--curve-secret",
            help="Encrypt --publish with CURVE using this secret key file (from `rrise keys NAME "
            "--kind curve`: NAME.curve.key); subscribers need NAME.curve.pub.",
        ),
    ] = None,
    no_output: Annotated[
        bool,
        typer.Option(
            "--no-output", help="Certify and discard every record (e.g. to time a bundle), without a warning."
        ),
    ] = False,
) -> None:
    """Certify every frame of a stream and publish one record per frame.

    Capture runs in its own thread; live sources keep the newest frames and count drops, files
    give every frame in order. SIGINT/SIGTERM flush every output and exit 0.

    Example: `rrise run --bundle runs/demo/bundle --source runs/demo/demo_video.avi --jsonl -`
    """
    from rrise.bundle import BundleError
    from rrise.runtime import run_stream
    from rrise.runtime.frame_outputs import FrameOutputs
    from rrise.runtime.sinks import SinkError
    from rrise.runtime.sources import SourceError

    trusted = _trusted_key(trust)
    try:
        summary = run_stream(
            bundle,
            source,
            publish=publish,
            jsonl=jsonl,
            backend=backend.value,
            max_frames=max_frames,
            wait_subscribers=wait_subscribers,
            batch=batch,
            drop_policy=drop_policy.value,
            queue_size=queue_size,
            status_interval_s=status_interval,
            monitor=not no_monitor,
            monitor_options=_monitor_options(
                monitor_window, monitor_step, monitor_false_alarm, ood_rate, no_ood
            ),
            precision=None if precision is None else precision.value,
            expect_id=expect_id,
            trust=trusted,
            outputs=FrameOutputs(
                record=None if record is None else str(record),
                record_format=record_format.value,
                save_video=None if save_video is None else str(save_video),
                foxglove=foxglove,
            ),
            realtime=realtime,
            loop=loop,
            show_progress=sys.stderr.isatty(),  # a live line: frames, fps, drops, abstain, last label
            wait_timeout_s=wait_timeout,
            retry=retry,
            curve_secret=curve_secret,
            no_output=no_output,
        )
    except (BundleError, SourceError, SinkError, RuntimeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps({"summary": summary}), err=True)
    if summary.get("source_error"):
        raise _fail(f"the source failed: {summary['source_error']}")


def _monitor_options(
    window: int | None, step: int | None, false_alarm: float | None, ood_rate: float | None, no_ood: bool
) -> dict[str, Any]:
    """``rrise run``'s monitor flags as :func:`rrise.monitor.load_monitors` options (unset: the bundle's)."""
    options = {"window": window, "step": step, "false_alarm": false_alarm, "ood_rate": ood_rate}
    options = {k: v for k, v in options.items() if v is not None}
    return {**options, "ood": False} if no_ood else options


@app.command()
@_messages_not_tracebacks
def subscribe(
    endpoint: Annotated[
        str, typer.Argument(help="Publisher to connect to, e.g. tcp://127.0.0.1:5555 or tcp://robot:5555.")
    ],
    count: Annotated[int | None, typer.Option(min=1, help="Exit after this many records.")] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Exit after this many seconds without a message; exit status 1 if no record came at all.",
        ),
    ] = None,
    topic: Annotated[str, typer.Option(help="Topic to subscribe to.")] = "rrise",
    status: Annotated[
        bool, typer.Option("--status", help="Print the runtime's status records too (kind=status).")
    ] = False,
    curve_server_key: Annotated[
        Path | None,
        typer.Option(
            "--curve-server-key",
            help="The publisher's CURVE public key file (NAME.curve.pub) when it runs with --curve-secret.",
        ),
    ] = None,
    max_message_size: Annotated[
        int,
        typer.Option(
            min=1024, help="Refuse messages larger than this many bytes unread (a record is ~300 bytes)."
        ),
    ] = 16 * 1024,
) -> None:
    """Print records from a running `rrise run --publish` as JSON lines.

    Reconnects by itself when the publisher restarts; skips and counts messages that are not valid
    records (wrong types, another schema version, garbage) and records lost on the way. Ends with
    "received N records from ENDPOINT" on stderr; with --timeout, exits 1 when nothing came.

    Example: `rrise subscribe tcp://127.0.0.1:5555 --count 10 --timeout 30`
    """
    from .subscriber import subscribe as subscribe_records

    stats: dict[str, int] = {}
    try:
        records = subscribe_records(
            endpoint,
            topic=topic,
            timeout_s=timeout,
            stats=stats,
            status=status,
            max_message_bytes=max_message_size,
            curve_server_key=curve_server_key,
        )
    except (ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    interrupted = False
    try:
        for n, record in enumerate(records, start=1):
            sys.stdout.write(json.dumps(record, default=_json_value) + "\n")
            sys.stdout.flush()
            if count is not None and n >= count:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        records.close()
    typer.echo(_subscribe_report(endpoint, stats), err=True)
    if stats["received"] == 0 and not interrupted:
        raise typer.Exit(1)


def _json_value(value: Any) -> Any:
    """Record values JSON has no type for (bytes a newer publisher might add): hex text."""
    return value.hex() if isinstance(value, (bytes, bytearray)) else repr(value)


def _subscribe_report(endpoint: str, stats: dict[str, int]) -> str:
    """What `rrise subscribe` ends with: how many records came, and why none did when none did."""
    n = stats["received"]
    parts = [f"received {n} record{'' if n == 1 else 's'} from {endpoint}"]
    for key, what in (
        ("malformed", "malformed message(s) skipped"),
        ("missed", "record(s) missed (gaps in seq)"),
        ("restarts", "publisher restart(s)"),
    ):
        if stats.get(key):
            parts.append(f"{stats[key]} {what}")
    if n == 0 and stats.get("handshake_failures"):
        parts.append("the CURVE handshake failed: check --curve-server-key (does the publisher use CURVE?)")
    elif n == 0 and not stats.get("connects"):
        parts.append("never connected: is a publisher running there?")
    elif n == 0 and stats.get("disconnects"):
        parts.append("the connection closed: a message over --max-message-size is refused")
    return "; ".join(parts)


VECTOR_OPTIONS = ("--mean", "--std")


def _floats(option: str, values: list[str] | None) -> float | list[float] | None:
    """``--mean 0.5``, ``--mean 0.4,0.5,0.6`` or repeated ``--mean``: one float or a list of them."""
    if not values:
        return None
    parts = [p for v in values for p in v.replace(",", " ").split()]
    try:
        floats = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{option} takes numbers, got {' '.join(values)!r}") from None
    return floats[0] if len(floats) == 1 else floats


def spread_vector_options(argv: list[str]) -> list[str]:
    """``--mean 0.4 0.5 0.6`` → ``--mean 0.4 --mean 0.5 --mean 0.6`` (click options take one value)."""
    out: list[str] = []
    option, taken = None, 0
    for arg in argv:
        if option is not None and not arg.startswith("-") and _is_number(arg):
            out += [option, arg]
            taken += 1
            continue
        if option is not None and taken == 0:
            out.append(option)  # no number followed: let the parser say what is missing
        option, taken = (arg, 0) if arg in VECTOR_OPTIONS else (None, 0)
        if option is None:
            out.append(arg)
    if option is not None and taken == 0:
        out.append(option)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", " ").split()[0])
    except (ValueError, IndexError):
        return False
    return True


def optional_values(argv: list[str]) -> list[str]:
    """``--foxglove`` with no value (last, or before another option) → ``--foxglove 127.0.0.1:8765``
    (click options cannot take an optional value)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--foxglove" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(FOXGLOVE_DEFAULT)
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    _interrupt_reported.clear()
    try:
        app(args=spread_vector_options(optional_values(args)), prog_name="rrise")
    except KeyboardInterrupt:  # Ctrl-C before a command started (e.g. while the CLI is built)
        typer.secho("error: interrupted before the command started; nothing was done", err=True, fg="red")
        raise SystemExit(130) from None
    except SystemExit as exc:  # typer's own exit 130 on a Ctrl-C (parsing options, a short command)
        if exc.code == 130 and not _interrupt_reported:
            typer.secho("error: interrupted", err=True, fg="red")
        raise


@app.command()
def audit(
    bundle: Annotated[Path, typer.Option(help="Bundle folder to audit.")],
    dataset: Annotated[
        DatasetName | None,
        typer.Option(
            help="Inputs from the deployment distribution (default: the bundle's calibration dataset)."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Dataset split to draw inputs from.")] = "test",
    n: Annotated[int, typer.Option(help="How many inputs to audit.")] = 100,
    n_mc: Annotated[
        int,
        typer.Option(help="Fresh Monte Carlo draws per input (fewer cannot see an over-claim near the cap)."),
    ] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed for the input choice and the noise.")] = 12345,
    data_dir: DataDirOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write per-input results here (TSV).")] = None,
) -> None:
    """Spot-check a bundle's certificates against fresh MC with its base model (base.onnx).

    Example: `rrise audit --bundle runs/demo/bundle --n 100 --n-mc 20000`
    """
    import numpy as np

    from rrise.bundle import BundleError
    from rrise.calibrate.audit import audit_bundle, bundle_dataset
    from rrise.datasets import DatasetNotFoundError, load_dataset

    try:
        name = dataset.value if dataset is not None else bundle_dataset(bundle)
        ds = load_dataset(name, split, data_dir)
        idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
        result = audit_bundle(bundle, ds.images[idx], n_mc=n_mc, seed=seed)
    except (BundleError, DatasetNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if out is not None:
        rows = ["idx\tlabel\tpred\tradius\tp_lower\tmc_count\tmc_upper\tviolation"]
        for j, i in enumerate(idx):
            rows.append(
                f"{i}\t{ds.labels[i]}\t{result.pred[j]}\t{result.radius[j]:.4f}\t{result.p_lower[j]:.6f}\t"
                f"{result.mc_count[j]}\t{result.mc_upper[j]:.6f}\t{int(result.violation[j])}"
            )
        out.write_text("\n".join(rows) + "\n")
    typer.echo(
        f"audited {len(idx)} inputs with {n_mc} fresh draws each: {result.certified} certified, "
        f"{result.violations} violation(s) (rate {result.violations / max(result.certified, 1):.4f}; "
        f"the guarantee allows α+β = {result.allowed_rate:g}); binomial test p = {result.p_value:.3g}; "
        f"detection limit {result.detection_limit[0]:.4f} (median over certified inputs, up to "
        f"{result.detection_limit[1]:.4f}): a smaller excess of p̃ over the true p_Â goes unseen more "
        "often than not, raise --n-mc to see it"
    )
    if result.p_value < 0.01:
        typer.secho(
            "the violation rate is above what the guarantee allows: recalibrate or check for "
            "distribution shift",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
