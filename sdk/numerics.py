"""Small numeric kernels shared by every stage (numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["MICRO_BATCH_LIMIT", "softmax", "to_probs"]


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
