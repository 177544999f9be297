"""``rrise-export`` (also ``rrise export``): a calibrated surrogate → a deployable bundle.

Three verbs, each parse → call → print, each bound to its options (:mod:`rrise.export.options`,
made into flags, ``--config FILE.yaml`` keys and ``KEY=VALUE`` overrides by :mod:`rrise.options`):

- ``rrise-export bundle`` (``build``: its former name, kept as a deprecated alias): surrogate +
  calibration → an fp32 bundle (:func:`rrise.export.from_surrogate.bundle_from_surrogate`).
- ``rrise-export add-variant``: an int8/fp16 variant and/or a TensorRT engine, each with its own
  quantile (:func:`rrise.export.variants.add_to_bundle`).
- ``rrise-export sign``: sign a bundle as it is (:func:`rrise.signing.sign_bundle`); ``bundle`` and
  ``add-variant`` also take ``--sign KEY``.

The flat form ``rrise-export [--surrogate … --out …] [--bundle B] [--precision P] [--engine tensorrt]
[--sign KEY]`` (DESIGN.md §3, :class:`~rrise.export.options.ExportOptions`) dispatches to them.
Importing this module is cheap (typer and numpy): torch, onnx and TensorRT are imported inside the
commands, so ``rrise`` can mount it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import typer

from rrise.options import bind

from .options import EXPIRES_HELP, RELEASE_HELP, BundleInputs, ExportOptions, VariantOptions

__all__ = ["AddVariantCommand", "BundleCommand", "SignCommand", "app", "main"]

app = typer.Typer(
    name="rrise-export",
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)

_HELP = {f.name: f.metadata["help"] for f in fields(ExportOptions)}


@dataclass(frozen=True, kw_only=True)
class BundleCommand(BundleInputs):
    """``rrise-export bundle``: the five input files, required here, and an optional signing key."""

    sign: Path | None = field(default=None, metadata={"help": _HELP["sign"]})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.missing():
            raise ValueError(f"making a bundle needs {', '.join(self.missing())}")


@dataclass(frozen=True, kw_only=True)
class AddVariantCommand(VariantOptions):
    """``rrise-export add-variant``: the variant, the bundle it goes into, an optional signing key."""

    bundle: Path = field(metadata={"help": "The bundle to add the variant to; rewritten atomically."})
    sign: Path | None = field(default=None, metadata={"help": _HELP["sign"]})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_for(new_bundle=False)


@dataclass(frozen=True, kw_only=True)
class SignCommand:
    """``rrise-export sign``."""

    bundle: Path = field(metadata={"help": "The bundle to sign."})
    sign: Path = field(metadata={"help": "Ed25519 private key (KEY.key from `rrise keys`)."})
    release: int | None = field(default=None, metadata={"help": RELEASE_HELP})
    expires: str | None = field(default=None, metadata={"help": EXPIRES_HELP})


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


def _check_files(inputs: BundleInputs | None, variant: VariantOptions) -> None:
    """Usage errors (exit 2) for input files that are not there, before anything runs."""
    given = [] if inputs is None else [(f, getattr(inputs, f)) for f in ("surrogate", "base", "calibration")]
    given += [] if inputs is None else [("calibration_record", inputs.calibration_record)]
    given.append(("quant_data", variant.quant_data))
    for name, path in given:
        if path is not None and not Path(path).is_file():
            flag = "--" + name.replace("_", "-")
            raise typer.BadParameter(f"{path} is not a file", param_hint=flag)


def _read_record(path: Path) -> Any:
    from .from_surrogate import read_calibration_record

    try:
        return read_calibration_record(path)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--calibration-record") from None


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
    for e in bundle.manifest["base_model"].get("engines") or ():
        typer.echo(
            f"base      {e['file']}: TensorRT {e['trt_version']}, compute capability "
            f"{e['compute_capability']} (Monte Carlo draws of --backend tensorrt --mc-budget N)"
        )
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


@dataclass(frozen=True)
class _Release:
    """What a signature states beside the manifest: ``--release N`` and ``--expires ISO``."""

    release: int | None = None
    expires: str | None = None


def _verified_for_signing(bundle_dir: Path) -> None:
    """Refuse (exit 1, one line naming the failed check) a bundle ``rrise inspect --verify`` does not
    accept: a signature vouches for every value a certificate depends on, so each is recomputed first."""
    from rrise.inspect import inspect_bundle

    _, problems = inspect_bundle(bundle_dir, verify=True)
    if problems:
        more = (
            f" (and {len(problems) - 1} more: rrise inspect --verify lists them)" if len(problems) > 1 else ""
        )
        raise _fail(f"not signed: the bundle does not verify: {problems[0]}{more}")


def _sign(bundle_dir: Path, key, was_signed: bool = False, release: _Release | None = None) -> None:
    """Verify, then sign the bundle with ``key``; without one, say that a signature the rewrite
    dropped is gone."""
    if key is None:
        if was_signed:
            typer.echo(
                "note: the bundle was signed, but its manifest changed, so the old signature no longer "
                "holds and was removed; sign it again with --sign KEY"
            )
        return
    from rrise.bundle import sign_bundle
    from rrise.signing import key_fingerprint

    release = release or _Release()
    _verified_for_signing(bundle_dir)
    path = sign_bundle(bundle_dir, key, release=release.release, expires=release.expires)
    typer.echo(f"signed    {path.name} by key {key_fingerprint(key.public_key())}")


def _was_signed(bundle_dir: Path | None) -> bool:
    from rrise.manifest_schema import SIGNATURE

    return bundle_dir is not None and (bundle_dir / SIGNATURE).is_file()


def _engine_info(engine: Any) -> dict[str, Any] | None:
    """This machine's TensorRT and GPU, looked up before anything is written (exit 1 without them)."""
    if engine is None:
        return None
    from . import tensorrt_build

    return tensorrt_build.engine_info()


def _add(bundle_dir: Path, variant: VariantOptions, quant: Any, trt_info: dict[str, Any] | None) -> Any:
    """→ the bundle with the variant added; call inside :func:`_errors`."""
    from .variants import add_to_bundle

    return add_to_bundle(
        bundle_dir,
        variant.precision.value,
        engine=None if variant.engine is None else variant.engine.value,
        quant_images=quant,
        quant_source=None if variant.quant_data is None else variant.quant_data.name,
        timing_cache=variant.timing_cache,
        engine_max_batch=variant.max_batch,
        trt_info=trt_info,
    )


def _make_bundle(
    inputs: BundleInputs, variant: VariantOptions, sign: Path | None, release: _Release | None = None
) -> None:
    """Make a bundle, then add the variant asked for (if any); TensorRT and the quantization data
    are checked before the bundle is made."""
    _check_files(inputs, variant)
    calibration = _read_record(inputs.calibration_record)
    with _errors():
        key = _signing_key(sign)
        _check_release(release or _Release())
        trt_info = _engine_info(variant.engine)
        quant = None
        if variant.quant_data is not None:
            from .variants import selection_images

            quant = selection_images(variant.quant_data, inputs.calibration, max_images=variant.quant_samples)
        from .from_surrogate import bundle_from_surrogate

        result = bundle_from_surrogate(inputs, calibration)
        bundle = result.bundle
        if variant.adds_something:
            bundle = _add(inputs.out, variant, quant, trt_info)
        _print_bundle(bundle, result)
        _sign(bundle.path, key, release=release)


def _add_variant(
    bundle_dir: Path, variant: VariantOptions, sign: Path | None, release: _Release | None = None
) -> None:
    """Add the variant to the bundle at ``bundle_dir`` (and sign it, or say an old signature went)."""
    _check_files(None, variant)
    with _errors():
        key = _signing_key(sign)
        _check_release(release or _Release())
        was_signed = _was_signed(bundle_dir)
        trt_info = _engine_info(variant.engine)
        quant = None
        if variant.quant_data is not None:
            from rrise.bundle import Bundle

            from .bundler import CALIBRATION_FILE
            from .variants import selection_images

            cal_npz = Bundle.load(bundle_dir).file(CALIBRATION_FILE)
            quant = selection_images(variant.quant_data, cal_npz, max_images=variant.quant_samples)
        bundle = _add(bundle_dir, variant, quant, trt_info)
        _print_bundle(bundle)
        _sign(bundle.path, key, was_signed, release)


def _sign_as_is(bundle_dir: Path, sign: Path, release: _Release) -> None:
    from rrise.bundle import Bundle

    with _errors():
        key = _signing_key(sign)
        _check_release(release)
        bundle = Bundle.load(bundle_dir)
        typer.echo(f"bundle    {bundle.path.resolve()}")
        typer.echo(f"id        {bundle.id}")
        _sign(bundle.path, key, release=release)


def _check_release(release: _Release) -> None:
    """``--release`` and ``--expires`` checked before anything is verified or written."""
    from rrise.signing import MAX_RELEASE, parse_expiry

    if release.release is not None and not 0 <= release.release <= MAX_RELEASE:
        raise _fail(f"--release must be an integer in [0, {MAX_RELEASE}], got {release.release}")
    if release.expires is not None:
        try:
            parse_expiry(release.expires)
        except ValueError as exc:
            raise _fail(f"--expires: {exc}") from None


# --- the verbs ------------------------------------------------------------------------------------
@bind(BundleCommand)
def bundle_command(options: BundleCommand) -> None:
    r"""Make a bundle from a surrogate and its conformal calibration: ONNX export, torch/ONNX
    parity, σ cross-check, fp32 variant with its own quantile, manifest; with --sign, its signature.

    Example:

        rrise-export bundle --surrogate runs/demo/surrogate.pt --base runs/demo/base.onnx \
            --calibration runs/demo/calibration.npz --calibration-record runs/demo/calibration.json \
            --out runs/demo/bundle --sign keys/release.key

    Then add precision variants and engines with `rrise-export add-variant`.
    """
    _make_bundle(options, VariantOptions(), options.sign)


app.command("bundle")(bundle_command)
app.command("build", hidden=True, help="The former name of `rrise-export bundle`. " + bundle_command.__doc__)(
    bundle_command
)


@app.command("add-variant")
@bind(AddVariantCommand)
def add_variant_command(options: AddVariantCommand) -> None:
    r"""Add an int8/fp16 variant or a TensorRT engine to a bundle, each recalibrated from its own
    outputs on the calibration inputs at the runtime's batch sizes; the bundle is rewritten atomically.
    The manifest changes, so a signature is dropped (and said so) unless --sign signs it again.

    Example:

        rrise-export add-variant --bundle runs/demo/bundle --precision int8 --quant-data selection.npz

    On a Jetson, an fp16 TensorRT engine:

        rrise-export add-variant --bundle runs/demo/bundle --precision fp16 --engine tensorrt
    """
    _add_variant(options.bundle, options, options.sign)


@app.command("sign")
@bind(SignCommand)
def sign_command(options: SignCommand) -> None:
    r"""Sign a bundle as it is: its verified manifest, into manifest.sig (replacing any older
    signature); the manifest and the bundle id do not change. The bundle is verified first, as
    `rrise inspect --verify` does (quantiles, monitor references, the calibration record, and σ and
    the counts against fresh draws of the base model); one that fails is not signed.

    Example:

        rrise-export sign --bundle runs/demo/bundle --sign keys/release.key --release 3 \
            --expires 2027-01-31T00:00:00Z
    """
    _sign_as_is(options.bundle, options.sign, _Release(options.release, options.expires))


# --- the flat form --------------------------------------------------------------------------------
@app.callback(invoke_without_command=True)
@bind(ExportOptions, group=True)
def export_command(options: ExportOptions) -> None:
    r"""Bundle a surrogate with its conformal calibration (`bundle`), or add int8/fp16 variants and
    TensorRT engines to a bundle (`add-variant`), each recalibrated from its own outputs.

    Without a command: with --bundle it adds to that bundle (`add-variant`); else it builds a bundle
    (`bundle`), then adds the --precision/--engine variant to it. Prints the bundle's path, id,
    quantiles and the torch/ONNX parity.

    Example:

        rrise-export --surrogate runs/demo/surrogate.pt --base runs/demo/base.onnx \
            --calibration runs/demo/calibration.npz --calibration-record runs/demo/calibration.json \
            --out runs/demo/bundle-fp32

    Add an int8 variant to that bundle, then (on a Jetson) an fp16 TensorRT engine:

        rrise-export --bundle runs/demo/bundle-fp32 --precision int8 --quant-data selection.npz

        rrise-export --bundle runs/demo/bundle-fp32 --precision fp16 --engine tensorrt
    """
    release = _Release(options.release, options.expires)
    if options.action == "sign":
        _sign_as_is(options.bundle, options.sign, release)
    elif options.action == "add-variant":
        _add_variant(options.bundle, options.variant, options.sign, release)
    else:
        _make_bundle(options.inputs, options.variant, options.sign, release)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``rrise-export``; ``args`` defaults to the command line."""
    app(args=args, prog_name="rrise-export")
