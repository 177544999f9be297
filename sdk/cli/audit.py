"""``rrise audit``: spot-check a bundle's certificates against fresh Monte Carlo with its base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, fail
from .stage_options import DatasetName

__all__: list[str] = []


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
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder with MNIST/Fashion-MNIST *-ubyte.gz files.")
    ] = None,
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
        raise fail(str(exc)) from None
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
