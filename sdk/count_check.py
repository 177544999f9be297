"""Bind σ and the calibration counts to the base model: a Monte Carlo spot-check for ``rrise inspect
--verify``.

A recomputed quantile (:func:`rrise.recalibration.verify_quantiles`) only shows that the recorded
q̂ follows from the stored count vectors; it says nothing about whether those counts are what the
base model gives at the manifest's σ. Here a seeded sample of the calibration inputs gets fresh
draws through the bundle's base model (opened from checked bytes) with numpy noise at σ, and each
input's top-class share is compared with its stored count by Fisher's exact test (two-sided);
the bundle fails when any p-value falls under ``level / inputs`` (Bonferroni), so a sound bundle is
refused with probability at most ``level``. A doubled σ, counts copied from another model or forged
counts shift the shares far beyond what the test lets through.

numpy and onnxruntime only (:mod:`rrise.onnx_session`): no torch, so it runs next to the bundle.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import Bundle
from .numerics import noisy_votes
from .onnx_session import open_session

__all__ = ["SpotCheckOptions", "fisher_exact_two_sided", "noisy_top_counts", "spot_check_counts"]


@dataclass(frozen=True)
class SpotCheckOptions:
    """How many calibration ``inputs`` get ``draws`` fresh draws each, the total false-alarm
    ``level`` (split over the inputs by Bonferroni), and the ``seed`` that picks the inputs and
    draws the noise (None: a fresh one from the operating system, reported with the result so a
    failure can be reproduced; unpredictable, so a bundle cannot be tuned, by its id or its files,
    until the sample misses the inputs whose counts were forged)."""

    inputs: int = 16
    draws: int = 256
    level: float = 1e-3
    batch: int = 256
    seed: int | None = None


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_exact_two_sided(a: int, n1: int, b: int, n2: int) -> float:
    """Fisher's exact two-sided p-value that ``a`` successes in ``n1`` trials and ``b`` in ``n2``
    come from one success rate: the hypergeometric probability of every table, with the margins
    fixed, no more likely than the observed one.

    >>> round(fisher_exact_two_sided(5, 10, 5, 10), 6)
    1.0
    >>> fisher_exact_two_sided(0, 100, 100, 100) < 1e-50
    True
    """
    total, successes = n1 + n2, a + b
    lo, hi = max(0, successes - n1), min(n2, successes)
    support = np.arange(lo, hi + 1)
    log_pmf = np.array([_log_choose(n2, j) + _log_choose(n1, successes - j) for j in support]) - _log_choose(
        total, successes
    )
    observed = log_pmf[b - lo]
    p = float(np.exp(log_pmf[log_pmf <= observed + 1e-7]).sum())
    return min(1.0, p)


def noisy_top_counts(
    run: Any, images: np.ndarray, classes: np.ndarray, sigma: float, draws: int, seed: int, batch: int = 256
) -> np.ndarray:
    """For each image, how many of ``draws`` noisy copies ``x + σ·ε`` (ε standard normal, numpy,
    seeded by ``seed``) ``run`` (``[B, C, H, W]`` float32 → ``[B, K]`` scores) puts in that image's
    entry of ``classes``."""
    rng = np.random.default_rng(seed)
    hits = np.zeros(len(images), dtype=np.int64)
    for i, (x, c) in enumerate(zip(images, classes)):
        done = 0
        while done < draws:
            rows = min(batch, draws - done)
            hits[i] += noisy_votes(lambda b: np.asarray(run(b)).argmax(axis=1), x, c, sigma, rows, rng)
            done += rows
    return hits


def _base_runner(session: Any) -> Any:
    """``[B, C, H, W] → [B, K]`` through the base model's session, in chunks of its batch size
    when the model fixes one (the last chunk padded with copies of its last row)."""
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None

    def once(x: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {inp.name: x})[0]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeError(f"the base model does not run on noisy calibration inputs: {exc}") from None

    def run(x: np.ndarray) -> np.ndarray:
        if fixed is None:
            return once(x)
        outs = []
        for start in range(0, len(x), fixed):
            part = x[start : start + fixed]
            pad = fixed - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            outs.append(once(part)[: fixed - pad])
        return np.concatenate(outs)

    return run


def fresh_seed() -> int:
    """A seed no one could have searched for: from the operating system, printed with the result."""
    return secrets.randbits(62)


def spot_check_counts(
    bundle: Bundle, counts: np.ndarray, images: np.ndarray, options: SpotCheckOptions | None = None
) -> dict[str, Any]:
    """Fresh draws through the base model at the manifest's σ on a seeded sample of the calibration
    inputs, against the stored ``counts`` ``[m, K]`` of those ``images``.

    Returns ``status`` (``ok`` or ``mismatch``), ``inputs``, ``draws``, ``level``, ``sigma``, ``seed``,
    ``min_p`` (the smallest per-input p-value), ``threshold`` (``level / inputs``), ``worst``
    (that input's index, stored share and fresh share), ``seconds`` and ``detail``."""
    opts = options or SpotCheckOptions()
    m = bundle.manifest
    sigma = float(m["smoothing"]["sigma"])
    seed = fresh_seed() if opts.seed is None else int(opts.seed)
    chosen = np.sort(np.random.default_rng(seed).choice(len(counts), min(opts.inputs, len(counts)), False))
    classes = counts[chosen].argmax(axis=1)
    base = m["base_model"]
    run = _base_runner(
        open_session(bundle.read_verified(base["file"], base.get("sha256")), "onnxruntime-cpu")
    )
    start = time.perf_counter()
    fresh = noisy_top_counts(run, images[chosen], classes, sigma, opts.draws, seed + 1, opts.batch)
    n_mc = int(counts[0].sum()) if len(counts) else 0
    stored = counts[chosen, classes]
    p = np.array([fisher_exact_two_sided(int(a), n_mc, int(b), opts.draws) for a, b in zip(stored, fresh)])
    worst = int(p.argmin()) if p.size else 0
    threshold = opts.level / max(1, len(chosen))
    out: dict[str, Any] = {
        "inputs": len(chosen),
        "draws": opts.draws,
        "level": opts.level,
        "sigma": sigma,
        "seed": seed,
        "min_p": float(p.min()) if p.size else 1.0,
        "threshold": threshold,
        "seconds": time.perf_counter() - start,
        "worst": None,
        "detail": None,
    }
    if p.size:
        i = int(chosen[worst])
        out["worst"] = {
            "input": i,
            "stored_share": float(stored[worst]) / n_mc,
            "fresh_share": float(fresh[worst]) / opts.draws,
        }
    if p.size and p[worst] < threshold:
        w = out["worst"]
        out["detail"] = (
            f"calibration input {w['input']}: class {int(classes[worst])} holds {w['stored_share']:.3f} of "
            f"the stored {n_mc} draws but {w['fresh_share']:.3f} of {opts.draws} fresh draws at "
            f"sigma = {sigma:g} (Fisher p = {p[worst]:.2g} < {threshold:.2g}, {len(chosen)} inputs, "
            f"level {opts.level:g}, seed {seed})"
        )
        return {**out, "status": "mismatch"}
    return {**out, "status": "ok"}
