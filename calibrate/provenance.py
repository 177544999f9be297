"""Which inputs each stage's outputs were made from, and whether they still are.

Every stage declares its outputs and the stages whose outputs it reads (``needs``, and ``uses`` for
optional ones, read when present). When a stage finishes, ``provenance/<stage>.json`` records the
sha256 of every input file it read and of every output it wrote. A stage is *current* when its
outputs exist and the inputs it recorded are, byte for byte, the work folder's inputs now.

Policy (one, everywhere): a stage run too early, or on inputs whose own stage is missing or stale
(anywhere upstream), is refused with :class:`StageNotReady`, which names the first stage to run and
its command. A stage asked to run whose own outputs are stale runs again (it is never skipped). A
stage with no inputs (``train-base``) whose outputs exist is taken as it is: a base model put there
by hand counts as the work folder's base model, and everything made from another is stale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rrise import __version__
from rrise.fileio import atomic_write_json, read_json, sha256_file

__all__ = [
    "PROVENANCE_DIR",
    "Stage",
    "StageNotReady",
    "check_ready",
    "current_inputs",
    "file_sha256",
    "is_current",
    "read_record",
    "write_record",
]

PROVENANCE_DIR = "provenance"


@dataclass(frozen=True)
class Stage:
    """One stage of the work folder: ``run(w, **options)`` writes ``outputs`` (paths relative to the
    folder) from the outputs of the stages it ``needs`` (and of those it ``uses``, when present)."""

    name: str
    run: Callable[..., list[Path]]
    outputs: tuple[str, ...]
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    command: str = ""

    @property
    def cli(self) -> str:
        """The command that (re)makes this stage's outputs."""
        return self.command or f"rrise {self.name}"


class StageNotReady(ValueError):
    """A stage's inputs are missing or stale; ``stage`` is the first one to run, ``command`` how."""

    def __init__(self, message: str, stage: str, command: str):
        super().__init__(message)
        self.stage, self.command = stage, command


_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a file (None when it does not exist); cached per (path, inode, times, size), so a
    file replaced by an atomic rename (a new inode) is always hashed again."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _outputs_exist(root: Path, stage: Stage) -> bool:
    return all((root / o).exists() for o in stage.outputs)


def _prerequisites(root: Path, stages: Mapping[str, Stage], stage: Stage) -> list[Stage]:
    """The stages whose outputs ``stage`` reads now: all it needs, and those it uses that are there."""
    used = [stages[n] for n in stage.uses if _outputs_exist(root, stages[n])]
    return [stages[n] for n in stage.needs] + used


def current_inputs(root: Path, stages: Mapping[str, Stage], name: str) -> dict[str, str | None]:
    """``{input path: sha256}`` of what stage ``name`` would read now."""
    inputs: dict[str, str | None] = {}
    for pre in _prerequisites(root, stages, stages[name]):
        for out in pre.outputs:
            inputs[out] = file_sha256(root / out)
    return inputs


def read_record(root: Path, name: str) -> dict[str, Any] | None:
    return read_json(root / PROVENANCE_DIR / f"{name}.json")


def write_record(
    root: Path,
    stages: Mapping[str, Stage],
    name: str,
    inputs: dict[str, str | None],
    options: dict[str, Any] | None = None,
) -> Path:
    """Record that stage ``name`` made its outputs from ``inputs`` (hashed before it ran)."""
    record = {
        "stage": name,
        "inputs": inputs,
        "outputs": {o: file_sha256(root / o) for o in stages[name].outputs},
        "options": options or {},
        "rrise_version": __version__,
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return atomic_write_json(root / PROVENANCE_DIR / f"{name}.json", record)


def _why_not_current(root: Path, stages: Mapping[str, Stage], name: str) -> str | None:
    """None when stage ``name``'s outputs exist and were made from today's inputs; else why not
    (looking at this stage only, not upstream)."""
    stage = stages[name]
    missing = [o for o in stage.outputs if not (root / o).exists()]
    if missing:
        return f"missing {', '.join(missing)}"
    record = read_record(root, name)
    if record is None:
        if not stage.needs and not stage.uses:
            return None  # nothing it could be stale against
        return "its outputs carry no provenance record (made by hand or by an older rrise)"
    have, now = record.get("inputs", {}), current_inputs(root, stages, name)
    for path in sorted(set(have) | set(now)):
        if have.get(path) == now.get(path):
            continue
        if path not in have:
            return f"{path} appeared after it ran"
        if now.get(path) is None:
            return f"{path} is gone"
        return f"{path} changed since it ran"
    return None


def _upstream(root: Path, stages: Mapping[str, Stage], name: str) -> list[str]:
    """Every stage ``name`` reads from, directly or not, in pipeline order."""
    seen: set[str] = set()
    todo = [p.name for p in _prerequisites(root, stages, stages[name])]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(p.name for p in _prerequisites(root, stages, stages[n]))
    return [n for n in stages if n in seen]


def check_ready(root: Path, stages: Mapping[str, Stage], name: str) -> None:
    """Raise :class:`StageNotReady` unless every stage ``name`` reads from (directly or upstream)
    is current; the message names the first one to run and the command that runs it."""
    bad = [(n, why) for n in _upstream(root, stages, name) if (why := _why_not_current(root, stages, n))]
    if not bad:
        return
    first, why = bad[0]
    stage = stages[first]
    if why.startswith("missing"):
        msg = f"{name} needs the outputs of {first} ({why}): run `{stage.cli}` first"
    else:
        msg = f"{first} is stale ({why}): run `{stage.cli}` first"
    later = [n for n, _ in bad[1:]]
    if later:
        msg += f", then {', '.join(f'`{stages[n].cli}`' for n in later)} (or `rrise demo` for them all)"
    raise StageNotReady(msg, first, stage.cli)


def is_current(root: Path, stages: Mapping[str, Stage], name: str) -> bool:
    """Whether stage ``name`` may be skipped: its outputs exist and were made from today's inputs
    (call :func:`check_ready` first for everything upstream)."""
    return _why_not_current(root, stages, name) is None
