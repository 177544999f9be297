"""``rrise-export`` (also ``rrise export``): a calibrated surrogate → a deployable bundle.

Three verbs, each parse → call → print; the work is in the export modules:

- ``rrise-export build``: surrogate + calibration → an fp32 bundle
  (:func:`rrise.export.from_surrogate.export_bundle`).
- ``rrise-export add-variant``: an int8/fp16 variant and/or a TensorRT engine, each with its own
  quantile (:func:`rrise.export.variants.add_to_bundle`).
- ``rrise-export sign``: sign a bundle as it is (:func:`rrise.bundle.sign_bundle`); ``build`` and
  ``add-variant`` also take ``--sign KEY``.

The flat form ``rrise-export [--surrogate … --out …] [--bundle B] [--precision P] [--engine tensorrt]
[--sign KEY]`` (DESIGN.md §3) dispatches to them: with ``--bundle`` it adds to that bundle (or, with
only ``--sign``, signs it), else it builds one (and then adds the ``--precision``/``--engine``
variant to it). Importing this module is cheap (typer
and numpy): numpy, torch, onnx and TensorRT are imported inside the commands, so ``rrise`` can mount it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from rrise.numerics import MICRO_BATCH_LIMIT

from .precision import DEFAULT_QUANT_SAMPLES, Precision

__all__ = ["app", "add_variant_command", "build_command", "export_command", "main"]

app = typer.Typer(
    name="rrise-export",
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)


class EngineKind(str, Enum):
    tensorrt = "tensorrt"


# --- options (declared once, shared by the flat form and the verbs) ----------------------------------
def _file(flag: str, help: str) -> Any:
    return typer.Option(flag, exists=True, dir_okay=False, help=help)


SurrogateOpt = Annotated[
    Path | None,
    _file("--surrogate", "Surrogate model file (.pt, written by rrise.calibrate.models.save_model)."),
]
BaseOpt = Annotated[Path | None, _file("--base", "Base classifier as ONNX (base.onnx), kept for audits.")]
CalibrationOpt = Annotated[
    Path | None,
    _file("--calibration", "calibration.npz: `images` [m,C,H,W] float32 and full MC `counts` [m,K]."),
]
RecordOpt = Annotated[
    Path | None,
    _file(
        "--calibration-record",
        "calibration.json: the Calibration record (sigma, quantile, alpha, beta, n_mc, m, score, "
        "base_sha256, surrogate_sha256). Its sigma must be the surrogate's.",
    ),
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Bundle folder to create.")]
LabelsOpt = Annotated[
    str | None, typer.Option(help="Class names, comma-separated (default: the surrogate's own labels).")
]
DatasetOpt = Annotated[
    str | None,
    typer.Option(
        help="Name of the calibration data (default: from the calibration record or the surrogate)."
    ),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")]
SignOpt = Annotated[
    Path | None,
    typer.Option(
        "--sign",
        help="Ed25519 private key (KEY.key from `rrise keys KEY --kind signing`, PEM or raw): sign the "
        "bundle's manifest into manifest.sig, which `rrise run/inspect --trust KEY.pub` check.",
    ),
]
BundleOpt = Annotated[
    Path | None,
    typer.Option(
        "--bundle",
        file_okay=False,
        help="An existing bundle to add a precision variant or an engine to (instead of "
        "--surrogate/--base/--calibration/--calibration-record/--out); rewritten atomically.",
    ),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        help="Numerics of the variant to add (fp32 is always in the bundle). int8: onnxruntime "
        "static quantization (QDQ), needs --quant-data. fp16: a strongly typed FP16 ONNX (float32 "
        "I/O), the source of fp16 TensorRT engines. Each variant gets its own quantile from its "
        "own outputs on the calibration inputs; with --engine, the engine's precision."
    ),
]
QuantDataOpt = Annotated[
    Path | None,
    _file(
        "--quant-data",
        "int8 only: an .npz with `images` [n,C,H,W] in [0,1] from a selection split (e.g. the "
        "surrogate's training or selection inputs) for the activation ranges. calibration.npz is "
        "refused, and so is any calibration image: a choice made from the conformal calibration "
        "split voids the guarantee.",
    ),
]
QuantSamplesOpt = Annotated[
    int, typer.Option(min=1, help="int8 only: at most this many --quant-data images are used.")
]
EngineOpt = Annotated[
    EngineKind | None,
    typer.Option(
        help="Also build a TensorRT engine on this machine from the bundle's ONNX of --precision, "
        "with a quantile from its own outputs at the runtime's batch sizes; records trt_version, "
        "compute_capability and max_batch (the largest micro-batch with exact numerics)."
    ),
]
TimingCacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--timing-cache", dir_okay=False, help="--engine: TensorRT timing cache file (read, then updated)."
    ),
]
MaxBatchOpt = Annotated[
    int,
    typer.Option(
        "--max-batch",
        min=1,
        help="--engine: largest batch the engine's optimization profile accepts (the runtime hands "
        f"it at most {MICRO_BATCH_LIMIT} frames at once).",
    ),
]


# --- shared steps ---------------------------------------------------------------------------------
def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the library's errors into ``error: …`` and exit 1 (no traceback)."""
    from rrise.bundle import BundleError

    try:
        yield
    except (typer.Exit, typer.Abort):  # both are RuntimeErrors: never report them as errors
        raise
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, BundleError) as exc:
        raise _fail(str(exc)) from None


def _read_record(path: Path):
    from .from_surrogate import read_calibration_record

    try:
        return read_calibration_record(path)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--calibration-record") from None


def _check_variant_options(
    precision: Precision, engine: EngineKind | None, quant_data: Path | None, *, new_bundle: bool
) -> None:
    """Usage errors (exit 2) of the variant options, before anything runs."""
    if precision.value == "int8" and quant_data is None and (new_bundle or engine is None):
        raise typer.BadParameter(
            "--precision int8 needs --quant-data (images from a selection split, not the calibration split)",
            param_hint="--quant-data",
        )
    if precision.value != "int8" and quant_data is not None:
        raise typer.BadParameter("--quant-data is only for --precision int8", param_hint="--quant-data")
    if not new_bundle and precision.value == "fp32" and engine is None:
        raise typer.BadParameter(
            "every bundle has its fp32 variant already: choose --precision int8|fp16, or add "
            "--engine tensorrt",
            param_hint="--precision",
        )


def _print_bundle(bundle, result=None) -> None:
    """The bundle's path, id, quantiles and (after a build) the record's quantile and the parity."""
    for note in result.notes if result is not None else ():
        typer.echo(f"note: {note}")
    typer.echo(f"bundle    {bundle.path.resolve()}")
    typer.echo(f"id        {bundle.id}")
    if result is not None:
        cal = result.calibration
        typer.echo(
            f"quantile  {cal.quantile:.6g} (calibration record, alpha={cal.alpha:g}, beta={cal.beta:g})"
        )
    for v in bundle.manifest["variants"]:
        q = v["quantile"]
        if q is None:
            shown = f"NO quantile: {v.get('needs_recalibration')}"
        else:
            shown = f"quantile {q:.6g} ({v.get('calibrated_with', '?')}, max batch {v.get('max_batch', '?')})"
        typer.echo(f"variant   {v['precision']}/{v['backend']} {v['file']}: {shown}")
    if result is not None and result.parity is not None:
        typer.echo(f"parity    max |logits torch - onnxruntime| = {result.parity:.3g}")
        if result.parity > 1e-4:
            typer.echo(
                "warning: the ONNX file's logits differ from torch by more than 1e-4; each variant's "
                "quantile is computed from its own outputs, so certificates stay valid, but check the export"
            )


def _signing_key(sign: Path | None):
    """The private key in ``sign`` (None when not given), read before anything is built."""
    if sign is None:
        return None
    from rrise.signing import load_private_key

    return load_private_key(sign)


def _sign(bundle_dir: Path, key, was_signed: bool = False) -> None:
    """Sign the bundle with ``key``; without one, say that a signature the rewrite dropped is gone."""
    if key is None:
        if was_signed:
            typer.echo(
                "note: the bundle was signed, but its manifest changed, so the old signature no longer "
                "holds and was removed; sign it again with --sign KEY"
            )
        return
    from rrise.bundle import sign_bundle
    from rrise.signing import key_fingerprint

    path = sign_bundle(bundle_dir, key)
    typer.echo(f"signed    {path.name} by key {key_fingerprint(key.public_key())}")


def _was_signed(bundle_dir: Path | None) -> bool:
    from rrise.manifest_schema import SIGNATURE

    return bundle_dir is not None and (bundle_dir / SIGNATURE).is_file()


def _engine_info(engine: EngineKind | None) -> dict[str, Any] | None:
    """This machine's TensorRT and GPU, looked up before anything is written (exit 1 without them)."""
    if engine is None:
        return None
    from . import tensorrt_build

    return tensorrt_build.engine_info()


def _build(surrogate, base, calibration, calibration_record, out, labels, dataset, overwrite):
    """→ ExportResult; call inside :func:`_errors`."""
    from .from_surrogate import export_bundle

    return export_bundle(
        surrogate,
        base=base,
        calibration_npz=calibration,
        calibration=_read_record(calibration_record),
        out=out,
        labels=None if labels is None else [s.strip() for s in labels.split(",")],
        dataset=dataset,
        overwrite=overwrite,
        record_name=str(calibration_record),
    )


def _add(bundle_dir: Path, precision, engine, quant, quant_source, timing_cache, max_batch, trt_info):
    """→ the bundle with the variant added; call inside :func:`_errors`."""
    from .variants import add_to_bundle

    return add_to_bundle(
        bundle_dir,
        precision.value,
        engine=None if engine is None else engine.value,
        quant_images=quant,
        quant_source=quant_source,
        timing_cache=timing_cache,
        engine_max_batch=max_batch,
        trt_info=trt_info,
    )


# --- the verbs ------------------------------------------------------------------------------------
@app.command("build")
def build_command(
    surrogate: SurrogateOpt,
    base: BaseOpt,
    calibration: CalibrationOpt,
    calibration_record: RecordOpt,
    out: OutOpt,
    labels: LabelsOpt = None,
    dataset: DatasetOpt = None,
    overwrite: OverwriteOpt = False,
    sign: SignOpt = None,
) -> None:
    r"""Build a bundle from a surrogate and its conformal calibration: ONNX export, torch/ONNX
    parity, σ cross-check, fp32 variant with its own quantile, manifest; with --sign, its signature.

    Example:

        rrise-export build --surrogate runs/demo/surrogate.pt --base runs/demo/base.onnx \
            --calibration runs/demo/calibration.npz --calibration-record runs/demo/calibration.json \
            --out runs/demo/bundle --sign keys/release.key

    Then add precision variants and engines with `rrise-export add-variant`.
    """
    with _errors():
        key = _signing_key(sign)
        result = _build(surrogate, base, calibration, calibration_record, out, labels, dataset, overwrite)
        _print_bundle(result.bundle, result)
        _sign(result.bundle.path, key)


@app.command("add-variant")
def add_variant_command(
    bundle_dir: BundleOpt,
    precision: PrecisionOpt = Precision.fp32,
    engine: EngineOpt = None,
    quant_data: QuantDataOpt = None,
    quant_samples: QuantSamplesOpt = DEFAULT_QUANT_SAMPLES,
    timing_cache: TimingCacheOpt = None,
    max_batch: MaxBatchOpt = MICRO_BATCH_LIMIT,
    sign: SignOpt = None,
) -> None:
    r"""Add an int8/fp16 variant or a TensorRT engine to a bundle, each recalibrated from its own
    outputs on the calibration inputs at the runtime's batch sizes; the bundle is rewritten atomically.
    The manifest changes, so a signature is dropped (and said so) unless --sign signs it again.

    Example:

        rrise-export add-variant --bundle runs/demo/bundle --precision int8 --quant-data selection.npz

    On a Jetson, an fp16 TensorRT engine:

        rrise-export add-variant --bundle runs/demo/bundle --precision fp16 --engine tensorrt
    """
    _check_variant_options(precision, engine, quant_data, new_bundle=False)
    with _errors():
        key = _signing_key(sign)
        was_signed = _was_signed(bundle_dir)
        trt_info = _engine_info(engine)
        quant = None
        if quant_data is not None:
            from rrise.bundle import Bundle

            from .bundler import CALIBRATION_FILE
            from .variants import selection_images

            cal_npz = Bundle.load(bundle_dir).file(CALIBRATION_FILE)
            quant = selection_images(quant_data, cal_npz, max_images=quant_samples)
        name = None if quant_data is None else quant_data.name
        bundle = _add(bundle_dir, precision, engine, quant, name, timing_cache, max_batch, trt_info)
        _print_bundle(bundle)
        _sign(bundle.path, key, was_signed)


@app.command("sign")
def sign_command(
    bundle_dir: Annotated[Path, typer.Option("--bundle", file_okay=False, help="The bundle to sign.")],
    sign: Annotated[Path, typer.Option("--sign", help="Ed25519 private key (KEY.key from `rrise keys`).")],
) -> None:
    r"""Sign a bundle as it is: its verified manifest, into manifest.sig (replacing any older
    signature); the manifest and the bundle id do not change.

    Example:

        rrise-export sign --bundle runs/demo/bundle --sign keys/release.key
    """
    from rrise.bundle import Bundle

    with _errors():
        key = _signing_key(sign)
        bundle = Bundle.load(bundle_dir)
        typer.echo(f"bundle    {bundle.path.resolve()}")
        typer.echo(f"id        {bundle.id}")
        _sign(bundle.path, key)


# --- the flat form --------------------------------------------------------------------------------
_BUILD_OPTS = ("--surrogate", "--base", "--calibration", "--calibration-record", "--out")


def _refuse_options_before(ctx: typer.Context) -> None:
    given = [p.opts[0] for p in ctx.command.params if ctx.get_parameter_source(p.name).name != "DEFAULT"]
    if given:
        raise typer.BadParameter(
            f"options go after the command: {ctx.command_path} {ctx.invoked_subcommand} … "
            f"(got {', '.join(given)} before it)"
        )


def _build_and_add(
    build_args: tuple, precision, engine, quant_data, quant_samples, timing_cache, max_batch, sign
):
    """The flat form without --bundle: build, then add the --precision/--engine variant. TensorRT
    and the quantization data are checked before the bundle is built."""
    _check_variant_options(precision, engine, quant_data, new_bundle=True)
    calibration, out = build_args[2], build_args[4]
    with _errors():
        key = _signing_key(sign)
        trt_info = _engine_info(engine)
        quant = None
        if quant_data is not None:
            from .variants import selection_images

            quant = selection_images(quant_data, calibration, max_images=quant_samples)
        result = _build(*build_args)
        bundle = result.bundle
        if precision.value != "fp32" or engine is not None:
            name = None if quant_data is None else quant_data.name
            bundle = _add(out, precision, engine, quant, name, timing_cache, max_batch, trt_info)
        _print_bundle(bundle, result)
        _sign(bundle.path, key)


@app.callback(invoke_without_command=True)
def export_command(
    ctx: typer.Context,
    surrogate: SurrogateOpt = None,
    base: BaseOpt = None,
    calibration: CalibrationOpt = None,
    calibration_record: RecordOpt = None,
    out: OutOpt = None,
    bundle_dir: BundleOpt = None,
    labels: LabelsOpt = None,
    dataset: DatasetOpt = None,
    precision: PrecisionOpt = Precision.fp32,
    quant_data: QuantDataOpt = None,
    quant_samples: QuantSamplesOpt = DEFAULT_QUANT_SAMPLES,
    engine: EngineOpt = None,
    timing_cache: TimingCacheOpt = None,
    max_batch: MaxBatchOpt = MICRO_BATCH_LIMIT,
    overwrite: OverwriteOpt = False,
    sign: SignOpt = None,
) -> None:
    r"""Bundle a surrogate with its conformal calibration (`build`), or add int8/fp16 variants and
    TensorRT engines to a bundle (`add-variant`), each recalibrated from its own outputs.

    Without a command: with --bundle it adds to that bundle (`add-variant`); else it builds a bundle
    (`build`), then adds the --precision/--engine variant to it. Prints the bundle's path, id,
    quantiles and the torch/ONNX parity.

    Example:

        rrise-export --surrogate runs/demo/surrogate.pt --base runs/demo/base.onnx \
            --calibration runs/demo/calibration.npz --calibration-record runs/demo/calibration.json \
            --out runs/demo/bundle-fp32

    Add an int8 variant to that bundle, then (on a Jetson) an fp16 TensorRT engine:

        rrise-export --bundle runs/demo/bundle-fp32 --precision int8 --quant-data selection.npz

        rrise-export --bundle runs/demo/bundle-fp32 --precision fp16 --engine tensorrt
    """
    if ctx.invoked_subcommand is not None:
        _refuse_options_before(ctx)
        return
    build_args = (surrogate, base, calibration, calibration_record, out)
    given = [flag for flag, v in zip(_BUILD_OPTS, build_args) if v is not None]
    variant_args = (precision, engine, quant_data, quant_samples, timing_cache, max_batch)
    if bundle_dir is not None:
        if given:
            raise typer.BadParameter(
                f"--bundle adds to an existing bundle; it does not take {', '.join(given)}",
                param_hint="--bundle",
            )
        if sign is not None and precision.value == "fp32" and engine is None and quant_data is None:
            sign_command(bundle_dir, sign)
            return
        add_variant_command(bundle_dir, *variant_args, sign=sign)
        return
    if len(given) != len(_BUILD_OPTS):
        missing = [flag for flag in _BUILD_OPTS if flag not in given]
        raise typer.BadParameter(
            f"building a bundle needs {', '.join(missing)} (or pass --bundle DIR to add to one)",
            param_hint=missing[0],
        )
    _build_and_add((*build_args, labels, dataset, overwrite), *variant_args, sign)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``rrise-export``; ``args`` defaults to the command line."""
    app(args=args, prog_name="rrise-export")
