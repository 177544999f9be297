"""Adaptive certification against Cohen's Monte Carlo on a finished work folder, offline and exact.

    python -m benchmarks adaptive --workdir runs/full-small-s0.25
    python -m benchmarks adaptive --workdir DIR --require-radius 0.5 --figure cost.png

Reads what the pipeline left in ``--workdir`` (``run.json``, ``surrogate.onnx``, ``calibration.json``,
Cohen's ``certify.npz``, the rule-selection count store, and the `rrise reference` store when there is
one) and runs :mod:`rrise.calibrate.adaptive_eval`: the sequential test on Cohen's own stored draws,
replayed without replacement (exactly the law of fresh draws, and the very draws Cohen used), with
the routing rule chosen on the selection split. The surrogate is run once on the test and selection
inputs (onnxruntime, CPU); the base model never is. Rows: the surrogate alone, the adaptive mode at
budgets 0, 10², 10³, 10⁴ (capped at the stored n) for each mean-draws allowance of its routing rule,
with each required radius, and Cohen at the same α; beside them, every goal of the adaptive mode with
its measured number. It needs a folder made at full size (quick profiles store few draws), so
``python -m benchmarks`` runs it only when named.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.recording import RESULTS

RUN_BY_DEFAULT = (
    False  # needs a finished full-size work folder: `python -m benchmarks adaptive --workdir DIR`
)

# (radius, points of certified accuracy the adaptive mode may lose to Cohen, share of Cohen's draws)
ROUTED_GOALS = ((0.0, 0.5, 0.05), (0.25, 0.5, 0.05), (0.5, 0.5, 0.05), (0.75, 2.0, 0.15))
REQUIRED_GOAL = (0.5, 0.02)  # points, share of Cohen's draws, at --require-radius
ABSTAIN_GOAL = 0.5  # points of abstention rate


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks adaptive", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="a finished pipeline work folder")
    ap.add_argument("--require-radius", type=float, default=0.5, help="the required radius of the cost goal")
    ap.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[0, 100, 1_000, 2_000, 5_000, 10_000],
        help="draws per query",
    )
    ap.add_argument(
        "--max-draws-fraction",
        type=float,
        nargs="+",
        default=[0.05, 0.15],
        help="mean draws a routing rule may spend on the selection split, as shares of Cohen's n0 + n",
    )
    ap.add_argument("--mc-alpha", type=float, default=None, help="MC level (default: Cohen's, the profile's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the replayed draws")
    ap.add_argument("--tag", default=None, help="a name for these results (file adaptive-TAG.json)")
    ap.add_argument("--figure", type=Path, default=None, help="figure path (default: beside the JSON)")
    args = ap.parse_args(argv)
    if args.figure is None:
        args.figure = RESULTS / f"{result_name(argv)}_cost_accuracy.png"
    return args


def _repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results carry no machine paths)."""
    root = RESULTS.parent.parent.resolve()
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def result_name(argv: list[str]) -> str:
    """The results file's stem: ``adaptive``, then ``-TAG`` with ``--tag TAG`` (e.g. the work folder's
    σ) and ``-alphaA`` with ``--mc-alpha A``, so that results at other settings sit side by side."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--mc-alpha", type=float, default=None)
    ap.add_argument("--tag", default=None)
    known = ap.parse_known_args(argv)[0]
    tag = "" if known.tag is None else f"-{known.tag}"
    alpha = "" if known.mc_alpha is None else f"-alpha{known.mc_alpha:g}"
    return f"adaptive{tag}{alpha}"


def _points(row: dict[str, Any], radii: list[float], r: float) -> float:
    return 100.0 * row["certified_accuracy"][radii.index(r)]


def _goal(text: str, row_name: str | None, measured: dict[str, float | None], met: bool) -> dict:
    return {
        "goal": text,
        "row": row_name,
        **{k: None if v is None else round(v, 6) for k, v in measured.items()},
        "met": bool(met),
    }


def _best_within(rows: dict, radii: list[float], r: float, share: float) -> tuple[str | None, dict | None]:
    """The routed row with the highest certified accuracy at ``r`` within ``share`` of Cohen's draws."""
    fits = [(k, v) for k, v in rows.items() if v["kind"] == "adaptive" and v["draws_ratio_to_cohen"] <= share]
    return max(fits, key=lambda kv: _points(kv[1], radii, r), default=(None, None))


def _accuracy_goal(text: str, name, row, cohen, radii, r: float, limits: tuple[float, float]) -> dict:
    gap = None if row is None else _points(cohen, radii, r) - _points(row, radii, r)
    ratio = None if row is None else row["draws_ratio_to_cohen"]
    measured = {"points_below_cohen": gap, "draws_ratio_to_cohen": ratio}
    return _goal(text, name, measured, row is not None and gap <= limits[0] and ratio <= limits[1])


def _abstain_goal(text: str, name, row, cohen) -> dict:
    diff = None if row is None else 100.0 * (row["abstain_rate"] - cohen["abstain_rate"])
    return _goal(
        text, name, {"abstain_points_above_cohen": diff}, row is not None and abs(diff) <= ABSTAIN_GOAL
    )


def _one_row_goal(rows: dict, radii: list[float], cohen: dict) -> dict:
    """One routed row for every r ≤ 0.5 at once (the goals below may each pick another row): the
    row within the shared draw allowance whose largest shortfall to Cohen at those radii is least."""
    goals_here = [(r, points, share) for r, points, share in ROUTED_GOALS if r <= 0.5]
    share, points = goals_here[0][2], goals_here[0][1]
    at = [r for r, _, _ in goals_here]
    fits = [(k, v) for k, v in rows.items() if v["kind"] == "adaptive" and v["draws_ratio_to_cohen"] <= share]
    name, row = min(
        fits,
        key=lambda kv: max(_points(cohen, radii, r) - _points(kv[1], radii, r) for r in at),
        default=(None, None),
    )
    gaps = None if row is None else [round(_points(cohen, radii, r) - _points(row, radii, r), 6) for r in at]
    where = ", ".join(f"{r:g}" for r in at)
    text = f"one routed row within {points:g} points of Cohen at r = {where}, ≤ {100 * share:g} % of draws"
    return {
        "goal": text,
        "row": name,
        "points_below_cohen": gaps,
        "draws_ratio_to_cohen": None if row is None else row["draws_ratio_to_cohen"],
        "met": row is not None and max(gaps) <= points,
    }


def goals(result: dict[str, Any], require_radius: float) -> list[dict[str, Any]]:
    """Every goal of the adaptive mode beside its measured number, from
    :func:`rrise.calibrate.adaptive_eval.adaptive_rows`' result (Cohen's row at the same α). A
    routed goal takes the best routed row within its share of Cohen's draws; ``met`` is False where
    no row qualifies."""
    rows, radii = result["rows"], list(result["radii"])
    cohen = next(v for v in rows.values() if v["kind"] == "cohen")
    out = [_one_row_goal(rows, radii, cohen)]
    for r, points, share in ROUTED_GOALS:
        name, row = _best_within(rows, radii, r, share)
        text = (
            f"adaptive within {points:g} points of Cohen (same α) at r = {r:g}, ≤ {100 * share:g} % of draws"
        )
        out.append(_accuracy_goal(text, name, row, cohen, radii, r, (points, share)))
        if r == 0.0:
            out.append(
                _abstain_goal(
                    f"abstentions within {ABSTAIN_GOAL:g} points of Cohen's (that row)", name, row, cohen
                )
            )
    r = require_radius
    name, row = next(
        ((k, v) for k, v in rows.items() if v["kind"] == "required" and v["require_radius"] == r),
        (None, None),
    )
    points, share = REQUIRED_GOAL
    text = f"--require-radius {r:g}: within {points:g} points of Cohen at r = {r:g}, ≤ {100 * share:g} %"
    out.append(_accuracy_goal(text, name, row, cohen, radii, r, REQUIRED_GOAL))
    out.append(
        _abstain_goal(f"--require-radius {r:g}: abstentions within {ABSTAIN_GOAL:g} points", name, row, cohen)
    )
    return out


def _splits(w, cal):
    """The test split (Cohen's stored draws) and the rule-selection split (its own full-size counts,
    None where the profile samples none), as the evaluation reads them."""
    from rrise.calibrate.adaptive_eval import EvalSplit
    from rrise.calibrate.adaptive_workdir import selection_split
    from rrise.calibrate.calibrating import surrogate_probs
    from rrise.calibrate.cohen import COHEN_NPZ
    from rrise.certificate import certify_from_probs
    from rrise.fileio import load_npz

    cohen = load_npz(w.path(COHEN_NPZ), ("index", "labels", "counts", "counts_selection"), "Cohen")
    probs = surrogate_probs(w.path("surrogate.onnx"), w.data("test").images[cohen["index"]])
    test = EvalSplit(
        certify_from_probs(probs, cal), cohen["labels"], cohen["counts"], cohen["counts_selection"]
    )
    return test, selection_split(w, cal), cohen["index"]


def _violations(w, test_index: np.ndarray):
    """Against the `rrise reference` store (independent N_ref draws on the first test inputs), if any."""
    from rrise.calibrate.adaptive_eval import reference_violations_check
    from rrise.calibrate.counts import REFERENCE_STORE, load_store_counts

    if not (w.path(REFERENCE_STORE) / "manifest.json").exists():
        return None
    ref_index, counts = load_store_counts(w, REFERENCE_STORE)
    rows = np.searchsorted(test_index, ref_index)
    if not np.array_equal(test_index[np.minimum(rows, len(test_index) - 1)], ref_index):
        raise SystemExit(f"{w.path(REFERENCE_STORE)} holds inputs that are not among the test inputs")
    return reference_violations_check(rows, counts)


def _open(workdir: Path):
    from rrise.calibrate.calibrating import load_calibration
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config

    config = recorded_config(workdir) if workdir.is_dir() else {}
    if not config:
        raise SystemExit(f"{workdir} is not a finished work folder (no run.json): give --workdir DIR")
    w = Workdir(root=workdir, config=RunConfig(**config), show_progress=False, log=lambda _s: None)
    return w, load_calibration(w)[0]


def main(argv: list[str]) -> dict[str, Any]:
    from rrise.calibrate.adaptive_eval import KIND_ADAPTIVE, RowPlan, adaptive_rows, plot_cost_accuracy

    args = _parse(argv)
    w, cal = _open(args.workdir)
    test, selection, index = _splits(w, cal)
    violations = _violations(w, index)
    alpha = w.prof.mc_alpha if args.mc_alpha is None else args.mc_alpha
    radii = tuple(sorted({0.0, 0.25, 0.5, 0.75, 1.0, args.require_radius}))
    required = tuple(sorted({0.0, 0.25, 0.5, 0.75, args.require_radius}))
    result: dict[str, Any] = {"rows": {}, "not_run": {}}
    for j, share in enumerate(args.max_draws_fraction):
        plan = RowPlan(
            budgets=tuple(args.budgets),
            required_radii=required if j == 0 else (),
            mc_alpha=alpha,
            max_draws_fraction=share,
            radii=radii,
            seed=args.seed,
        )
        part = adaptive_rows(test, selection, w.config.sigma, plan, violations=violations)
        tag = f", rule within {100 * share:g} % of Cohen's draws on selection"
        for name, row in part["rows"].items():
            if row["kind"] == KIND_ADAPTIVE:
                result["rows"][name + tag] = row
            elif j == 0:
                result["rows"][name] = row
        result["not_run"] |= part["not_run"]
        result["radii"] = part["radii"]
    figure = plot_cost_accuracy(result, args.figure)
    return {
        "workdir": str(args.workdir),
        "sigma": w.config.sigma,
        "mc_alpha": alpha,
        "test_inputs": len(test.labels),
        "selection_inputs": None if selection is None else len(selection.labels),
        "violations_against": "rrise reference store" if violations is not None else None,
        "goals": goals(result, args.require_radius),
        **result,
        "figure": _repo_relative(figure),
    }
