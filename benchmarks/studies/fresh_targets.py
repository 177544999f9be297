"""Lever 1 of the surrogate: fixed Monte Carlo targets against fresh ones, at a matched budget.

Reads a finished quick demo work folder (never writes to it): its base model, its fixed-target
surrogate, its calibration counts (m inputs × N_cal draws), its selection stores and Cohen's
certificates. Copies what it needs to ``--scratch``, trains a surrogate on fresh targets (each step labels
a batch drawn from every training image outside selection and calibration with D fresh draws through
``base.onnx``) and measures both surrogates the same way:

* on the selection split (where choices are made): held-out KL against the 64-draw selection
  targets, and certified accuracy / abstain on the rule-selection inputs (labels known);
* q̂ of the one-quantile probit rule on the demo's calibration counts;
* on the test inputs, beside Cohen's certificates from the same folder.

Example::

    python -m benchmarks.studies fresh_targets --demo runs/demo --scratch runs/fresh-bench \\
        --steps 400 --draws 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

RADII = (0.0, 0.25, 0.35, 0.5)
COPY = (
    "base.pt",
    "base.onnx",
    "run.json",
    "targets",
    "calibration_counts",
    "selection_counts",
    "certify.npz",
)


def _workdir(demo: Path, out: Path, steps: int, draws: int, batch: int):
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config

    out.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src, dst = demo / name, out / name
        if dst.exists() or not src.exists():
            continue
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    config = RunConfig(**{k: v for k, v in recorded_config(out).items() if k != "user"})
    profile = replace(config.prof, steps=steps, draws=draws, fresh_batch=batch)

    class _Bench(Workdir):
        @property
        def prof(self):
            return profile

    return _Bench.open(out, config, show_progress=False)


def _measure(w, model, labels_test: np.ndarray) -> dict:
    from rrise.calibrate.counts import CALIBRATION_STORE, RULE_STORE, TARGET_STORES, load_store_counts
    from rrise.calibrate.measures import certified_accuracy
    from rrise.calibrate.train import mean_kl, predict_probs
    from rrise.calibration import CalibrationSpec, conformalize
    from rrise.certificate import certify_from_probs

    p, train, test = w.prof, w.data("train"), w.data("test")
    sel_idx, sel_counts = load_store_counts(w, TARGET_STORES["selection"])
    cal_idx, cal_counts = load_store_counts(w, CALIBRATION_STORE)
    spec = CalibrationSpec(sigma=w.config.sigma, n_mc=p.n_cal, alpha=p.alphas[0], beta=p.beta)
    cal = conformalize(spec, predict_probs(model, train.images[cal_idx]), cal_counts)
    out = {"selection_kl": round(mean_kl(model, train.images[sel_idx], sel_counts), 5), "q_hat": cal.quantile}
    rule_idx = load_store_counts(w, RULE_STORE)[0]
    cohen = np.load(w.path("certify.npz"))
    for part, images, labels in (
        ("selection", train.images[rule_idx], train.labels[rule_idx]),
        ("test", test.images[cohen["index"]], labels_test),
    ):
        cert = certify_from_probs(predict_probs(model, images), cal)
        ca = certified_accuracy(cert.radius, cert.pred, labels, RADII)
        out[part] = {
            "inputs": len(labels),
            "certified_pct": [round(100 * v, 1) for v in ca],
            "abstain_pct": round(100 * float(np.mean(cert.abstain)), 1),
        }
    return out


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.studies fresh_targets", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--demo", type=Path, required=True, help="finished quick demo work folder (read only)")
    ap.add_argument("--scratch", type=Path, required=True, help="scratch work folder for the copies")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--baseline", action="store_true", help="also measure the demo's fixed-target surrogate")
    args = ap.parse_args(argv)

    import torch

    from rrise.calibrate.measures import certified_accuracy
    from rrise.calibrate.model_files import load_model

    torch.manual_seed(0)
    w = _workdir(args.demo, args.scratch, args.steps, args.draws, args.batch)
    cohen = np.load(w.path("certify.npz"))
    labels = cohen["labels"]
    results: dict = {"profile": w.prof.name, "radii": list(RADII)}
    if args.baseline:
        fixed = load_model(args.demo / "surrogate.pt")[0].eval()
        results["fixed targets (the demo's surrogate)"] = {
            "base_evaluations": (w.prof.n_targets + w.prof.n_selection) * w.prof.target_draws,
            **_measure(w, fixed, labels),
        }
        ca = certified_accuracy(cohen["radius"], cohen["pred"], labels, RADII)
        results["Cohen"] = {"certified_pct": [round(100 * v, 1) for v in ca]}
    key = f"fresh targets, {args.steps} steps × {args.batch} images × D = {args.draws}"
    results[key] = _train_and_measure(w, labels, args)
    print(json.dumps(results, indent=1))
    return results


def _train_and_measure(w, labels: np.ndarray, args: argparse.Namespace) -> dict:
    """Train a surrogate on fresh targets (uniform batches, no augmentation) and measure it."""
    from rrise.calibrate.bases import base_of
    from rrise.calibrate.fit import SurrogateFit, _train_fresh

    model, _ = base_of(w).initial_surrogate("base")
    given = {"steps": args.steps, "draws": args.draws, "augment": "none", "hard_fraction": 0.0}
    given["distil_steps"] = 0  # fresh targets alone
    fit = SurrogateFit.of(w, "ce", "surrogate", given)
    ckpt = w.path(f"fresh-{args.steps}-{args.draws}-{args.batch}.ckpt")
    t0 = time.perf_counter()
    model, history = _train_fresh(w, model, ckpt, fit)
    return {
        "base_evaluations": history["base_evaluations"],
        "train_seconds": round(time.perf_counter() - t0, 1),
        "val_kl": [round(v, 5) for v in history["val_kl"]],
        "best_step": history["best_step"],
        **_measure(w, model.eval(), labels),
    }
