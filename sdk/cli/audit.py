"""``rrise audit``: spot-check a bundle's certificates against fresh Monte Carlo with its base
model; bound to :class:`AuditOptions`. With ``--mc-budget N`` (the ``rrise run`` flags of
:class:`rrise.runtime.adaptive.McOptions`, bound as the same option group) it audits the adaptive
records: each certificate, the surrogate's or Monte Carlo's, with violations per path."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from rrise.datasets import IDX_FILES
from rrise.options import EXIT_BAD_OPTION, bind
from rrise.runtime.adaptive import McOptions

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
    mc: McOptions = field(
        default_factory=McOptions,
        metadata={"group": "Adaptive: audit the records of `rrise run --mc-budget N` (same flags)"},
    )

    def __post_init__(self) -> None:
        for flag, value in (("--n", self.n), ("--n-mc", self.n_mc)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")


@app.command()
@bind(AuditOptions)
def audit(options: AuditOptions) -> None:
    """Spot-check a bundle's certificates against fresh MC with its base model (base.onnx).

    Example: `rrise audit --bundle runs/demo/bundle --n 100 --n-mc 20000`

    Adaptive records, violations per path (surrogate / mc): `rrise audit --bundle runs/demo/bundle
    --mc-budget 4096 --require-radius 0.5`
    """
    import numpy as np

    from rrise.bundle import BundleError
    from rrise.calibrate.audit import audit_adaptive, audit_bundle, bundle_dataset
    from rrise.datasets import DatasetNotFoundError, load_dataset
    from rrise.runtime.adaptive import McRefused

    try:
        name = options.dataset.value if options.dataset is not None else bundle_dataset(options.bundle)
        ds = load_dataset(name, options.split.value, options.data_dir)
        idx = np.sort(np.random.default_rng(options.seed).permutation(len(ds))[: options.n])
        if options.mc.enabled:
            adaptive = audit_adaptive(
                options.bundle, ds.images[idx], options.mc, n_mc=options.n_mc, seed=options.seed
            )
            _report_adaptive(options, idx, ds.labels, adaptive)
            return
        result = audit_bundle(options.bundle, ds.images[idx], n_mc=options.n_mc, seed=options.seed)
    except McRefused as exc:  # a bad adaptive option for this bundle: as in `rrise run`, exit 2
        raise fail(str(exc), EXIT_BAD_OPTION) from None
    except (BundleError, DatasetNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    if options.out is not None:
        _write_table(options.out, idx, ds.labels, result)
    typer.echo(
        f"audited {len(idx)} inputs with {options.n_mc} fresh draws each: {result.certified} certified, "
        f"{result.violations} violation(s) (rate over all inputs {result.violations / max(len(idx), 1):.4f}; "
        f"a sound bundle gives at most α+β plus the reference test's false alarms = "
        f"{result.allowed_rate:g}); binomial test p = {result.p_value:.3g}; "
        f"detection limit {result.detection_limit[0]:.4f} (median over certified inputs, up to "
        f"{result.detection_limit[1]:.4f}): a smaller excess of p̃ over the true p_Â goes unseen more "
        "often than not, raise --n-mc to see it"
    )
    _exit_if_refuted(result.p_value, "guarantee")


def _report_adaptive(options: AuditOptions, idx: Any, labels: Any, result: Any) -> None:
    """The adaptive audit's lines: the whole, then one per path; exit 1 when the violations among
    all audited inputs are above what α + β + A allows."""
    if options.out is not None:
        _write_table(options.out, idx, labels, result)
    typer.echo(
        f"audited {result.audited} inputs with {options.n_mc} fresh draws each (adaptive, --mc-budget "
        f"{options.mc.mc_budget}): {result.certified} certified, {int(result.mc_draws.sum())} runtime "
        f"draws, {result.violations} violation(s) over all inputs (rate "
        f"{result.violations / max(result.audited, 1):.4f}; a sound bundle gives at most α+β+A plus the "
        f"reference test's false alarms = {result.allowed_rate:g}); binomial test p = "
        f"{result.p_value:.3g}; detection limit "
        f"{result.detection_limit[0]:.4f} (median over certified inputs, up to "
        f"{result.detection_limit[1]:.4f})"
    )
    for path in result.paths.values():
        lo, hi = path.ci95
        typer.echo(
            f"  {path.path}: {path.certified} certified, {path.violations} violation(s), rate "
            f"{path.rate:.4f} (95% Clopper-Pearson interval [{lo:.4f}, {hi:.4f}])"
        )
    _exit_if_refuted(result.p_value, "composed guarantee")


def _exit_if_refuted(p_value: float, guarantee: str) -> None:
    """Exit 1, saying so, when the binomial test refutes the bundle at p < 0.01."""
    if p_value < 0.01:
        typer.secho(
            f"the violation rate is above what the {guarantee} allows: recalibrate or check for "
            "distribution shift",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)


def _write_table(out: Path, idx: Any, labels: Any, result: Any) -> None:
    """``--out``: one TSV row per audited input."""
    adaptive = hasattr(result, "certified_by")  # the adaptive audit: who certified, draws spent
    rows = ["idx\tlabel\tpred\tradius\tp_lower\tmc_count\tmc_upper\tviolation"]
    rows[0] += "\tcertified_by\tmc_draws" if adaptive else ""
    for j, i in enumerate(idx):
        rows.append(
            f"{i}\t{labels[i]}\t{result.pred[j]}\t{result.radius[j]:.4f}\t{result.p_lower[j]:.6f}\t"
            f"{result.mc_count[j]}\t{result.mc_upper[j]:.6f}\t{int(result.violation[j])}"
        )
        if adaptive:
            rows[-1] += f"\t{result.certified_by[j] or '-'}\t{result.mc_draws[j]}"
    out.write_text("\n".join(rows) + "\n")
