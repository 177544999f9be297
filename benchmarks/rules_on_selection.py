"""Every calibration rule compared on a finished work folder's selection split (read only).

The selection split is where rules are chosen (never calibration or test): the rule-selection
inputs' full-size Monte Carlo counts and the surrogate's probabilities on them, cut into repeated
random fit / calibrate / test parts by :func:`rrise.calibrate.rules.compare_rules`. Use it to measure
a new rule on an existing run without redoing its Monte Carlo::

    python -m benchmarks.rules_on_selection --workdir runs/full-small-s0.25 --out rules.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def compare_on(workdir: Path, repeats: int, at_selection_size: bool = False) -> dict:
    """compare_rules over every rule on ``workdir``'s rule-selection inputs, each calibrate part
    resampled to the work folder's calibration size unless ``at_selection_size``."""
    from rrise.calibrate.calibrating import selection_data
    from rrise.calibrate.rules import compare_rules
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config

    config = RunConfig(**{k: v for k, v in recorded_config(workdir).items() if k != "user"})
    w = Workdir(workdir, config, show_progress=False)  # not Workdir.open: nothing is written
    data = selection_data(w)
    if "counts" not in data:
        raise SystemExit(f"{workdir} has no rule-selection counts yet: run its select-rule stage first")
    p = w.prof
    result = compare_rules(
        data["probs"],
        data["counts"],
        data["labels"],
        n_mc=p.n_cal,
        sigma=config.sigma,
        alpha=p.alphas[0],
        beta=p.beta,
        repeats=repeats,
        seed=config.seed,
        deploy_m=None if at_selection_size else len(w.splits()["calibration"]),
    )
    result["workdir"] = str(workdir)
    result["profile"] = p.name
    result["sigma"] = config.sigma
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, help="write the comparison here as JSON")
    ap.add_argument(
        "--at-selection-size",
        action="store_true",
        help="calibrate each split on its own part (as before the resampling to the calibration size)",
    )
    args = ap.parse_args(argv)
    result = compare_on(args.workdir, args.repeats, args.at_selection_size)
    radii = result["radii"]
    print(f"{result['split']}; α = {result['alpha']}, N = {result['n_mc']}")
    print(f"{'rule':<18}" + "".join(f"r={r:<6g}" for r in radii) + "  ACR    abstain  miss")
    for name, row in result["rules"].items():
        if "error" in row:
            print(f"{name:<18}{row['error']}")
            continue
        ca = "".join(f"{row['certified_accuracy'][f'{r:g}']:<8.2f}" for r in radii)
        print(f"{name:<18}{ca}{row['acr']:<7.4f}{row['abstain_pct']:<9.2f}{row['miss_rate']:.4f}")
    print(f"winner (one-SE rule): {result['winner']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
