"""Run one research study and write its JSON.

    python -m benchmarks.studies                                   # list the studies
    python -m benchmarks.studies rules_on_selection --workdir W --out rules.json
    python -m benchmarks.studies allocation_ceiling --workdir W    # → benchmarks/results/studies/NAME.json

Each ``benchmarks/studies/NAME.py`` exposes ``main(argv: list[str]) -> dict``, the contract of the
product benchmarks; the JSON records the command, the machine and the time beside the study's own
keys. ``--out FILE`` (taken by this runner, not the study) says where it goes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.recording import RESULTS, run_recorded, write_record

__all__ = ["available", "main"]

HERE = Path(__file__).parent


def available() -> list[str]:
    """Every study's name (``NAME.py`` in this folder)."""
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def split_out(args: list[str]) -> tuple[Path | None, list[str]]:
    """``(--out FILE or None, the other args)``."""
    rest, out = list(args), None
    for i, arg in enumerate(rest):
        if arg == "--out" and i + 1 < len(rest):
            out = Path(rest[i + 1])
            del rest[i : i + 2]
            break
        if arg.startswith("--out="):
            out = Path(arg.split("=", 1)[1])
            del rest[i]
            break
    return out, rest


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] not in names:
        given = f"unknown study {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        usage = "usage: python -m benchmarks.studies NAME [--out FILE] [args]"
        print(f"{given}{usage}; studies: {', '.join(names)}")
        return 2 if given else 0
    name, args = argv[0], argv[1:]
    out, args = split_out(args)
    command = " ".join(["python -m benchmarks.studies", *argv])
    record = run_recorded(f"benchmarks.studies.{name}", name, command, args)
    path = write_record(out or RESULTS / "studies" / f"{name}.json", record)
    print(f"{name}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
