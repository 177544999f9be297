"""Where the gap to Monte Carlo sits, per confidence bin, and the most any split of α across the
bins could win back (a diagnosis, not a rule: it looks at the test inputs).

On a finished work folder calibrated with confidence bins: for each bin, its share of calibration
and test inputs, its quantile q̂_b at a grid of per-bin levels α_b (from the calibration inputs, as
`rrise calibrate` computes it), and how many test inputs it certifies correctly at each radius,
beside Cohen's Monte Carlo on the same test inputs. Then every allocation on the grid with
Σ_b π_b·α_b ≤ α (π_b: the calibration share, so the marginal miss rate stays at α) is scored on the
test inputs themselves and the best is reported. Choosing the allocation on the test inputs makes
that row an upper bound on what any allocation rule chosen on a selection split could reach::

    python -m benchmarks.studies allocation_ceiling --workdir runs/full-small-s0.25 --out ceiling.json

Radii up to 0.5 only: the first-stage bound is used throughout (draws at the cap matter only near
the cap).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

RADII = (0.0, 0.25, 0.5)
LEVELS = (0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08)


def _folder(workdir: Path) -> dict:
    """Calibration scores and bins, and the test inputs' surrogate and Cohen results."""
    from rrise.calibrate.calibrating import surrogate_probs
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config
    from rrise.calibration import mc_lower_bounds
    from rrise.scores import confidence_bin, conformal_scores, p_cap
    from rrise.stats import norm_ppf

    config = RunConfig(**{k: v for k, v in recorded_config(workdir).items() if k != "user"})
    w = Workdir(workdir, config, show_progress=False)
    spec = json.loads(w.path("calibration.json").read_text())
    if not spec.get("bin_edges"):
        raise SystemExit(f"{workdir} was calibrated without confidence bins: nothing to allocate")
    cal = np.load(w.path("calibration.npz"), allow_pickle=False)
    n_mc, beta, edges = int(cal["n_mc"]), float(spec["beta"]), spec["bin_edges"]
    cap = p_cap(beta, n_mc)
    top = cal["probs"].argmax(axis=1)
    s = cal["probs"][np.arange(len(top)), top]
    scores = conformal_scores(s, mc_lower_bounds(cal["counts"], top, n_mc, beta), cap)
    cohen = np.load(w.path("certify.npz"), allow_pickle=False)
    probs = surrogate_probs(w.path("surrogate.onnx"), w.data("test").images[cohen["index"]])
    t_s = probs.max(axis=1)
    return {
        "scores": scores,
        "cal_bin": confidence_bin(s, edges),
        "test_bin": confidence_bin(t_s, edges),
        "z": np.asarray(norm_ppf(np.minimum(t_s, cap)), dtype=np.float64),
        "correct": probs.argmax(axis=1) == cohen["labels"],
        "cohen": (cohen["pred"] == cohen["labels"])[:, None] & (cohen["radius"][:, None] >= RADII),
        "bins": len(edges) + 1,
        "sigma": config.sigma,
        "alpha": float(spec["alpha"]),
    }


def _quantile(scores: np.ndarray, level: float) -> float:
    """Split conformal's ⌈(m+1)(1−α)⌉-th smallest score (∞ when m is too small for α)."""
    k = int(np.ceil((len(scores) + 1) * (1.0 - level)))
    return float("inf") if k > len(scores) else float(np.sort(scores)[k - 1])


def _certified(d: dict, b: int, q: float) -> np.ndarray:
    """Test inputs of bin ``b`` certified correctly at each radius with shift ``q``."""
    mine = d["test_bin"] == b
    margin = d["z"][mine] - q
    ok = d["correct"][mine] & (margin > 0)
    return np.array([int((ok & (d["sigma"] * margin >= r)).sum()) for r in RADII])


def _best_allocation(d: dict, table: dict, share: np.ndarray, n_test: int) -> dict:
    """The grid allocation with Σ π_b α_b ≤ α that certifies the most test inputs (mean over radii)."""
    best = None
    for combo in itertools.product(LEVELS, repeat=d["bins"]):
        if float(np.dot(share, combo)) > d["alpha"] + 1e-12:
            continue
        total = sum(table[b, a] for b, a in enumerate(combo))
        if best is None or total.sum() > best[1].sum():
            best = (combo, total)
    combo, total = best
    return {"alpha_per_bin": list(combo), "certified_pct": _pct(total, n_test)}


def _pct(counts: np.ndarray, n: int) -> dict[str, float]:
    return {f"{r:g}": round(100.0 * float(c) / n, 1) for r, c in zip(RADII, counts)}


def ceiling(workdir: Path) -> dict:
    """Per-bin shares, quantiles and certified counts; equal and best allocations; Cohen."""
    d = _folder(workdir)
    n_test = len(d["test_bin"])
    share = np.array([(d["cal_bin"] == b).mean() for b in range(d["bins"])])
    table, bins = {}, []
    for b in range(d["bins"]):
        q = {a: _quantile(d["scores"][d["cal_bin"] == b], a) for a in LEVELS}
        table.update({(b, a): _certified(d, b, q[a]) for a in LEVELS})
        mine = d["test_bin"] == b
        bins.append(
            {
                "calibration_share": round(float(share[b]), 4),
                "test_inputs": int(mine.sum()),
                "quantile": {f"{a:g}": round(q[a], 4) for a in LEVELS},
                "certified_at_alpha": {f"{a:g}": table[b, a].tolist() for a in LEVELS},
                "cohen_certified": d["cohen"][mine].sum(axis=0).tolist(),
            }
        )
    equal = sum(table[b, d["alpha"]] for b in range(d["bins"]))
    return {
        "workdir": str(workdir),
        "radii": list(RADII),
        "alpha": d["alpha"],
        "bins": bins,
        "equal_allocation_pct": _pct(equal, n_test),
        "best_allocation_on_test": _best_allocation(d, table, share, n_test),
        "cohen_pct": _pct(d["cohen"].sum(axis=0), n_test),
    }


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.studies allocation_ceiling")
    ap.add_argument("--workdir", type=Path, required=True)
    args = ap.parse_args(argv)
    result = ceiling(args.workdir)
    print(f"radii {result['radii']}, α = {result['alpha']}")
    for b, row in enumerate(result["bins"]):
        ours = row["certified_at_alpha"][f"{result['alpha']:g}"]
        print(f"bin {b}: {row['test_inputs']} test inputs, RRISE {ours}, Cohen {row['cohen_certified']}")
    print(f"equal α per bin:  {result['equal_allocation_pct']}")
    best = result["best_allocation_on_test"]
    print(f"best on the test inputs {best['alpha_per_bin']}: {best['certified_pct']}")
    print(f"Cohen:            {result['cohen_pct']}")
    return result
