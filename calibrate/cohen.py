"""Cohen's Monte Carlo baseline (`rrise certify`): CERTIFY with the base model on the test inputs.

Writes ``certify.npz`` (per input: prediction, radius, p̲, both count vectors, seconds) and
``certify.tsv`` (Cohen et al.'s per-input log plus the counts behind each certificate).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rrise.fileio import atomic_write_text, save_npz
from rrise.progress import progress_bar
from rrise.stats import clopper_pearson_lower, norm_ppf

from .counts import prepare_base_model
from .mc import certify
from .workdir import Workdir

__all__ = ["COHEN_NPZ", "COHEN_TSV", "cohen_from_counts", "stage_cohen"]

COHEN_NPZ, COHEN_TSV = "certify.npz", "certify.tsv"  # names kept: work folders resume across versions


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _certify_in_pieces(w: Workdir, images: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Cohen CERTIFY on ``images`` in pieces that share forward batches, timing each piece.

    Input i's draws depend only on (seed, i), so the pieces give the same certificates as one call.
    """
    p = w.prof
    model, label = prepare_base_model(w, "auto", _device(), images[:1], len(images) * (p.n0 + p.n))
    piece = max(1, min(len(images), p.batch_size // 10 or 1))
    parts, per_input = [], np.zeros(len(images))
    with progress_bar(len(images), "Cohen CERTIFY", "inputs", enabled=w.show_progress) as bar:
        bar.note(f"backend {label}")
        for lo in range(0, len(images), piece):
            hi = min(lo + piece, len(images))
            t0 = time.perf_counter()
            parts.append(
                certify(
                    model,
                    images[lo:hi],
                    n0=p.n0,
                    n=p.n,
                    sigma=w.config.sigma,
                    alpha=p.mc_alpha,
                    batch_size=p.batch_size,
                    num_classes=num_classes,
                    seed=w.seed("cohen"),
                    index_offset=lo,
                )
            )
            per_input[lo:hi] = (time.perf_counter() - t0) / (hi - lo)
            bar.advance(hi - lo)
    fields = ("pred", "radius", "p_lower", "counts_estimation", "counts_selection")
    out = {f: np.concatenate([getattr(r, f) for r in parts]) for f in fields}
    out["time"] = per_input
    return out


def cohen_from_counts(
    counts_selection: np.ndarray, counts: np.ndarray, *, sigma: float, alpha: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen's CERTIFY at level ``alpha`` from stored draws: ``(pred with -1 = abstain, radius, p̲)``.

    ``Â`` = argmax of the selection counts, ``p̲ = clopper_pearson_lower(k_Â, n, α)`` on the estimation
    counts (``n`` = their row sum), abstain unless ``p̲ > 1/2``. The same draws at another ``α`` keep
    Cohen's per-input guarantee at that level: with probability ≥ 1 − α, ``p_Â(x) ≥ p̲``, so ``g`` is
    constant on the ball of radius ``σ·Φ⁻¹(p̲)``. It lets a report set Cohen beside RRISE at the same α.
    """
    sel, est = np.asarray(counts_selection), np.asarray(counts)
    top = sel.argmax(axis=1)
    n = est.sum(axis=1)
    k = est[np.arange(len(est)), top]
    p_lower = np.atleast_1d(np.asarray(clopper_pearson_lower(k, n, alpha), dtype=np.float64))
    certified = p_lower > 0.5
    radius = np.where(certified, sigma * np.asarray(norm_ppf(np.where(certified, p_lower, 0.5))), 0.0)
    return np.where(certified, top, -1).astype(np.int64), radius.astype(np.float64), p_lower


def _tsv(index: np.ndarray, labels: np.ndarray, r: dict[str, np.ndarray], n: int) -> str:
    """Per-input table as in Cohen et al.'s logs, plus the counts behind each certificate: ``count``
    is k (votes for the selected class among the n estimation draws), ``counts`` the full vector."""
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\tcount\tn\tp_lower\tcounts\ttime"]
    counts, top = r["counts_estimation"], r["counts_selection"].argmax(axis=1)
    for j, (i, lab, pr, rad) in enumerate(zip(index, labels, r["pred"], r["radius"])):
        vec = ",".join(str(int(c)) for c in counts[j])
        lines.append(
            f"{i}\t{lab}\t{pr}\t{rad:.4f}\t{int(pr == lab)}\t{int(counts[j, top[j]])}\t{n}"
            f"\t{r['p_lower'][j]:.6f}\t{vec}\t{r['time'][j]:.4f}"
        )
    return "\n".join(lines) + "\n"


def stage_cohen(w: Workdir) -> list[Path]:
    """Cohen's Monte Carlo baseline: CERTIFY with the base model on the test inputs."""
    ds = w.data("test")
    idx = w.splits()["test"]
    labels = ds.labels[idx]
    r = _certify_in_pieces(w, ds.images[idx], len(ds.classes))
    save_npz(
        w.path(COHEN_NPZ),
        index=idx,
        labels=labels,
        pred=r["pred"],
        radius=r["radius"],
        p_lower=r["p_lower"],
        counts=r["counts_estimation"],
        counts_selection=r["counts_selection"],
        seconds=float(r["time"].sum()),
        time=r["time"],
    )
    atomic_write_text(w.path(COHEN_TSV), _tsv(idx, labels, r, w.prof.n))
    return [w.path(COHEN_TSV), w.path(COHEN_NPZ)]
