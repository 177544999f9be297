"""``rrise build``: every stage on the user's classifier and images, then ``WORKDIR/bundle``; bound
to :class:`rrise.calibrate.options.BuildOptions`."""

from __future__ import annotations

import typer

from rrise.calibrate.options import BuildOptions
from rrise.options import bind

from .app import app, fail

__all__: list[str] = []


@app.command("build")
@bind(BuildOptions)
def build(options: BuildOptions) -> None:
    """Certify your own classifier on your own images: every stage, then `WORKDIR/bundle`.

    Runs targets → surrogate → rule selection → calibration → Cohen's baseline on the test split →
    report → bundle; a rerun skips what is current, and every stage command works on the folder.

    Example: `rrise build --model model.onnx --data images/ --workdir runs/mine --sigma 0.25`
    """
    from rrise.calibrate.building import build as run_build
    from rrise.datasets import DatasetNotFoundError

    try:
        bundle = run_build(options)
    except (ValueError, DatasetNotFoundError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    typer.echo(str(bundle))
