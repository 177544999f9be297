"""Small numeric kernels shared by every stage (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MICRO_BATCH_LIMIT", "noisy_votes", "softmax", "to_probs"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis in float64, shifted by the row maximum (never overflows).

    Works on a private float64 copy in place: one allocation, which matters on the per-frame path.
    """
    z = np.array(logits, dtype=np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def to_probs(out: np.ndarray, output_kind: str) -> np.ndarray:
    """A model's ``[B, K]`` output as float64 probabilities: softmax of ``logits``, ``probs`` as they are."""
    out = np.asarray(out)
    if out.ndim != 2:
        out = out.reshape(out.shape[0], -1)
    if output_kind == "logits":
        return softmax(out)
    if output_kind == "probs":
        return out.astype(np.float64, copy=False)
    raise ValueError(f"model output kind must be 'logits' or 'probs', got {output_kind!r}")


# The largest micro-batch the runtime hands a backend at once. A variant's quantile holds for the
# batch sizes its outputs were checked at (the variant's ``max_batch``, at most this).
MICRO_BATCH_LIMIT = 16


def noisy_votes(classify: Any, x: np.ndarray, top_class: int, sigma: float, m: int, rng: Any) -> int:
    """How many of ``m`` noisy copies ``x + σ·ε`` (ε standard normal float32 from ``rng``, in the
    model input's [0, 1] units) ``classify`` (``[m, C, H, W]`` → class indices) puts in ``top_class``:
    one batch of Monte Carlo votes, shared by the runtime's adaptive certifier and ``--verify``."""
    noisy = rng.standard_normal((m, *x.shape), dtype=np.float32)
    noisy *= np.float32(sigma)
    noisy += x
    return int(np.count_nonzero(np.asarray(classify(noisy)) == top_class))
