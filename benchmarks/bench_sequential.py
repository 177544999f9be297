"""Draws of the sequential test (rrise.sequential) against Cohen's fixed n at equal radius.

    python -m benchmarks sequential            # the real run (a few minutes on one core)
    python -m benchmarks sequential --quick    # a smoke run

For each true class probability ``p`` of a grid and each of ``--sequences`` simulated frames:
Cohen's CERTIFY draws ``n = --n-fixed`` votes, ``k ~ Binomial(n, p)``, and certifies the radius
``σ·Φ⁻¹(CP(k, n, α))`` (it abstains when that bound is at most 1/2); the sequential test is then asked
for that same radius at the same α, with ``--budget`` draws in batches of ``--batch-size``, and its
draws are counted until it stops. Both are simulated with Bernoulli(p) draws (numpy), no model: the
draws needed depend on ``p`` alone, whatever the classifier. The sequential side runs the real
:func:`rrise.sequential.sequential_test` (success, futility and budget stops included). Radii are
reported in units of σ (``Φ⁻¹`` of the bound), since σ only scales them.

The second table (``fixed_radius``) asks both for one required radius ``R`` (``--required``, in units
of σ) at every ``p``: the share of frames Cohen's fixed n certifies at ``R`` or more, and the share
the sequential test certifies with its mean and 95th-percentile draws (futility stops included:
where ``p < Φ(R/σ)`` they show what a hopeless frame costs).
"""

from __future__ import annotations

import argparse

import numpy as np

from rrise.sequential import (
    DEFAULT_MC_BATCH,
    DEFAULT_PRIOR,
    STOP_SUCCESS,
    SequentialOptions,
    lower_bound,
    sequential_test,
)
from rrise.stats import clopper_pearson_lower, norm_cdf, norm_ppf

FULL_GRID = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995)
QUICK_GRID = (0.8, 0.99, 0.999)


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks sequential", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 values of p, 50 sequences each")
    ap.add_argument("--p", type=float, nargs="+", default=None, help="true class probabilities")
    ap.add_argument("--sequences", type=int, default=1_000, help="simulated frames per p")
    ap.add_argument("--n-fixed", type=int, default=10_000, help="Cohen's fixed number of draws")
    ap.add_argument("--alpha", type=float, default=0.001, help="the level of both bounds")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_MC_BATCH, help="draws per sequential batch")
    ap.add_argument("--budget", type=int, default=100_000, help="the sequential test's draw budget")
    ap.add_argument("--required", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="radii / σ")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.sequences = min(args.sequences, 50)
    args.p = tuple(args.p) if args.p else (QUICK_GRID if args.quick else FULL_GRID)
    return args


def _one_p(p: float, args: argparse.Namespace, options: SequentialOptions, rng: np.random.Generator) -> dict:
    k = rng.binomial(args.n_fixed, p, size=args.sequences)
    cohen = np.asarray(clopper_pearson_lower(k, args.n_fixed, args.alpha), dtype=np.float64)
    certified = cohen > 0.5
    draws, successes = [], 0
    for target in cohen[certified]:
        r = sequential_test(lambda m: int(rng.binomial(m, p)), float(target), options)
        draws.append(r.draws)
        successes += r.stop == STOP_SUCCESS
    row: dict = {
        "p": p,
        "cohen_abstain_rate": round(float(1.0 - certified.mean()), 4),
        "cohen_radius_over_sigma_median": round(float(np.median(norm_ppf(cohen[certified]))), 4)
        if certified.any()
        else 0.0,
        "compared": int(certified.sum()),
    }
    if draws:
        row |= {"sequential_success_rate": round(successes / len(draws), 4), **_draw_stats(draws)}
        row["draws_mean_over_n_fixed"] = round(row["draws_mean"] / args.n_fixed, 3)
    return row


def _draw_stats(draws: list[int]) -> dict:
    d = np.asarray(draws, dtype=np.float64)
    return {
        "draws_mean": round(float(d.mean()), 1),
        "draws_median": float(np.median(d)),
        "draws_p95": float(np.percentile(d, 95)),
    }


def _fixed_radius(p: float, r_over_sigma: float, args, options, rng: np.random.Generator) -> dict:
    needed = float(norm_cdf(r_over_sigma))
    k = rng.binomial(args.n_fixed, p, size=args.sequences)
    cohen_rate = float(np.mean(clopper_pearson_lower(k, args.n_fixed, args.alpha) >= needed))
    results = [
        sequential_test(lambda m: int(rng.binomial(m, p)), needed, options) for _ in range(args.sequences)
    ]
    return {
        "p": p,
        "radius_over_sigma": r_over_sigma,
        "cohen_certified_rate": round(cohen_rate, 4),
        "sequential_certified_rate": round(float(np.mean([r.stop == STOP_SUCCESS for r in results])), 4),
        **_draw_stats([r.draws for r in results]),
    }


def _print(rows: list[dict], fixed: list[dict]) -> None:
    for row in rows:
        print(
            f"p = {row['p']:<7} Cohen r/σ {row['cohen_radius_over_sigma_median']:.3f}  sequential draws "
            f"mean {row.get('draws_mean', 0):>9}  p95 {row.get('draws_p95', 0):>9}  "
            f"success {row.get('sequential_success_rate', 0):.3f}"
        )
    for row in fixed:
        print(
            f"R/σ = {row['radius_over_sigma']:<4} p = {row['p']:<7} certified: Cohen "
            f"{row['cohen_certified_rate']:.3f} sequential {row['sequential_certified_rate']:.3f}, "
            f"draws mean {row['draws_mean']} p95 {row['draws_p95']}"
        )


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    options = SequentialOptions(budget=args.budget, alpha=args.alpha, batch_size=args.batch_size)
    rng = np.random.default_rng(args.seed)
    rows = [_one_p(p, args, options, rng) for p in args.p]
    fixed = [_fixed_radius(p, r, args, options, rng) for r in args.required for p in args.p]
    n = args.n_fixed
    _print(rows, fixed)
    return {
        "method": (
            "simulation of Bernoulli(p) draws, no model: Cohen's fixed-n Clopper-Pearson bound from "
            "k ~ Binomial(n_fixed, p) sets each frame's radius; the real rrise.sequential.sequential_test "
            "is asked for that radius at the same alpha and its draws are counted (failures at their stop)"
        ),
        "quick": bool(args.quick),
        "alpha": args.alpha,
        "n_fixed": n,
        "sequences_per_p": args.sequences,
        "batch_size": args.batch_size,
        "budget": args.budget,
        "prior": list(DEFAULT_PRIOR),
        "seed": args.seed,
        "largest_radius_over_sigma": {
            "cohen_at_n_fixed": round(float(norm_ppf(args.alpha ** (1.0 / n))), 4),
            "sequential_at_n_fixed": round(float(norm_ppf(lower_bound(n, n, args.alpha))), 4),
            "sequential_at_budget": round(
                float(norm_ppf(lower_bound(args.budget, args.budget, args.alpha))), 4
            ),
        },
        "equal_radius": rows,
        "fixed_radius": fixed,
    }
