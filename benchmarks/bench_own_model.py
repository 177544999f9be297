"""Your own model, end to end: a classifier trained outside rrise on colour 32×32 images, certified.

The path a team takes with its own classifier and camera images, timed stage by stage:

1. ``examples/make_colour_folder.py`` writes Fashion-MNIST as colour 32×32 PNGs (ImageFolder:
   ``train/`` for the classifier, ``deploy/`` held out for rrise, and a video of further images);
2. ``examples/train_own_classifier.py`` trains a small residual network with plain PyTorch
   (Gaussian-noise augmentation) and exports ONNX;
3. ``rrise build`` on that ONNX and the deploy folder (targets → surrogate → rule selection →
   calibration → Cohen baseline → report → bundle);
4. ``rrise run`` certifies the video with the bundle.

    python -m benchmarks own_model                     # quick profile, 20k training images
    python -m benchmarks own_model --profile smoke --train 3000 --deploy 3000 --epochs 2

Writes ``benchmarks/results/own_model.json``: the certified-accuracy table (RRISE against Cohen's
Monte Carlo, with violations) and the wall time of every stage. It takes about an hour of a 2-core
CPU, so ``python -m benchmarks`` runs it only when named. Needs Fashion-MNIST (dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MEAN, STD = ["0.5"] * 3, ["0.25"] * 3
RUN_BY_DEFAULT = False  # about an hour: `python -m benchmarks own_model`


def _timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output to ``log``); its wall time in seconds; raise with the log's tail on failure."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{tail}")
    return round(seconds, 1)


def _table(metrics: dict) -> dict:
    """Certified accuracy per radius, ACR, abstentions and violations of every method in the report."""
    rows = {}
    for name, m in metrics["methods"].items():
        rows[name] = {
            "certified_accuracy": dict(zip(map(str, metrics["radii"]), m["certified_accuracy"], strict=True)),
            "acr": m["acr"],
            "abstain_rate": m["abstain_rate"],
            "violations": m.get("violations"),
        }
    return rows


def _run_video(bundle: Path, video: Path, labels: list[str], work: Path) -> dict:
    """``rrise run`` on the video; records, certified frames and accuracy of the certified ones."""
    out = work / "records.jsonl"
    cmd = [sys.executable, "-m", "rrise", "run", "--bundle", str(bundle), "--source", str(video)]
    seconds = _timed([*cmd, "--jsonl", str(out)], work / "run.log")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    certified = [r for r in records if not r["abstain"] and r["error"] is None]
    correct = sum(r["label"] == labels[r["frame"]] for r in certified)
    return {
        "seconds": seconds,
        "frames": len(labels),
        "records": len(records),
        "certified": len(certified),
        "certified_correct": correct,
        "median_radius": sorted(r["radius"] for r in certified)[len(certified) // 2] if certified else 0.0,
    }


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks own_model")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "own_model")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--sigma", default="0.25")
    ap.add_argument("--train", type=int, default=20_000)
    ap.add_argument("--deploy", type=int, default=8_000)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args(argv)
    work, py = args.work, sys.executable
    work.mkdir(parents=True, exist_ok=True)
    data, model, wd = work / "data", work / "model", work / "build"
    stages = {}
    stages["make_data"] = _timed(
        [py, str(EXAMPLES / "make_colour_folder.py"), "--out", str(data), "--train", str(args.train),
         "--deploy", str(args.deploy), "--video", "60"], work / "make_data.log",
    )  # fmt: skip
    stages["train_classifier"] = _timed(
        [py, str(EXAMPLES / "train_own_classifier.py"), "--data", str(data / "train"), "--out", str(model),
         "--epochs", str(args.epochs), "--sigma", args.sigma], work / "train.log",
    )  # fmt: skip
    stages["rrise_build"] = _timed(
        [py, "-m", "rrise", "build", "--model", str(model / "model.onnx"), "--data", str(data / "deploy"),
         "--workdir", str(wd), "--mean", *MEAN, "--std", *STD, "--sigma", args.sigma,
         "--profile", args.profile, "--no-progress"], work / "build.log",
    )  # fmt: skip
    info = json.loads((data / "info.json").read_text())
    metrics = json.loads((wd / "report" / "metrics.json").read_text())
    return {
        "profile": args.profile,
        "sigma": float(args.sigma),
        "classifier": json.loads((model / "training.json").read_text()),
        "stage_seconds": stages,
        "build_stage_seconds": json.loads((wd / "run.json").read_text()).get("stage_seconds", {}),
        "build_log_head": (work / "build.log").read_text().splitlines()[:12],
        "table": _table(metrics),
        "calibration": metrics["calibration"],
        "cost": metrics.get("cost"),
        "video": _run_video(wd / "bundle", data / "video.avi", info["video_labels"], work),
    }
