"""The ``rrise`` command line. Every command imports its stage lazily: ``rrise --help`` needs no torch."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from rrise.export.precision import Precision

app = typer.Typer(
    name="rrise",
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


def _workdir(workdir: Path, dataset, profile, sigma, seed, data_dir, quiet: bool):
    """Open a work folder; options left out take the folder's recorded values, then the defaults."""
    from rrise.calibrate.workdir import RunConfig, Workdir
    from rrise.datasets import DatasetNotFoundError

    have = {}
    meta = workdir / "run.json"
    if meta.exists():
        have = json.loads(meta.read_text()).get("config", {})
    given = {
        "dataset": dataset.value if dataset else None,
        "profile": profile.value if profile else None,
        "sigma": sigma,
        "seed": seed,
    }
    fields = {k: v if v is not None else have.get(k) for k, v in given.items()}
    fields = {k: v for k, v in fields.items() if v is not None}
    user = have.get("user")  # a `rrise build` folder: its model and images, as recorded
    config = RunConfig(**fields, data_dir=str(data_dir) if data_dir else None, user=user)
    try:
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
    "select-rule": (
        "Choose the calibration rule (one quantile, confidence bins, learned score map) on the selection "
        "split, with full-size MC there: writes rules.json, which `rrise calibrate` then follows."
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
    ("select-rule", "rrise select-rule --workdir runs/fmnist"),
    ("reference", "rrise reference --workdir runs/fmnist"),
    ("certify", "rrise certify --workdir runs/fmnist"),
    ("evaluate", "rrise evaluate --workdir runs/fmnist"),
]:
    app.command(_name)(_stage_command(_name, _example))


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
        typer.Option(help="Augment training inputs (the targets stay the clean image's): default none."),
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

    Checkpointed after every epoch: run it again after a crash and it resumes where it stopped.

    Example: `rrise train-surrogate --workdir runs/fmnist --arch cnn-small --augment shift`
    """
    w = _workdir(workdir, dataset, profile, sigma, seed, data_dir, quiet)
    options = {k: v for k, v in {"arch": arch, "augment": augment and augment.value}.items() if v}
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
    w = _workdir(workdir, dataset, profile, sigma, seed, data_dir, quiet)
    options = {k: v for k, v in {"alpha": alpha, "beta": beta, "delta": delta}.items() if v is not None}
    if score is not ScoreName.probit:
        options["score"] = score.value
    if bins is not None:
        options["bins"] = bins
    if rule is not None:
        options["rule"] = rule.value
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
        list[float] | None, typer.Option(help="Normalization mean the model expects (repeat per channel).")
    ] = None,
    std: Annotated[
        list[float] | None, typer.Option(help="Normalization std the model expects (repeat per channel).")
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

    def mean_std(v):
        return None if not v else (v[0] if len(v) == 1 else list(v))

    try:
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
            mean=mean_std(mean),
            std=mean_std(std),
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


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show a bundle's manifest, guarantee and integrity; exit 1 on any integrity failure.

    Example: `rrise inspect runs/demo/bundle`
    """
    from .inspect import format_inspection, inspect_bundle

    summary, problems = inspect_bundle(bundle)
    if as_json:
        typer.echo(json.dumps({"summary": summary, "problems": problems, "ok": not problems}, indent=2))
    else:
        typer.echo(format_inspection(summary, problems))
    if problems:
        raise typer.Exit(1)


@app.command()
def run(
    bundle: Annotated[Path, typer.Option(help="Bundle folder (made by `rrise demo` or `rrise-export`).")],
    source: Annotated[
        str, typer.Option(help="Camera index, video file, RTSP/HTTP URL, GStreamer pipeline or image folder.")
    ],
    publish: Annotated[
        str | None, typer.Option(help="ZeroMQ endpoint to bind and publish on, e.g. tcp://*:5555.")
    ] = None,
    jsonl: Annotated[
        str | None, typer.Option(help="Write records as JSON lines to a file, or '-' for stdout.")
    ] = None,
    backend: Annotated[BackendName, typer.Option(help="Inference backend.")] = BackendName.auto,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    wait_subscribers: Annotated[
        int, typer.Option(help="Wait for this many subscribers before the first frame.")
    ] = 0,
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
        bool, typer.Option("--no-monitor", help="Turn the distribution-shift alarm off.")
    ] = False,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="Run the bundle's variant of this precision (certified with that variant's own quantile); "
            "default: an engine for this GPU if any, else fp32."
        ),
    ] = None,
) -> None:
    """Certify every frame of a stream and publish one record per frame.

    Capture runs in its own thread; live sources keep the newest frames and count drops, files
    give every frame in order. SIGINT/SIGTERM flush every output and exit 0.

    Example: `rrise run --bundle runs/demo/bundle --source runs/demo/demo_video.avi --jsonl -`
    """
    from rrise.bundle import BundleError
    from rrise.runtime import run_stream
    from rrise.runtime.sinks import SinkError
    from rrise.runtime.sources import SourceError

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
            precision=None if precision is None else precision.value,
        )
    except (BundleError, SourceError, SinkError, RuntimeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps({"summary": summary}), err=True)
    if summary.get("source_error"):
        raise _fail(f"the source failed: {summary['source_error']}")


@app.command()
def subscribe(
    endpoint: Annotated[str, typer.Argument(help="Endpoint to connect to, e.g. tcp://127.0.0.1:5555.")],
    count: Annotated[int | None, typer.Option(help="Exit after this many records.")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without a record.")
    ] = None,
    topic: Annotated[str, typer.Option(help="Topic to subscribe to.")] = "rrise",
    status: Annotated[
        bool, typer.Option("--status", help="Print the runtime's status records too (kind=status).")
    ] = False,
) -> None:
    """Print records from a running `rrise run --publish` as JSON lines.

    Reconnects by itself when the publisher restarts; skips and counts malformed messages and
    records of another schema version.

    Example: `rrise subscribe tcp://127.0.0.1:5555 --count 10`
    """
    from .subscriber import subscribe as subscribe_records

    stats: dict[str, int] = {}
    records = subscribe_records(endpoint, topic=topic, timeout_s=timeout, stats=stats, status=status)
    try:
        for n, record in enumerate(records, start=1):
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
            if count is not None and n >= count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        records.close()
    if stats.get("malformed"):
        typer.echo(f"skipped {stats['malformed']} malformed message(s)", err=True)
    if stats.get("missed"):
        typer.echo(f"missed {stats['missed']} record(s) (gaps in seq)", err=True)


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="rrise")


@app.command()
def audit(
    bundle: Annotated[Path, typer.Option(help="Bundle folder to audit.")],
    dataset: Annotated[
        DatasetName, typer.Option(help="Inputs from the deployment distribution.")
    ] = DatasetName.fashion_mnist,
    split: Annotated[str, typer.Option(help="Dataset split to draw inputs from.")] = "test",
    n: Annotated[int, typer.Option(help="How many inputs to audit.")] = 100,
    n_mc: Annotated[int, typer.Option(help="Fresh Monte Carlo draws per input.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed for the input choice and the noise.")] = 12345,
    data_dir: DataDirOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write per-input results here (TSV).")] = None,
) -> None:
    """Spot-check a bundle's certificates against fresh MC with its base model (base.onnx).

    Example: `rrise audit --bundle runs/demo/bundle --dataset fashion-mnist --n 100 --n-mc 2000`
    """
    import numpy as np

    from rrise.bundle import BundleError
    from rrise.calibrate.audit import audit_bundle
    from rrise.datasets import DatasetNotFoundError, load_dataset

    try:
        ds = load_dataset(dataset.value, split, data_dir)
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
        f"the guarantee allows α+β = {result.allowed_rate:g}); binomial test p = {result.p_value:.3g}"
    )
    if result.p_value < 0.01:
        typer.secho(
            "the violation rate is above what the guarantee allows: recalibrate or check for "
            "distribution shift",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
