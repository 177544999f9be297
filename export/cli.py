"""``rrise-export`` (also ``rrise export``): a calibrated surrogate → a deployable bundle.

Importing this module is cheap (typer only): torch, onnx and TensorRT are imported inside the
command, so the main ``rrise`` CLI can mount :func:`export_command` without loading them.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["app", "export_command", "main"]

app = typer.Typer(
    name="rrise-export",
    help="Bundle a calibrated surrogate for deployment (ONNX + quantile + manifest).",
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Precision(str, Enum):
    fp32 = "fp32"


class EngineKind(str, Enum):
    tensorrt = "tensorrt"


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _read_record(path: Path) -> tuple[Any, str | None]:
    """``calibration.json`` → (Calibration, the dataset it names or None)."""
    from rrise import Calibration

    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(
            f"{path} is not readable JSON: {exc}", param_hint="--calibration-record"
        ) from None
    if not isinstance(record, dict):
        raise typer.BadParameter(f"{path} must hold a JSON object", param_hint="--calibration-record")
    names = {f.name for f in dataclasses.fields(Calibration)}
    try:
        cal = Calibration(**{k: v for k, v in record.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(
            f"{path} is not a calibration record ({exc}); it needs {', '.join(sorted(names - {'p_cap'}))}",
            param_hint="--calibration-record",
        ) from None
    dataset = record.get("dataset")
    return cal, dataset if isinstance(dataset, str) and dataset else None


def _input_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    if "input_shape" in meta:
        return tuple(int(d) for d in meta["input_shape"])  # type: ignore[return-value]
    size = meta["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return int(meta["in_channels"]), int(h), int(w)


@app.command()
def export_command(
    surrogate: Annotated[
        Path,
        typer.Option(
            "--surrogate",
            exists=True,
            dir_okay=False,
            help="Surrogate model file (.pt, written by rrise.calibrate.models.save_model).",
        ),
    ],
    base: Annotated[
        Path,
        typer.Option(
            "--base",
            exists=True,
            dir_okay=False,
            help="Base classifier as ONNX (base.onnx), kept for audits.",
        ),
    ],
    calibration: Annotated[
        Path,
        typer.Option(
            "--calibration",
            exists=True,
            dir_okay=False,
            help="calibration.npz: `images` [m,C,H,W] float32 and full MC `counts` [m,K].",
        ),
    ],
    calibration_record: Annotated[
        Path,
        typer.Option(
            "--calibration-record",
            exists=True,
            dir_okay=False,
            help="calibration.json: the Calibration record (sigma, quantile, alpha, beta, n_mc, m, score).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to create.")],
    labels: Annotated[
        str | None, typer.Option(help="Class names, comma-separated (default: the surrogate's own labels).")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Name of the calibration data (default: from the calibration record or the surrogate)."
        ),
    ] = None,
    precision: Annotated[
        Precision, typer.Option(help="Numeric precision of the ONNX variant.")
    ] = Precision.fp32,
    engine: Annotated[
        EngineKind | None,
        typer.Option(
            help="Also build a TensorRT engine on this machine, with a quantile from its own outputs."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")
    ] = False,
) -> None:
    r"""Bundle a surrogate with its conformal calibration: ONNX export, parity check, manifest.

    Every variant carries its own quantile, recomputed from that variant's outputs on the
    calibration inputs. Prints the bundle's path, id, quantiles and the torch/ONNX parity.

    Example:

        rrise-export --surrogate runs/demo/surrogate.pt --base runs/demo/base.onnx \
            --calibration runs/demo/calibration.npz --calibration-record runs/demo/calibration.json \
            --out runs/demo/bundle-fp32
    """
    import numpy as np

    from rrise import BundleError

    cal, record_dataset = _read_record(calibration_record)
    if out.exists() and not overwrite:
        raise _fail(f"{out} already exists; pass --overwrite to replace it")
    if engine is not None:
        from .tensorrt_build import engine_info

        try:
            trt_info = engine_info()
        except RuntimeError as exc:
            raise _fail(str(exc)) from None
    try:
        from rrise.calibrate.models import load_model

        from .bundler import build_bundle, default_preprocess
        from .onnx_export import export_onnx, onnx_parity
    except ImportError as exc:
        raise _fail(f"exporting needs torch and onnx ({exc}): pip install 'rrise[export]'") from None
    try:
        model, meta = load_model(surrogate)
    except Exception as exc:  # torch.load raises many types on a foreign file
        raise _fail(f"cannot load the surrogate {surrogate}: {exc}") from None
    try:
        shape = _input_shape(meta)
    except (KeyError, TypeError, ValueError):
        raise _fail(f"{surrogate} does not record its input shape (in_channels, image_size)") from None
    num_classes = int(meta.get("num_classes", 0))
    if labels is not None:
        names = [s.strip() for s in labels.split(",")]
    elif meta.get("labels"):
        names = [str(s) for s in meta["labels"]]
    else:
        names = [str(i) for i in range(num_classes)]
        typer.echo(f"note: {surrogate} names no labels; using 0..{num_classes - 1}")
    dataset = dataset or record_dataset or meta.get("dataset")
    if not dataset:
        raise typer.BadParameter(
            "neither the calibration record nor the surrogate names it", param_hint="--dataset"
        )
    try:
        with np.load(calibration, allow_pickle=False) as z:
            probe = z["images"][:256]  # the parity check's inputs
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise _fail(f"{calibration} is not an .npz with an `images` array: {exc}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="rrise-export-") as work:
            onnx_path = export_onnx(model, Path(work) / "surrogate.onnx", shape)
            parity = onnx_parity(model, onnx_path, probe)
            bundle = build_bundle(
                out,
                surrogate_onnx=onnx_path,
                base_onnx=base,
                calibration=cal,
                calibration_npz=calibration,
                labels=names,
                preprocess=meta.get("preprocess") or default_preprocess(shape),
                dataset=dataset,
                input_shape=shape,
                parity_max_abs_diff=parity,
                overwrite=overwrite,
            )
            if engine is not None:
                bundle = _add_engine(bundle, Path(work), trt_info)
    except (ValueError, TypeError, OSError, RuntimeError, BundleError) as exc:
        raise _fail(str(exc)) from None

    typer.echo(f"bundle    {bundle.path.resolve()}")
    typer.echo(f"id        {bundle.id}")
    typer.echo(f"quantile  {cal.quantile:.6g} (calibration record, alpha={cal.alpha:g}, beta={cal.beta:g})")
    for v in bundle.manifest["variants"]:
        typer.echo(f"variant   {v['precision']}/{v['backend']} {v['file']}: quantile {v['quantile']:.6g}")
    typer.echo(f"parity    max |logits torch - onnxruntime| = {parity:.3g}")
    if parity > 1e-4:
        typer.echo(
            "warning: the ONNX file's logits differ from torch by more than 1e-4; each variant's "
            "quantile is computed from its own outputs, so certificates stay valid, but check the export"
        )


def _add_engine(bundle, work: Path, trt_info: dict[str, Any]):
    """Build a TensorRT engine from the bundle's fp32 ONNX, run it on the calibration images through
    the runtime's TensorRT backend (the numerics deployment will see) and add it as a variant with
    its own recalibrated quantile."""
    import numpy as np

    from .bundler import CALIBRATION_FILE, add_variant
    from .tensorrt_build import build_engine

    try:
        from rrise.runtime.backends import TensorRTBackend
    except ImportError as exc:
        raise RuntimeError(
            f"running the engine needs the rrise runtime ({exc}): pip install 'rrise[runtime,tensorrt]'"
        ) from None
    engine_path = build_engine(bundle.file(bundle.manifest["model"]["file"]), work / "surrogate.engine")
    with np.load(bundle.file(CALIBRATION_FILE), allow_pickle=False) as z:
        images = z["images"]
    backend = TensorRTBackend(engine_path)
    try:
        probs = backend.run(images)
    finally:
        backend.close()
    return add_variant(
        bundle.path,
        engine_path,
        precision="fp32",
        backend="tensorrt",
        probs=probs,
        name="surrogate.fp32.engine",
        trt_version=trt_info["trt_version"],
        compute_capability=trt_info["compute_capability"],
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``rrise-export``; ``args`` defaults to the command line."""
    app(args=args, prog_name="rrise-export")
