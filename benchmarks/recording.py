"""Run one benchmark or study module and record its result with the command, machine and time.

Every module run this way exposes ``main(argv: list[str]) -> dict``; :func:`run_recorded` calls it
and returns the JSON record written beside the result: ``benchmark``, ``command``, ``created``,
``wall_s``, ``machine``, then the module's own keys.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["RESULTS", "machine", "run_recorded", "write_record"]

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """Python, platform, CPU count, and the onnxruntime/torch versions and GPU where installed."""
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


def run_recorded(module_name: str, name: str, command: str, args: list[str]) -> dict:
    """Import ``module_name``, run its ``main(args)`` and return the result with its record."""
    module = importlib.import_module(module_name)
    t0 = time.perf_counter()
    result = module.main(args)
    if not isinstance(result, dict):
        raise TypeError(f"{module_name}.main must return a dict, got {type(result).__name__}")
    return {
        "benchmark": name,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        **result,
    }


def write_record(path: Path, record: dict) -> Path:
    """Write ``record`` as indented JSON to ``path`` (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
