"""``rrise audit``: spot-check a bundle's certificates against fresh Monte Carlo with its base
model; bound to :class:`AuditOptions`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from rrise.datasets import IDX_FILES
from rrise.options import bind

from .app import app, fail
from .stage_options import DatasetName

SplitName = Enum("SplitName", {s: s for s in IDX_FILES}, type=str, module=__name__)

__all__ = ["AuditOptions", "SplitName"]


@dataclass(frozen=True, kw_only=True)
class AuditOptions:
    """``rrise audit``'s options."""

    bundle: Path = field(metadata={"help": "Bundle folder to audit."})
    dataset: DatasetName | None = field(
        default=None,
        metadata={
            "help": "Inputs from the deployment distribution (default: the bundle's calibration dataset)."
        },
    )
    split: SplitName = field(
        default=SplitName("test"), metadata={"help": "Dataset split to draw inputs from."}
    )
    n: int = field(default=100, metadata={"help": "How many inputs to audit."})
    n_mc: int = field(
        default=20_000,
        metadata={"help": "Fresh Monte Carlo draws per input (fewer cannot see an over-claim near the cap)."},
    )
    seed: int = field(default=12345, metadata={"help": "Seed for the input choice and the noise."})
    data_dir: Path | None = field(
        default=None, metadata={"help": "Folder with MNIST/Fashion-MNIST *-ubyte.gz files."}
    )
    out: Path | None = field(default=None, metadata={"help": "Write per-input results here (TSV)."})

    def __post_init__(self) -> None:
        for flag, value in (("--n", self.n), ("--n-mc", self.n_mc)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")


@app.command()
@bind(AuditOptions)
def audit(options: AuditOptions) -> None:
    """Spot-check a bundle's certificates against fresh MC with its base model (base.onnx).

    Example: `rrise audit --bundle runs/demo/bundle --n 100 --n-mc 20000`
    """
    import numpy as np

    from rrise.bundle import BundleError
    from rrise.calibrate.audit import audit_bundle, bundle_dataset
    from rrise.datasets import DatasetNotFoundError, load_dataset

    try:
        name = options.dataset.value if options.dataset is not None else bundle_dataset(options.bundle)
        ds = load_dataset(name, options.split.value, options.data_dir)
        idx = np.sort(np.random.default_rng(options.seed).permutation(len(ds))[: options.n])
        result = audit_bundle(options.bundle, ds.images[idx], n_mc=options.n_mc, seed=options.seed)
    except (BundleError, DatasetNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    if options.out is not None:
        _write_table(options.out, idx, ds.labels, result)
    typer.echo(
        f"audited {len(idx)} inputs with {options.n_mc} fresh draws each: {result.certified} certified, "
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


def _write_table(out: Path, idx: Any, labels: Any, result: Any) -> None:
    """``--out``: one TSV row per audited input."""
    rows = ["idx\tlabel\tpred\tradius\tp_lower\tmc_count\tmc_upper\tviolation"]
    for j, i in enumerate(idx):
        rows.append(
            f"{i}\t{labels[i]}\t{result.pred[j]}\t{result.radius[j]:.4f}\t{result.p_lower[j]:.6f}\t"
            f"{result.mc_count[j]}\t{result.mc_upper[j]:.6f}\t{int(result.violation[j])}"
        )
    out.write_text("\n".join(rows) + "\n")
