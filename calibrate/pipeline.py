"""Running the work folder's stages: :func:`run_targets` (also under ``torchrun``) and
:func:`run_demo`; the stage table and :func:`run_stage` live in :mod:`rrise.calibrate.stages`
(re-exported here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import distributed as dist
from . import provenance as prov
from .counts import TARGET_STORES, stage_targets
from .demo import run_demo as _run_demo
from .provenance import Stage, StageNotReady
from .stages import ALL_STAGES, OPTIONAL_STAGES, STAGES, run_stage
from .store import discard
from .workdir import RunConfig, Workdir

__all__ = [
    "ALL_STAGES",
    "OPTIONAL_STAGES",
    "STAGES",
    "RunConfig",
    "Stage",
    "StageNotReady",
    "Workdir",
    "run_demo",
    "run_stage",
    "run_targets",
]


def run_targets(w: Workdir, force: bool = False, resume: bool = True) -> list[Path]:
    """`rrise targets`, also under ``torchrun``: ``force`` or ``resume=False`` start the stores over;
    by default a partial store is resumed when its metadata matches, and refused (naming the field
    that differs) when it does not."""
    info, _ = dist.init()
    try:
        ready = None
        if info.is_main:
            ready = _targets_ready(w, force)
            if not isinstance(ready, str) and (force or not resume):
                for name in TARGET_STORES.values():
                    discard(w.path(name))
        ready = dist.broadcast(info, ready)
        if isinstance(ready, str):
            raise StageNotReady(ready, "train-base", "rrise train-base")
        if info.is_main:
            return run_stage(w, "targets", force=force, resume=resume and not force)
        return [w.path(o) for o in STAGES["targets"].outputs] if ready else stage_targets(w, resume=True)
    finally:
        dist.shutdown()


def _targets_ready(w: Workdir, force: bool) -> str | bool:
    """On rank 0: why `rrise targets` cannot run (a message), or whether its stores are current."""
    try:
        prov.check_ready(w.root, ALL_STAGES, "targets")
    except StageNotReady as exc:
        return str(exc)
    return not force and prov.is_current(w.root, ALL_STAGES, "targets")


def run_demo(w: Workdir, force: bool = False) -> dict[str, Any]:
    """Every stage, then the runtime on a video: see :func:`rrise.calibrate.demo.run_demo`."""
    return _run_demo(w, force=force)
