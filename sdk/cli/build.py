"""``rrise build``: every stage on the user's classifier and images, then ``WORKDIR/bundle``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, fail

__all__: list[str] = []

QuietOpt = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="Work folder of the pipeline.")]


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
        raise fail(str(exc)) from None
    typer.echo(str(bundle))
