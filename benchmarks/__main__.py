"""Run the product benchmarks and write their JSON to ``benchmarks/results/NAME.json``.

    python -m benchmarks                # every benchmark run by default (minutes each)
    python -m benchmarks mc runtime     # just these
    python -m benchmarks mc --quick     # a bench's own flags follow its name
    python -m benchmarks own_model      # a long one (an hour or more) runs only when named

Each ``bench_NAME.py`` exposes ``main(argv: list[str]) -> dict``; one that sets
``RUN_BY_DEFAULT = False`` (``full_profile``, ``own_model``: hours of CPU) runs only when named. The
JSON records the command, the machine and the time, beside the bench's own numbers. Quote medians
and ratios measured side by side in one run: absolute numbers move with whatever else the machine
is doing. Research studies on a finished work folder are ``python -m benchmarks.studies``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from benchmarks.recording import RESULTS, machine, run_recorded, write_record

__all__ = ["RESULTS", "available", "by_default", "machine", "main"]

HERE = Path(__file__).parent


def available() -> list[str]:
    """Every benchmark's name (``bench_NAME.py``)."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def by_default() -> list[str]:
    """The benchmarks ``python -m benchmarks`` runs when given no name."""
    return [n for n in available() if getattr(_module(n), "RUN_BY_DEFAULT", True)]


def _module(name: str):
    return importlib.import_module(f"benchmarks.bench_{name}")


def result_name(name: str, args: list[str]) -> str:
    """The stem of a benchmark's JSON: its name, or what its ``result_name(args)`` says (one bench
    run at two settings keeps both results)."""
    namer = getattr(_module(name), "result_name", None)
    return name if namer is None else namer(args)


def parse(argv: list[str], names: list[str]) -> list[tuple[str, list[str]]] | str:
    """``[(name, its args), …]`` from ``NAME [args] NAME [args] …``, or an error line."""
    groups: list[tuple[str, list[str]]] = []
    for arg in argv:
        if arg in names:
            groups.append((arg, []))
        elif groups:
            groups[-1][1].append(arg)
        else:
            return f"unknown benchmark {arg!r}; available: {', '.join(names)}"
    return groups


def main(argv: list[str]) -> int:
    groups = parse(argv, available())
    if isinstance(groups, str):
        print(groups, file=sys.stderr)
        return 2
    for name, args in groups or [(n, []) for n in by_default()]:
        command = " ".join(["python -m benchmarks", name, *args])
        record = run_recorded(f"benchmarks.bench_{name}", name, command, args)
        path = write_record(RESULTS / f"{result_name(name, args)}.json", record)
        print(f"{name}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
