"""The stages of a work folder: which there are, what each reads and writes, and running one.

A stage is skipped when its outputs are current (made from today's inputs, see
:mod:`rrise.calibrate.provenance`), rerun when they are stale, and refused, naming the stage to run
first, when what it reads is missing or stale. The stages themselves live in their own modules:
:mod:`~rrise.calibrate.fit` (training), :mod:`~rrise.calibrate.counts` (Monte Carlo stores),
:mod:`~rrise.calibrate.calibrating` (rule and calibration), :mod:`~rrise.calibrate.cohen` (Cohen's
MC baseline), :mod:`~rrise.calibrate.evaluating` (evaluation) and :mod:`~rrise.calibrate.bundling`.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from . import provenance as prov
from .adaptive_workdir import ADAPTIVE_FIGURE
from .bundling import stage_bundle
from .calibrating import stage_calibrate, stage_select_rule
from .cohen import COHEN_NPZ, COHEN_TSV, stage_cohen
from .counts import REFERENCE_STORE, TARGET_STORES, stage_reference, stage_targets
from .evaluating import stage_evaluate
from .fit import stage_train_base, stage_train_baseline, stage_train_surrogate
from .provenance import Stage
from .specs import USER_DATASET
from .workdir import Workdir

__all__ = ["ALL_STAGES", "OPTIONAL_STAGES", "STAGES", "run_stage"]

_BASE = ("base.pt", "base.onnx")
_SURROGATE = ("surrogate.pt", "surrogate.onnx")
_REPORT = (
    "report/metrics.json",
    "report/report.md",
    "report/certified_accuracy.png",
    f"report/{ADAPTIVE_FIGURE}",
)

# The demo's stages, in order.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("train-base", stage_train_base, _BASE),
        Stage(
            "targets",
            stage_targets,
            tuple(f"{name}/manifest.json" for name in TARGET_STORES.values()),
            needs=("train-base",),
        ),
        Stage("train-surrogate", stage_train_surrogate, _SURROGATE, needs=("train-base", "targets")),
        Stage(
            "train-baseline",
            stage_train_baseline,
            ("baseline_js.pt", "baseline_js.onnx"),
            needs=("train-base", "targets"),
        ),
        Stage("select-rule", stage_select_rule, ("rules.json",), needs=("train-base", "train-surrogate")),
        Stage(
            "calibrate",
            stage_calibrate,
            ("calibration.npz", "calibration.json"),
            needs=("train-base", "train-surrogate"),
            uses=("select-rule",),
        ),
        Stage("certify", stage_cohen, (COHEN_TSV, COHEN_NPZ), needs=("train-base",)),
        Stage(
            "evaluate",
            stage_evaluate,
            _REPORT,
            needs=("train-base", "train-surrogate", "calibrate", "certify"),
            uses=("train-baseline", "select-rule", "reference"),
        ),
        Stage(
            "bundle",
            stage_bundle,
            ("bundle/manifest.json",),
            needs=("train-base", "train-surrogate", "calibrate"),
            uses=("select-rule",),  # its counts choose the routing rule the manifest states
            command="rrise demo",
        ),
    )
}

# Not part of the demo (it costs n_ref_inputs × N_ref base-model evaluations); `evaluate` uses it
# when it is there.
OPTIONAL_STAGES: dict[str, Stage] = {
    "reference": Stage(
        "reference", stage_reference, (f"{REFERENCE_STORE}/manifest.json",), needs=("train-base",)
    )
}

# Pipeline order, for provenance checks: `reference` sits before `evaluate`, which reads it.
ALL_STAGES: dict[str, Stage] = {
    **{k: v for k, v in STAGES.items() if k not in ("evaluate", "bundle")},
    **OPTIONAL_STAGES,
    "evaluate": STAGES["evaluate"],
    "bundle": STAGES["bundle"],
}


def run_stage(
    w: Workdir, name: str, force: bool = False, resume: bool | None = None, **options: Any
) -> list[Path]:
    """Run one stage unless its outputs are current (``force`` or stage ``options`` rerun it).

    Raises :class:`StageNotReady` when what the stage reads is missing or stale. ``resume`` (stages
    with count stores): continue a store made with the same settings and refuse one made otherwise;
    by default a stage that ran before and runs again (stale, or forced) starts such a store over
    instead. Records the stage's inputs (``provenance/``) and wall time (``run.json``).
    """
    stage = ALL_STAGES[name]
    prov.check_ready(w.root, ALL_STAGES, name)
    if not force and not options and prov.is_current(w.root, ALL_STAGES, name):
        w.log(f"[{name}] outputs in {w.root} are up to date, skipping (--force reruns)")
        return [w.path(o) for o in stage.outputs]
    inputs = prov.current_inputs(w.root, ALL_STAGES, name)
    kwargs = dict(options)
    if "resume" in inspect.signature(stage.run).parameters:
        kwargs["resume"] = (
            (not force and prov.read_record(w.root, name) is None) if resume is None else resume
        )
    imported = name == "train-base" and w.config.dataset == USER_DATASET
    # the user's own model is imported, not trained: say so, not the training stage's words
    w.log(f"[{name}] " + ("importing your model as the base model (nothing is trained)" if imported
                          else stage.run.__doc__.splitlines()[0]))  # fmt: skip
    t0 = time.perf_counter()
    out = stage.run(w, **kwargs)
    seconds = time.perf_counter() - t0
    prov.write_record(w.root, ALL_STAGES, name, inputs, options)
    w.record_seconds(name, seconds)
    w.log(f"[{name}] " + ("your model imported" if imported else "done") + f" in {seconds:.1f} s")
    return out
