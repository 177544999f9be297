"""The select-rule and calibrate stages: a rule's :class:`rrise.CalibrationSpec` from the selection
split, then :func:`rrise.conformalize` on the calibration inputs → ``calibration.json``.

``calibration.json`` is :meth:`rrise.Calibration.to_dict` plus the ``rule``: the record the bundle
gets and the one ``rrise evaluate`` reports. It keeps ``base_sha256`` and ``surrogate_sha256``, the
models its counts and probabilities came from; :func:`load_calibration` refuses it when the work
folder's models are other ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rrise.calibration import Calibration, CalibrationSpec, conformalize
from rrise.export.bundler import onnx_probs_runner
from rrise.fileio import atomic_write_json, load_npz, read_json, save_npz, sha256_file

from .counts import (
    CALIBRATION_STORE,
    CAP_STORE,
    RULE_CAP_STORE,
    RULE_STORE,
    fill_count_store,
    load_store_counts,
)
from .provenance import StageNotReady, file_sha256
from .rules import compare_rules, fit_rule, get_rule
from .workdir import Workdir

__all__ = [
    "CalibrateSettings",
    "cap_stage_counts",
    "chosen_cap_draws",
    "chosen_rule",
    "load_calibration",
    "load_calibration_npz",
    "rule_spec",
    "selection_data",
    "stage_calibrate",
    "stage_select_rule",
    "surrogate_probs",
]

CALIBRATION_NPZ_KEYS = ("index", "images", "labels", "counts", "probs")


def surrogate_probs(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """The surrogate's probabilities with the numerics of the bundle's fp32 variant: onnxruntime on
    the CPU, one input at a time (the runtime's per-frame path)."""
    run = onnx_probs_runner(onnx_path, "onnxruntime-cpu")
    x = np.ascontiguousarray(images, dtype=np.float32)
    return np.concatenate([run(x[i : i + 1]) for i in range(len(x))]).astype(np.float64)


def selection_data(w: Workdir) -> dict[str, np.ndarray]:
    """What calibration rules are fitted on, all from the selection split: ``bin_probs`` (the
    surrogate on every selection input: bin edges need only ŝ) and, once ``select-rule`` has sampled
    them, ``index``, ``probs``, ``counts`` (full-size MC) and ``labels`` of the rule-selection inputs."""
    ds = w.data("train")
    surrogate = w.path("surrogate.onnx")
    out = {"bin_probs": surrogate_probs(surrogate, ds.images[w.splits()["selection"]])}
    if w.prof.n_rule and (w.path(RULE_STORE) / "manifest.json").exists():
        index, counts = load_store_counts(w, RULE_STORE)
        probs = surrogate_probs(surrogate, ds.images[index])
        out.update(index=index, probs=probs, counts=counts, labels=ds.labels[index])
    return out


def stage_select_rule(
    w: Workdir, cap_draws: int | None = None, resume: bool = True, clip_at_abstention: bool = True
) -> list[Path]:
    """Choose the calibration rule on the selection split (full-size MC there; never calibration).

    ``cap_draws`` (default: the profile's; 0 = off): the rules are compared as `rrise calibrate
    --cap-draws` will run them, the rule-selection inputs whose N_cal draws all fell on one class
    getting that many more (:func:`cap_stage_counts`, a store of their own). ``clip_at_abstention``:
    the rules' scores as `rrise calibrate` computes them (:class:`rrise.CalibrationSpec`)."""
    p = w.prof
    out = w.path("rules.json")
    if not p.n_rule:
        atomic_write_json(
            out, {"winner": "single", "note": f"profile {p.name!r} has no rule-selection inputs"}
        )
        return [out]
    n2 = _cap_draws(w, cap_draws)
    fill_count_store(w, RULE_STORE, w.splits()["rules"], p.n_cal, "rules", "train", resume)
    data = selection_data(w)
    cap_counts = None
    if n2:
        cap_counts = cap_stage_counts(w, data["index"], data["counts"], n2, resume, RULE_CAP_STORE)
    result = compare_rules(
        data["probs"],
        data["counts"],
        data["labels"],
        n_mc=p.n_cal,
        sigma=w.config.sigma,
        alpha=p.alphas[0],
        beta=p.beta,
        seed=w.config.seed,
        deploy_m=len(w.splits()["calibration"]),
        cap_counts=cap_counts,
        cap_draws=n2 or None,
        clip_at_abstention=clip_at_abstention,
    )
    result["clip_at_abstention"] = clip_at_abstention
    # The counts' digest: later stages read them through this file (the evaluation and the bundle's
    # routing rule), so rules.json changes whenever they do and those stages go stale.
    result["counts_sha256"] = sha256_file(w.path(RULE_STORE) / "manifest.json")
    atomic_write_json(out, result)
    for name, why in result["excluded"].items():
        w.log(f"[select-rule] rule {name} excluded: {why}")
    w.log(f"[select-rule] winner on the selection split: {result['winner']}")
    return [out]


def chosen_rule(w: Workdir) -> str:
    """The rule the selection split chose (``rules.json``), or ``single`` before it has run."""
    return (read_json(w.path("rules.json")) or {}).get("winner", "single")


def chosen_cap_draws(w: Workdir) -> int | None:
    """The draws at the cap the rule was chosen with (``rules.json``), None if it records none."""
    return (read_json(w.path("rules.json")) or {}).get("cap_draws")


@dataclass(frozen=True, kw_only=True)
class CalibrateSettings:
    """The settings of the ``calibrate`` stage (``rrise calibrate``'s options), each defaulting to the
    profile's or the folder's: ``alpha``/``beta`` (the profile's), ``delta`` (a training-conditional,
    PAC, quantile; None: marginal), ``score`` (probit, logit, identity), ``rule`` (the one the
    selection split chose), ``bins`` (overrides the rule's number of confidence bins),
    ``cap_draws`` (second-stage draws at the cap; 0 = off; by default those the rule was chosen
    with, else the profile's), ``clip_at_abstention`` (scores clipped at each input's abstention
    threshold: :class:`rrise.CalibrationSpec`)."""

    alpha: float | None = None
    beta: float | None = None
    delta: float | None = None
    score: str = "probit"
    bins: int | None = None
    rule: str | None = None
    cap_draws: int | None = None
    clip_at_abstention: bool = True


def rule_spec(
    w: Workdir,
    rule_name: str,
    levels: CalibrateSettings,
    *,
    m: int,
    selection: dict[str, np.ndarray] | None = None,
) -> CalibrationSpec:
    """The spec of rule ``rule_name`` at ``levels`` (its ``alpha``, ``beta``, ``delta``, ``score``;
    ``bins`` overrides the rule's number of confidence bins), its choices (bin edges, score map)
    fitted on the selection split for ``m`` calibration inputs."""
    rule = get_rule(rule_name)
    if levels.bins is not None:
        rule = replace(rule, bins=levels.bins)
    if rule.map_tau is not None and levels.score != "probit":
        raise ValueError(
            f"rule {rule.name!r} learns a probit score map; it cannot use score {levels.score!r}"
        )
    selection = selection_data(w) if selection is None else selection
    return fit_rule(
        rule,
        selection.get("probs", selection["bin_probs"]),
        selection.get("counts"),
        m=m,
        bin_probs=selection["bin_probs"],
        sigma=w.config.sigma,
        n_mc=w.prof.n_cal,
        alpha=w.prof.alphas[0] if levels.alpha is None else levels.alpha,
        beta=w.prof.beta if levels.beta is None else levels.beta,
        delta=levels.delta,
        score=levels.score,
        clip_at_abstention=levels.clip_at_abstention,
    )


def model_hashes(w: Workdir) -> dict[str, str | None]:
    """sha256 of the work folder's ``base.onnx`` and ``surrogate.onnx``, as calibration records keep them."""
    return {
        "base_sha256": file_sha256(w.path("base.onnx")),
        "surrogate_sha256": file_sha256(w.path("surrogate.onnx")),
    }


def stage_calibrate(w: Workdir, resume: bool = True, **settings: Any) -> list[Path]:
    """Fresh MC on the held-out calibration inputs, then the split-conformal quantile q̂.

    ``settings``: :class:`CalibrateSettings` by name (``alpha``, ``beta``, ``delta``, ``score``,
    ``rule``, ``bins``, ``cap_draws``, ``clip_at_abstention``). The MC counts are kept, so a
    re-calibration with other settings costs one surrogate pass.
    """
    s = CalibrateSettings(**settings)
    ds, p = w.data("train"), w.prof
    idx = w.splits()["calibration"]
    hashes = model_hashes(w)  # before reading the models: a model changed meanwhile shows as stale
    # MC is the expensive half: its store is kept (and resumed) across re-calibrations
    fill_count_store(w, CALIBRATION_STORE, idx, p.n_cal, "calibration", "train", resume)
    index, counts = load_store_counts(w, CALIBRATION_STORE)
    n2 = _cap_draws(w, chosen_cap_draws(w) if s.cap_draws is None else s.cap_draws)
    cap_counts = cap_stage_counts(w, index, counts, n2, resume) if n2 else None
    probs = surrogate_probs(w.path("surrogate.onnx"), ds.images[index])
    rule = s.rule or chosen_rule(w)
    spec = replace(rule_spec(w, rule, s, m=len(index)), cap_draws=n2 or None)
    cal = conformalize(spec, probs, counts, cap_counts=cap_counts, dataset=w.config.dataset, **hashes)
    arrays = {"index": index, "images": ds.images[index], "labels": ds.labels[index]}
    if cap_counts is not None:
        arrays.update(cap_counts=cap_counts, cap_draws=n2)
    save_npz(w.path("calibration.npz"), **arrays, counts=counts, probs=probs, n_mc=p.n_cal)
    atomic_write_json(w.path("calibration.json"), {**cal.to_dict(), "rule": rule})
    return [w.path("calibration.npz"), w.path("calibration.json")]


def _cap_draws(w: Workdir, cap_draws: int | None) -> int:
    """The second-stage draws at the cap (the profile's unless given; 0 = off), checked."""
    p = w.prof
    n2 = p.cap_draws if cap_draws is None else int(cap_draws)
    if n2 and n2 <= p.n_cal:
        raise ValueError(f"cap_draws ({n2}) must exceed the profile's N_cal ({p.n_cal}), or be 0 (off)")
    return n2


# Each store of second-stage draws has its own seed stream, independent of every first stage.
_CAP_STREAMS = {CAP_STORE: "cap", RULE_CAP_STORE: "rules-cap"}


def cap_stage_counts(
    w: Workdir, index: np.ndarray, counts: np.ndarray, n2: int, resume: bool, store: str = CAP_STORE
) -> np.ndarray:
    """Second-stage counts at the cap, aligned with ``index``: ``n2`` fresh draws (their own seed
    stream, so independent of the first stage) on every input of ``index`` (calibration inputs, or
    with ``store=RULE_CAP_STORE`` the rule-selection ones) whose N_cal draws all fell on one class,
    zeros elsewhere. Which inputs get them depends on the counts alone, never on the surrogate, so
    the store stays valid for every surrogate and precision variant."""
    at_cap = counts.max(axis=1) == w.prof.n_cal
    out = np.zeros_like(counts)
    if not at_cap.any():
        return out
    fill_count_store(w, store, index[at_cap], n2, _CAP_STREAMS[store], "train", resume)
    index2, counts2 = load_store_counts(w, store)
    row = {int(i): r for r, i in enumerate(index)}
    out[[row[int(i)] for i in index2]] = counts2
    return out


def load_calibration(w: Workdir) -> tuple[Calibration, dict[str, Any]]:
    """``(Calibration, record)`` of ``calibration.json``, refused (naming the model) unless it was
    made with the work folder's ``base.onnx`` and ``surrogate.onnx``."""
    record = read_json(w.path("calibration.json"))
    if record is None:
        raise StageNotReady(f"no calibration.json in {w.root}: run `rrise calibrate` first", *_CAL)
    cal = Calibration.from_dict(record)
    for key, have in model_hashes(w).items():
        made = getattr(cal, key)
        model = "base.onnx" if key == "base_sha256" else "surrogate.onnx"
        if made is None:
            raise StageNotReady(
                f"calibration.json records no {key} (made by an older rrise): run `rrise calibrate` first",
                *_CAL,
            )
        if made != have:
            raise StageNotReady(
                f"calibration.json was made with another {model} ({key} {made[:12]}…, the work folder's "
                f"is {str(have)[:12]}…): run `rrise calibrate` first",
                *_CAL,
            )
    return cal, record


_CAL = ("calibrate", "rrise calibrate")


def load_calibration_npz(w: Workdir) -> dict[str, np.ndarray]:
    """The arrays of ``calibration.npz`` (read without unpickling)."""
    return load_npz(w.path("calibration.npz"), CALIBRATION_NPZ_KEYS, "calibration file")
