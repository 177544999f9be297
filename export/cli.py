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
    int8 = "int8"
    fp16 = "fp16"


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


_BUILD_OPTS = ("--surrogate", "--base", "--calibration", "--calibration-record", "--out")


@app.command()
def export_command(
    surrogate: Annotated[
        Path | None,
        typer.Option(
            "--surrogate",
            exists=True,
            dir_okay=False,
            help="Surrogate model file (.pt, written by rrise.calibrate.models.save_model).",
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            exists=True,
            dir_okay=False,
            help="Base classifier as ONNX (base.onnx), kept for audits.",
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            exists=True,
            dir_okay=False,
            help="calibration.npz: `images` [m,C,H,W] float32 and full MC `counts` [m,K].",
        ),
    ] = None,
    calibration_record: Annotated[
        Path | None,
        typer.Option(
            "--calibration-record",
            exists=True,
            dir_okay=False,
            help="calibration.json: the Calibration record (sigma, quantile, alpha, beta, n_mc, m, score).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Bundle folder to create.")] = None,
    bundle_dir: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            file_okay=False,
            help="An existing bundle to add a precision variant or an engine to (instead of "
            "--surrogate/--base/--calibration/--calibration-record/--out); rewritten atomically.",
        ),
    ] = None,
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
        Precision,
        typer.Option(
            help="Numerics of the variant to add (fp32 is always in the bundle). int8: onnxruntime "
            "static quantization (QDQ), needs --quant-data. fp16: a strongly typed FP16 ONNX (float32 "
            "I/O), the source of fp16 TensorRT engines. Each variant gets its own quantile from its "
            "own outputs on the calibration inputs; with --engine, the engine's precision."
        ),
    ] = Precision.fp32,
    quant_data: Annotated[
        Path | None,
        typer.Option(
            "--quant-data",
            exists=True,
            dir_okay=False,
            help="int8 only: an .npz with `images` [n,C,H,W] in [0,1] from a selection split (e.g. the "
            "surrogate's training or selection inputs) for the activation ranges. calibration.npz is "
            "refused, and so is any calibration image: a choice made from the conformal calibration "
            "split voids the guarantee.",
        ),
    ] = None,
    quant_samples: Annotated[
        int, typer.Option(min=1, help="int8 only: at most this many --quant-data images are used.")
    ] = 1000,
    engine: Annotated[
        EngineKind | None,
        typer.Option(
            help="Also build a TensorRT engine on this machine from the bundle's ONNX of --precision, "
            "with a quantile from its own outputs; records trt_version and compute_capability."
        ),
    ] = None,
    timing_cache: Annotated[
        Path | None,
        typer.Option(
            "--timing-cache",
            dir_okay=False,
            help="--engine: TensorRT timing cache file (read, then updated).",
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="--engine: largest batch the engine accepts.")
    ] = 64,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")
    ] = False,
) -> None:
    r"""Bundle a surrogate with its conformal calibration: ONNX export, parity check, manifest;
    add int8/fp16 variants and TensorRT engines, each recalibrated from its own outputs.

    Every variant carries its own quantile, recomputed from that variant's outputs on the
    calibration inputs. Prints the bundle's path, id, quantiles and the torch/ONNX parity.

    Example:

        rrise-export --surrogate runs/demo/surrogate.pt --base runs/demo/base.onnx \
            --calibration runs/demo/calibration.npz --calibration-record runs/demo/calibration.json \
            --out runs/demo/bundle-fp32

    Add an int8 variant to that bundle, then (on a Jetson) an fp16 TensorRT engine:

        rrise-export --bundle runs/demo/bundle-fp32 --precision int8 --quant-data selection.npz

        rrise-export --bundle runs/demo/bundle-fp32 --precision fp16 --engine tensorrt
    """
    from rrise import Bundle, BundleError

    prec = precision.value
    given = [
        name
        for name, v in zip(_BUILD_OPTS, (surrogate, base, calibration, calibration_record, out))
        if v is not None
    ]
    if bundle_dir is not None and given:
        raise typer.BadParameter(
            f"--bundle adds to an existing bundle; it does not take {', '.join(given)}", param_hint="--bundle"
        )
    if bundle_dir is None and len(given) != len(_BUILD_OPTS):
        missing = [name for name in _BUILD_OPTS if name not in given]
        raise typer.BadParameter(
            f"building a bundle needs {', '.join(missing)} (or pass --bundle DIR to add to one)",
            param_hint=missing[0],
        )
    if prec == "int8" and quant_data is None:
        raise typer.BadParameter(
            "--precision int8 needs --quant-data (images from a selection split, not the calibration split)",
            param_hint="--quant-data",
        )
    if prec != "int8" and quant_data is not None:
        raise typer.BadParameter("--quant-data is only for --precision int8", param_hint="--quant-data")
    trt_info: dict[str, Any] | None = None
    if engine is not None:
        from .tensorrt_build import engine_info

        try:
            trt_info = engine_info()
        except RuntimeError as exc:
            raise _fail(str(exc)) from None

    parity = None
    cal = None
    try:
        if bundle_dir is not None:
            bundle = Bundle.load(bundle_dir)
        else:
            assert out is not None and calibration is not None
            if out.exists() and not overwrite:
                raise _fail(f"{out} already exists; pass --overwrite to replace it")
            quant = _quant_images(quant_data, calibration, None, quant_samples) if quant_data else None
            bundle, parity, cal = _build(
                surrogate, base, calibration, calibration_record, out, labels, dataset, overwrite
            )
        if prec != "fp32":
            have = [
                v
                for v in bundle.manifest["variants"]
                if (v["precision"], v["backend"]) == (prec, "onnxruntime")
            ]
            if not (engine is not None and have):  # an engine reuses the bundle's own fp16/int8 ONNX
                from .variants import add_precision_variant

                if prec == "int8":
                    if bundle_dir is not None:
                        quant = _quant_images(quant_data, None, bundle, quant_samples)
                    bundle = add_precision_variant(
                        bundle.path, "int8", quant_images=quant, quant_source=quant_data.name
                    )
                else:
                    bundle = add_precision_variant(bundle.path, "fp16")
        if engine is not None:
            assert trt_info is not None
            with tempfile.TemporaryDirectory(prefix="rrise-engine-") as work:
                bundle = _add_engine(bundle, Path(work), trt_info, prec, timing_cache, max_batch)
    except (ValueError, TypeError, OSError, RuntimeError, BundleError) as exc:
        raise _fail(str(exc)) from None

    typer.echo(f"bundle    {bundle.path.resolve()}")
    typer.echo(f"id        {bundle.id}")
    if cal is not None:
        typer.echo(
            f"quantile  {cal.quantile:.6g} (calibration record, alpha={cal.alpha:g}, beta={cal.beta:g})"
        )
    for v in bundle.manifest["variants"]:
        q = v["quantile"]
        shown = f"quantile {q:.6g}" if q is not None else f"NO quantile: {v.get('needs_recalibration')}"
        typer.echo(f"variant   {v['precision']}/{v['backend']} {v['file']}: {shown}")
    if parity is not None:
        typer.echo(f"parity    max |logits torch - onnxruntime| = {parity:.3g}")
        if parity > 1e-4:
            typer.echo(
                "warning: the ONNX file's logits differ from torch by more than 1e-4; each variant's "
                "quantile is computed from its own outputs, so certificates stay valid, but check the export"
            )


def _quant_images(path: Path, calibration: Path | None, bundle: Any, max_images: int):
    """Images for the int8 ranges, refused if the file is (or shares an image with) the calibration."""
    import numpy as np

    from rrise.bundle import sha256_file

    from .bundler import CALIBRATION_FILE
    from .variants import check_disjoint, load_quant_data

    cal_file = calibration if calibration is not None else bundle.file(CALIBRATION_FILE)
    if sha256_file(path) == sha256_file(cal_file):
        raise ValueError(
            f"--quant-data {path} is the calibration file: int8 ranges must come from a selection split, "
            "never the conformal calibration split, or the guarantee is void"
        )
    with np.load(cal_file, allow_pickle=False) as z:
        cal_images = z["images"]
    images = load_quant_data(path, cal_images.shape[1:], max_images=max_images)
    check_disjoint(images, cal_images)
    return images


def _build(surrogate, base, calibration, calibration_record, out, labels, dataset, overwrite):
    """The fp32 bundle from a surrogate .pt: export, parity, build. → (bundle, parity, calibration)."""
    import numpy as np

    cal, record_dataset = _read_record(calibration_record)
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
    return bundle, parity, cal


def _add_engine(
    bundle, work: Path, trt_info: dict[str, Any], precision: str, timing_cache: Path | None, max_batch: int
):
    """Build a TensorRT engine from the bundle's ONNX of ``precision``, run it on the calibration
    images through the runtime's TensorRT backend (the numerics deployment will see), check its
    parity with that ONNX on onnxruntime's CPU provider, and add it as a variant with its own
    recalibrated quantile."""
    import numpy as np

    from .bundler import CALIBRATION_FILE, add_variant, softmax
    from .onnx_export import onnx_logits
    from .tensorrt_build import build_engine
    from .variants import variant_file_name

    try:
        from rrise.runtime.backends import TensorRTBackend
    except ImportError as exc:
        raise RuntimeError(
            f"running the engine needs the rrise runtime ({exc}): pip install 'rrise[runtime,tensorrt]'"
        ) from None
    source = bundle.variant(precision, "onnxruntime")["file"]
    engine_path = build_engine(
        bundle.file(source),
        work / "surrogate.engine",
        opt_batch=min(8, max_batch),
        max_batch=max_batch,
        timing_cache=timing_cache,
        strongly_typed=precision != "fp32",
    )
    with np.load(bundle.file(CALIBRATION_FILE), allow_pickle=False) as z:
        images = z["images"]
    backend = TensorRTBackend(engine_path)
    try:
        probs = backend.run(images)
    finally:
        backend.close()
    reference = softmax(onnx_logits(bundle.file(source), images))
    return add_variant(
        bundle.path,
        engine_path,
        precision=precision,
        backend="tensorrt",
        probs=probs,
        name=variant_file_name(precision, "tensorrt"),
        trt_version=trt_info["trt_version"],
        compute_capability=trt_info["compute_capability"],
        device=trt_info.get("device"),
        calibrated_with="tensorrt",
        built_from=source,
        batch_range=[1, max_batch],
        parity={
            "reference": f"{source} on onnxruntime-cpu",
            "max_abs_diff_probs": float(np.max(np.abs(probs - reference))),
            "argmax_agreement": float(np.mean(probs.argmax(1) == reference.argmax(1))),
        },
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``rrise-export``; ``args`` defaults to the command line."""
    app(args=args, prog_name="rrise-export")
