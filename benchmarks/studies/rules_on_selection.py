"""Every calibration rule compared on a finished work folder's selection split (read only).

The selection split is where rules are chosen (never calibration or test): the rule-selection
inputs' full-size Monte Carlo counts and the surrogate's probabilities on them, cut into repeated
random fit / calibrate / test parts by :func:`rrise.calibrate.rules.compare_rules`. Use it to measure
a new rule on an existing run without redoing its Monte Carlo::

    python -m benchmarks.studies rules_on_selection --workdir runs/full-small-s0.25 --out rules.json

``--surrogate A.onnx [--surrogate B.onnx …]`` measures other surrogates of the same base model on the
same inputs (several: an ensemble, their probabilities averaged), with their held-out KL against the
selection targets: how a surrogate lever is judged before any calibration input is touched.
``--against OTHER.json`` (an earlier output on the same folder) adds, per rule, the difference of
mean certified accuracy and its paired standard error over the shared splits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def ensemble_probs(surrogates: list[Path], images: np.ndarray) -> np.ndarray:
    """The mean of the surrogates' probabilities (fp32 onnxruntime, as calibrated) on ``images``."""
    from rrise.calibrate.calibrating import surrogate_probs

    return np.mean([surrogate_probs(s, images) for s in surrogates], axis=0)


def selection_kl(w, surrogates: list[Path]) -> float:
    """Mean KL(counts/N ‖ ŝ) in nats over the selection split's target store (the surrogate
    stage's own held-out measure), for the averaged ``surrogates``."""
    from rrise.calibrate.counts import TARGET_STORES, load_store_counts

    index, counts = load_store_counts(w, TARGET_STORES["selection"])
    t = counts / counts.sum(axis=1, keepdims=True)
    q = np.clip(ensemble_probs(surrogates, w.data("train").images[index]), 1e-30, None)
    terms = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1.0)) - np.log(q)), 0.0)
    return float(terms.sum(axis=1).mean())


def compare_on(
    workdir: Path, repeats: int, at_selection_size: bool = False, surrogates: list[Path] | None = None
) -> dict:
    """compare_rules over every rule on ``workdir``'s rule-selection inputs, each calibrate part
    resampled to the work folder's calibration size unless ``at_selection_size``; with
    ``surrogates``, on their averaged probabilities instead of the folder's surrogate."""
    from rrise.calibrate.calibrating import selection_data
    from rrise.calibrate.rules import compare_rules
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config

    config = RunConfig(**{k: v for k, v in recorded_config(workdir).items() if k != "user"})
    w = Workdir(workdir, config, show_progress=False)  # not Workdir.open: nothing is written
    data = selection_data(w)
    if "counts" not in data:
        raise SystemExit(f"{workdir} has no rule-selection counts yet: run its select-rule stage first")
    if surrogates:
        data["probs"] = ensemble_probs(surrogates, w.data("train").images[data["index"]])
    else:
        surrogates = [w.path("surrogate.onnx")]
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
    result["surrogates"] = [str(s) for s in surrogates]
    result["selection_kl"] = round(selection_kl(w, surrogates), 5)
    result["profile"] = p.name
    result["sigma"] = config.sigma
    return result


def paired_difference(result: dict, other: dict) -> dict[str, dict[str, float]]:
    """Per rule, ``result`` minus ``other`` in mean certified accuracy with its paired standard
    error over the splits both ran on; refuses two comparisons whose splits differ."""
    same = ("split", "inputs", "n_mc", "alpha", "beta", "radii", "sigma", "workdir")
    differs = [k for k in same if result.get(k) != other.get(k)]
    if differs:
        raise SystemExit(f"--against: not the same splits ({', '.join(differs)} differ)")
    out = {}
    for name, row in result["rules"].items():
        a, b = row.get("split_means"), other["rules"].get(name, {}).get("split_means")
        if a is None or b is None or len(a) != len(b):
            continue
        diff = np.asarray(a) - np.asarray(b)
        out[name] = {
            "difference": round(float(diff.mean()), 3),
            "paired_se": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 3),
        }
    return out


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.studies rules_on_selection")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument(
        "--at-selection-size",
        action="store_true",
        help="calibrate each split on its own part (as before the resampling to the calibration size)",
    )
    ap.add_argument(
        "--surrogate",
        type=Path,
        action="append",
        help="a surrogate ONNX of the same base model to measure instead of the folder's; repeat it "
        "for an ensemble (probabilities averaged)",
    )
    ap.add_argument("--against", type=Path, help="an earlier output on the same folder to pair with")
    args = ap.parse_args(argv)
    result = compare_on(args.workdir, args.repeats, args.at_selection_size, args.surrogate)
    if args.against:
        other = json.loads(args.against.read_text())
        result["against"] = {"file": str(args.against), "surrogates": other.get("surrogates")}
        result["against"]["rules"] = paired_difference(result, other)
    _print(result, args.against)
    return result


def _print(result: dict, against: Path | None) -> None:
    radii = result["radii"]
    print(f"{result['split']}; α = {result['alpha']}, N = {result['n_mc']}")
    print(f"selection KL {result['selection_kl']:.5f} ({', '.join(result['surrogates'])})")
    print(f"{'rule':<18}" + "".join(f"r={r:<6g}" for r in radii) + "  ACR    abstain  miss")
    for name, row in result["rules"].items():
        if "error" in row:
            print(f"{name:<18}{row['error']}")
            continue
        ca = "".join(f"{row['certified_accuracy'][f'{r:g}']:<8.2f}" for r in radii)
        print(f"{name:<18}{ca}{row['acr']:<7.4f}{row['abstain_pct']:<9.2f}{row['miss_rate']:.4f}")
    print(f"winner (one-SE rule): {result['winner']}")
    for name, d in result.get("against", {}).get("rules", {}).items():
        print(f"{name:<18}{d['difference']:+.2f} (paired SE {d['paired_se']:.2f}) against {against}")
