"""The full-size evaluation on real Fashion-MNIST, one work folder per σ, reports copied here.

    python -m benchmarks full_profile                         # σ = 0.25 and 0.5, profile full-small
    python -m benchmarks full_profile --sigma 0.25 --profile full

Each σ runs ``rrise demo`` in ``runs/<profile>-s<σ>`` (every stage resumes, so an interrupted run
continues where it stopped), then copies the report (metrics.json, report.md, plots, rules.json) to
``benchmarks/results/<profile>/sigma-<σ>/`` with the command and the machine that made it (run.json);
``benchmarks/results/full_profile.json`` lists the folders with each σ's certified accuracy. It takes
hours of CPU time (about 50M base-model evaluations per σ), so ``python -m benchmarks`` runs it
only when named.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.recording import RESULTS, machine

RUN_BY_DEFAULT = False  # hours: `python -m benchmarks full_profile`
REPORT_FILES = ("metrics.json", "report.md", "certified_accuracy.png", "reliability.png")


def run_sigma(profile: str, sigma: float, runs: Path) -> Path:
    """Run (or resume) the demo at ``sigma`` and copy its report; returns the results folder."""
    work = runs / f"{profile}-s{sigma:g}"
    cmd = [
        sys.executable, "-m", "rrise", "demo", "--workdir", str(work), "--profile", profile,
        "--sigma", f"{sigma:g}", "--dataset", "fashion-mnist", "--no-progress",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    out = RESULTS / profile / f"sigma-{sigma:g}"
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        shutil.copy2(work / "report" / name, out / name)
    shutil.copy2(work / "rules.json", out / "rules.json")
    record = {
        "command": f"python -m benchmarks full_profile --profile {profile} --sigma {sigma:g}",
        "demo_command": shlex.join(["rrise", *cmd[3:]]),
        "wall_seconds_this_invocation": round(time.perf_counter() - t0, 1),
        "stage_seconds": json.loads((work / "run.json").read_text()).get("stage_seconds", {}),
        "machine": machine(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def summary(folder: Path) -> dict:
    """Certified accuracy (%) per radius and abstention of every method in a copied report."""
    metrics = json.loads((folder / "metrics.json").read_text())
    return {
        "folder": str(folder.relative_to(RESULTS.parent.parent)),
        "radii": metrics["radii"],
        "methods": {
            name: {
                "certified_pct": [round(100 * v, 1) for v in m["certified_accuracy"]],
                "abstain_pct": round(100 * m["abstain_rate"], 1),
            }
            for name, m in metrics["methods"].items()
        },
    }


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks full_profile", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--profile", default="full-small", choices=["full", "full-small", "medium"])
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="where the work folders live")
    args = ap.parse_args(argv)
    result = {"profile": args.profile, "sigma": {}}
    for sigma in args.sigma:
        folder = run_sigma(args.profile, sigma, args.runs)
        print(f"results: {folder}")
        result["sigma"][f"{sigma:g}"] = summary(folder)
    return result
