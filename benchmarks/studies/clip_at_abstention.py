"""Calibration scores clipped at each input's abstention threshold, against the plain score, on
finished work folders (their Monte Carlo reused: nothing is drawn again).

For each ``--workdir``, a copy of the folder (the original is not touched) goes through
``rrise select-rule``, ``rrise calibrate`` and ``rrise evaluate`` twice, with
``--no-clip-at-abstention`` (the plain score) and with the default clip, so that the rule is chosen
on the selection split under the score it will be calibrated with, exactly as a new build does.
Same surrogate, same counts, same α: the rows differ only in the score::

    python -m benchmarks.studies clip_at_abstention --workdir runs/own_model-resnet40/build-onnx \
        --workdir runs/own_model-mobilenet64/build-onnx-medium

Per folder and score: the chosen rule, its quantile(s), and from the evaluation the bundled RRISE
row, the one-quantile row, Cohen's row at the calibration's α on the same counts, and the adaptive
``--require-radius 0.5`` row (certified accuracy per radius, abstentions, mean draws).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCORES = {"plain": ["--no-clip-at-abstention"], "clipped": []}
# outputs the copy does not need: the stages below rewrite what they read from
_SKIP = shutil.ignore_patterns("bundle", "report", "records.jsonl", "*.log")


def _stage(name: str, workdir: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "rrise", name, "--workdir", str(workdir), "--force", "--no-progress", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(cmd[2:])} exited {done.returncode}:\n{tail}")


def _row(metrics: dict, pick) -> dict[str, Any] | None:
    """The first method row whose name ``pick`` accepts: certified accuracy per radius, abstentions."""
    for name, row in metrics["methods"].items():
        if pick(name):
            acc = dict(zip(map(str, metrics["radii"]), row["certified_accuracy"], strict=True))
            return {"name": name, "certified_accuracy": acc, "abstain_rate": row["abstain_rate"]}
    return None


def _adaptive(metrics: dict) -> dict[str, Any] | None:
    section = metrics.get("adaptive") or {}
    for name, row in (section.get("rows") or {}).items():
        if row.get("kind") == "required" and row.get("require_radius") == 0.5:
            acc = dict(zip(map(str, section["radii"]), row["certified_accuracy"], strict=True))
            kept = {k: row[k] for k in ("abstain_rate", "mean_draws", "draws_ratio_to_cohen")}
            return {"name": name, "certified_accuracy": acc, **kept}
    return None


def _measure(copy: Path, flags: list[str]) -> dict[str, Any]:
    """Rule selection, calibration and evaluation of ``copy`` under one score."""
    _stage("select-rule", copy, flags)  # the rules compared with the score calibrate will use
    _stage("calibrate", copy, flags)
    _stage("evaluate", copy, [])
    calibration = json.loads((copy / "calibration.json").read_text())
    metrics = json.loads((copy / "report" / "metrics.json").read_text())
    alpha = calibration["alpha"]
    return {
        "rule": calibration.get("rule"),
        "clip_at_abstention": calibration.get("clip_at_abstention", False),
        "quantile": calibration["quantile"],
        "bin_quantiles": calibration.get("bin_quantiles"),
        "rrise_as_bundled": _row(metrics, lambda n: n.endswith(", as bundled")),
        "rrise_one_quantile": _row(metrics, lambda n: "one quantile" in n and f"α={alpha:g})" in n),
        "cohen": _row(metrics, lambda n: n.startswith("Cohen MC") and f"α={alpha:g})" in n),
        "adaptive_require_0.5": _adaptive(metrics),
    }


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.studies clip_at_abstention")
    ap.add_argument("--workdir", type=Path, action="append", required=True, help="a finished work folder")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"folders": {}}
    for workdir in args.workdir:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / workdir.name
            shutil.copytree(workdir, copy, ignore=_SKIP)
            rows = {name: _measure(copy, flags) for name, flags in SCORES.items()}
        here = workdir.resolve()
        key = str(here.relative_to(ROOT)) if here.is_relative_to(ROOT) else workdir.name
        out["folders"][key] = rows
        print(json.dumps({key: rows}, indent=1), flush=True)
    return out
