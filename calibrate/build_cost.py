"""What a build will cost, said before it is spent: the largest radius its sizes can certify, the
base-model evaluations of each Monte Carlo stage, the whole build's time at rates measured on this
machine, and (``--budget-minutes``) the sizes that fit a time budget (:mod:`rrise.calibrate.sizing`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rrise.fileio import atomic_write_json, read_json
from rrise.scores import p_cap
from rrise.stats import norm_ppf

from . import provenance as prov
from .mc import prepare_model, sample_counts
from .profiles import Profile
from .sizing import (
    Rates,
    Sizing,
    SplitSizes,
    monte_carlo_evaluations,
    size_to_budget,
    stage_seconds,
    training_seconds,
)
from .stages import ALL_STAGES
from .workdir import Workdir

__all__ = [
    "SIZED_STAGES",
    "apply_budget",
    "log_budget",
    "log_caps",
    "mc_budget",
    "measure_rates",
    "probe_rate",
    "radius_caps",
]

_PROBE_STEPS = 3  # timed surrogate training steps (after one warm-up)
# The stages whose outputs depend on the sizes a budget sets: once one has run, the sizes stay.
SIZED_STAGES = ("targets", "train-surrogate", "select-rule", "calibrate", "certify")


def _split_sizes(w: Workdir) -> SplitSizes:
    """The folder's split sizes; the fresh-target pool where the folder's images are at hand."""
    folder_data = getattr(w, "folder_data", None)
    pool = len(folder_data().fresh_pool()) if callable(folder_data) else None
    return SplitSizes.of(w.splits(), pool)


def _done(w: Workdir, name: str) -> bool:
    try:
        return bool(prov.is_current(w.root, ALL_STAGES, name) and prov.read_record(w.root, name))
    except Exception:  # noqa: BLE001 - only an estimate
        return False


def mc_budget(w: Workdir, distil_steps: int = 0) -> dict[str, int]:
    """Base-model evaluations each MC stage of a `rrise build` folder spends (0 for one already done),
    with ``distil_steps`` distil-first steps before the fresh targets (what the folder's base gives
    its surrogate: :func:`measure_rates`)."""
    prof = dataclasses.replace(w.prof, distil_steps=distil_steps)
    plan = monte_carlo_evaluations(prof, _split_sizes(w))
    return {k: 0 if _done(w, k) else v for k, v in plan.items()}


def probe_rate(w: Workdir, draws: int = 512, inputs: int = 4, runs: int = 2) -> float:
    """Noisy base-model evaluations per second on this machine (onnxruntime, a short timed probe):
    the faster of ``runs`` timed passes of ``draws`` draws on ``inputs`` test images, after two
    untimed passes of the same shape. onnxruntime takes a few batches of a new shape to reach its
    speed; timed cold, a 64×64 MobileNet's probe read 2,761 evaluations/s where its build then ran
    at about 6,000."""
    ds = w.data("test")
    x = np.asarray(ds.images[w.splits()["test"][:inputs]], dtype=np.float32)
    prepared = prepare_model(str(w.path("base.onnx")), "onnxruntime")
    kw = {"sigma": w.config.sigma, "batch_size": w.prof.batch_size, "seed": 0}
    for _ in range(2):
        sample_counts(prepared, x, draws, **kw)  # warm-up, same shape as the timed passes
    best = 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        sample_counts(prepared, x, draws, **kw)
        best = max(best, len(x) * draws / max(time.perf_counter() - t0, 1e-9))
    return best


def _initial_surrogate(w: Workdir) -> tuple[Any, int, int]:
    """The surrogate the train-surrogate stage would start from, the epochs a fit on the fixed
    target store would take and the distil-first steps it gets (the folder's log silenced: this is
    only a probe)."""
    from .bases import base_of

    quiet = dataclasses.replace(w, log=lambda _line: None)
    base = base_of(quiet)
    arch = w.config.model_spec.surrogate_arch
    model, _ = base.initial_surrogate(arch)
    return model, base.surrogate_epochs(model, len(w.splits()["targets"])), base.distil_steps(model, arch)


def _train_step_seconds(model: Any, shape: tuple[int, ...], classes: int, batch: int) -> float:
    """Seconds per soft-label training step (forward, backward, Adam) on ``batch`` random inputs."""
    import torch

    from .train import soft_label_cross_entropy

    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *shape), generator=gen)
    target = torch.softmax(torch.randn((batch, classes), generator=gen), dim=1)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    seconds = []
    for _ in range(_PROBE_STEPS + 1):
        t0 = time.perf_counter()
        loss = soft_label_cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds[1:]))


def measure_rates(w: Workdir) -> tuple[Rates, int, Profile]:
    """The two rates a build's time follows, measured here on the folder's models, the epochs a
    fixed-store surrogate fit takes, and the folder's profile with the distil-first steps its
    surrogate gets (the base's default): ``(Rates, store_epochs, profile)``. Takes a few seconds."""
    ds = w.data("train")
    model, epochs, distil = _initial_surrogate(w)
    batch = w.prof.fresh_batch
    step = _train_step_seconds(model, tuple(ds.shape), len(ds.classes), batch)
    rates = Rates(evaluations_per_s=probe_rate(w), train_step_s=step, train_batch=batch)
    return rates, epochs, dataclasses.replace(w.prof, distil_steps=distil)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def radius_caps(prof: Profile, sigma: float) -> dict[str, float]:
    """The largest radius each method can certify with ``prof``'s sizes, before any draw is spent:
    RRISE ``σ·Φ⁻¹(β^(1/N_cal))`` (``N_cal + cap_draws`` draws at the cap; a calibration quantile
    above 0 lowers it further), Cohen ``σ·Φ⁻¹(α^(1/n))`` (every one of n draws on one class).

    >>> from rrise.calibrate.profiles import get_profile
    >>> caps = radius_caps(get_profile("quick"), 0.25)
    >>> round(caps["rrise"], 3), round(caps["cohen"], 3)
    (0.616, 0.616)
    """
    n_top = prof.n_cal + prof.cap_draws if prof.cap_draws else prof.n_cal
    return {
        "rrise": sigma * float(norm_ppf(p_cap(prof.beta, n_top))),
        "cohen": sigma * float(norm_ppf(p_cap(prof.mc_alpha, prof.n))),
    }


def log_caps(w: Workdir, log: Callable[[str], None]) -> None:
    """Say, before any draw is spent, the largest radius these sizes can certify, and when they
    cap RRISE below what Cohen's test on the same run can reach."""
    p, sigma = w.prof, w.config.sigma
    caps = radius_caps(p, sigma)
    log(
        f"[build] largest radius these sizes can certify: RRISE {caps['rrise']:.3f} (N_cal = "
        f"{p.n_cal:,}, β = {p.beta:g}, less its calibration quantile), Cohen {caps['cohen']:.3f} "
        f"(n = {p.n:,}, α = {p.mc_alpha:g}); σ = {sigma:g}"
    )
    if caps["rrise"] < caps["cohen"] - 1e-9:
        log(
            f"[build] N_cal = {p.n_cal:,} caps RRISE below Cohen's {caps['cohen']:.3f}: a larger "
            "profile (or profile.n_cal=N, profile.cap_draws=N) lifts it"
        )


def log_budget(w: Workdir, log: Callable[[str], None]) -> None:
    """Say how many base-model evaluations the stages will spend, and how long the whole build
    (Monte Carlo and surrogate training) takes at the rates measured here; and the largest radius
    the sizes can certify."""
    log_caps(w, log)
    if not sum(mc_budget(w).values()):
        log("[build] Monte Carlo: every count store is current (0 base-model evaluations)")
        return
    rates, epochs, prof = measure_rates(w)
    budget = mc_budget(w, prof.distil_steps)
    total = sum(budget.values())
    parts = ", ".join(f"{k} {v:,}" for k, v in budget.items() if v)
    rate = rates.evaluations_per_s
    log(
        f"[build] Monte Carlo: {total:,} base-model evaluations ({parts}); at the measured "
        f"{rate:,.0f} evaluations/s that is about {_duration(total / rate)}"
    )
    sizes = _split_sizes(w)
    seconds = [v for k, v in stage_seconds(prof, sizes, rates, epochs).items() if not _done(w, k)]
    training = 0.0 if _done(w, "train-surrogate") else training_seconds(prof, sizes, rates, epochs)
    log(
        f"[build] the whole build: about {_duration(sum(seconds))} of Monte Carlo and surrogate training "
        f"({_steps_text(prof)} {_duration(training)}, at {1000 * rates.train_step_s:.0f} ms a step of "
        f"{rates.train_batch} images), plus rule fitting, the report and the bundle"
    )


def _steps_text(prof: Profile) -> str:
    """What the surrogate's training steps are, for the estimate."""
    if not prof.steps:
        return "training steps on the fixed target store"
    distil = f"{prof.distil_steps:,} distil-first and " if prof.distil_steps else ""
    return f"training steps: {distil}{prof.steps:,} fresh-target"


def apply_budget(w: Workdir, minutes: float, log: Callable[[str], None]) -> Workdir:
    """The folder sized to ``minutes`` (:func:`rrise.calibrate.sizing.size_to_budget` at the rates
    measured here), its sizes recorded in run.json as profile overrides. A folder sized before keeps
    its sizes (so that a rerun resumes); ValueError naming ``--budget-minutes`` when even the
    smallest sizes do not fit."""
    if w.config.profile_overrides:
        log(f"[build] sizes chosen when this folder was made: {_overrides_text(w.config.profile_overrides)}")
        return w
    if any(prov.read_record(w.root, name) for name in SIZED_STAGES):
        log(
            f"[build] --budget-minutes is ignored: this folder's Monte Carlo started with the {w.prof.name} "
            "profile's sizes (use another --workdir to size a build)"
        )
        return w
    rates, epochs, prof = measure_rates(w)
    sizing = size_to_budget(prof, _split_sizes(w), rates, minutes, epochs)
    log(
        f"[build] --budget-minutes {minutes:g}: {_overrides_text(sizing.overrides)} (the {w.prof.name} "
        f"profile's steps {w.prof.steps:,}, N_cal {w.prof.n_cal:,}, n {w.prof.n:,}, scaled by "
        f"{sizing.factor:.2f}); estimated {_duration(sizing.total_s)}"
    )
    return _resized(w, sizing)


def _overrides_text(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(overrides.items()))


def _resized(w: Workdir, sizing: Sizing) -> Workdir:
    """``w`` with ``sizing``'s overrides in its config and its run.json (written before any Monte
    Carlo stage has run, so nothing made with the old sizes exists)."""
    config = dataclasses.replace(w.config, profile_overrides=sizing.overrides)
    meta = read_json(w.path("run.json")) or {}
    atomic_write_json(w.path("run.json"), {**meta, "config": config.record()})
    return dataclasses.replace(w, config=config)
