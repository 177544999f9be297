"""Run benchmarks and write their JSON to ``benchmarks/results/NAME.json``.

    python -m benchmarks                # every bench_*.py
    python -m benchmarks mc runtime     # just these
    python -m benchmarks mc --quick     # a bench's own flags follow its name

Each ``bench_NAME.py`` exposes ``main(argv: list[str]) -> dict``. The JSON records the command,
the machine and the time, beside the bench's own numbers. Quote medians and ratios measured side by
side in one run: absolute numbers move with whatever else the machine is doing.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def main(argv: list[str]) -> int:
    names = available()
    groups: list[tuple[str, list[str]]] = []
    for arg in argv:
        if arg in names:
            groups.append((arg, []))
        elif groups:
            groups[-1][1].append(arg)
        else:
            print(f"unknown benchmark {arg!r}; available: {', '.join(names)}", file=sys.stderr)
            return 2
    groups = groups or [(n, []) for n in names]
    RESULTS.mkdir(exist_ok=True)
    for name, args in groups:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        t0 = time.perf_counter()
        result = module.main(args)
        out = {
            "benchmark": name,
            "command": " ".join(["python -m benchmarks", name, *args]),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t0, 1),
            "machine": machine(),
            **result,
        }
        path = RESULTS / f"{name}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"{name}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
