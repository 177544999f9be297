"""The out-of-distribution features and score written the plain way (numpy on whole arrays), as
an oracle for the per-frame paths of :mod:`rrise.ood` (:func:`rrise.ood.frame_features`, the
scorer's batch and one-frame paths), which compute the same quantities with fewer numpy calls."""

from __future__ import annotations

import numpy as np

from rrise.ood import FEATURES, _grid_step

# feature = log(raw) @ LOG_MAP (+ the mean, not logged). Raw columns:
# 0 std + 1/255, 1-3 high/low/mid fractions + 1/n, 4-6 their complements + 1/n,
# 7 ex + ey + 1e-4, 8 2·var + 1e-4, 9 border mean + 1/255, 10 ex + 1e-4, 11 ey + 1e-4,
# 12 vy + 1, 13 vx + 1, 14 −log ŝ + 1e-4.
LOG_MAP = np.zeros((15, len(FEATURES)))
for _feature, _terms in enumerate(
    [{}, {0: 1}, {1: 1, 4: -1}, {2: 1, 5: -1}, {3: 1, 6: -1}, {7: 1}, {7: 1, 8: -1}, {9: 1}]
    + [{10: 1, 11: -1}, {12: 1, 13: -1}, {14: 1}]
):
    for _raw, _sign in _terms.items():
        LOG_MAP[_raw, _feature] = _sign


def moments(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variance of the brightness's row and column positions (pixels²) of ``img`` [B, H, W]."""
    out = []
    for profile in (img.sum(axis=2, dtype=np.float64), img.sum(axis=1, dtype=np.float64)):
        pos = np.arange(profile.shape[1], dtype=np.float64)
        m = profile @ np.stack([np.ones_like(pos), pos, pos * pos], axis=1)
        mass = m[:, 0] + 1e-9
        out.append(np.maximum(m[:, 2] / mass - np.square(m[:, 1] / mass), 0.0))
    return out[0], out[1]


def gradient_energy(x: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared difference of neighbouring pixels along width and height (pairs on the grid;
    float32 differences, float64 squares)."""
    b, _, h, w = x.shape
    rows, cols = x[:, :, ::s], x[..., ::s]
    dx = rows[..., 1::s] - rows[..., : w - 1 : s]
    dy = cols[:, :, 1::s] - cols[:, :, : h - 1 : s]
    ex = (dx.astype(np.float64) ** 2).reshape(b, -1).mean(axis=1) if w > 1 else np.zeros(b)
    ey = (dy.astype(np.float64) ** 2).reshape(b, -1).mean(axis=1) if h > 1 else np.zeros(b)
    return ex, ey


def frame_features(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    full = np.asarray(x, dtype=np.float32)
    p = np.asarray(probs, dtype=np.float64)
    s = _grid_step(*full.shape[2:])
    x = full[:, :, ::s, ::s] if s > 1 else full
    b, c, h, w = x.shape
    n = c * h * w
    flat = x.reshape(b, n)
    total = flat.sum(axis=1, dtype=np.float64)
    mean = total / n
    var = np.maximum((flat.astype(np.float64) ** 2).sum(axis=1) / n - mean * mean, 0.0)
    bw = max(1, min(h, w) // 14)
    inner = x[:, :, bw : h - bw, bw : w - bw]
    ex, ey = gradient_energy(full, s)
    vy, vx = moments(x.sum(axis=1, dtype=np.float64))
    raw = np.empty((b, 15))
    raw[:, 0] = np.sqrt(var) + 1 / 255
    raw[:, 1] = (flat >= 254.5 / 255).sum(axis=1)
    raw[:, 2] = (flat <= 0.5 / 255).sum(axis=1)
    raw[:, 3] = n - raw[:, 1] - raw[:, 2]
    raw[:, 4:7] = n - raw[:, 1:4]
    raw[:, 1:7] = (raw[:, 1:7] + 1) / n
    raw[:, 7], raw[:, 8] = ex + ey + 1e-4, 2 * var + 1e-4
    raw[:, 9] = (total - inner.sum(axis=(1, 2, 3), dtype=np.float64)) / max(n - inner[0].size, 1) + 1 / 255
    raw[:, 10], raw[:, 11], raw[:, 12], raw[:, 13] = ex + 1e-4, ey + 1e-4, vy + 1, vx + 1
    raw[:, 14] = 1e-4 - np.log(np.clip(p.max(axis=1), 1e-12, 1.0))
    feats = np.log(raw) @ LOG_MAP
    feats[:, 0] = mean
    if c == 3:
        feats = np.concatenate([feats, x.mean(axis=(2, 3), dtype=np.float64) - mean[:, None]], axis=1)
    return feats


def geometry(g: np.ndarray, classes: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """[B, 2] template distance and orientation gain of block sums ``g`` [B, C, h, w], moving each
    frame explicitly (every rotation, flip and shift of :func:`rrise.ood._moved_index`)."""
    from rrise.ood import TEMPLATE_EPS, _moved_index

    flat = g.reshape(len(g), -1).astype(np.float64)
    moved = flat[:, _moved_index(*g.shape[1:])]  # [B, V, n]
    centred = moved - moved.mean(axis=2, keepdims=True)
    norm = np.sqrt((centred**2).sum(axis=2, keepdims=True))
    # templates have mean 0 (up to their stored rounding): the dot product with the frame itself
    dots = moved @ np.asarray(templates, np.float64).T
    rho = np.where(norm > 1e-9, dots / np.maximum(norm, 1e-300), 0.0)
    here = rho[:, 0]
    distance = np.log(np.maximum(1.0 + TEMPLATE_EPS - here[np.arange(len(g)), classes], TEMPLATE_EPS))
    return np.stack([distance, rho[:, 1:].max(axis=(1, 2)) - here.max(axis=1)], axis=1)


def scores(
    x: np.ndarray,
    p: np.ndarray,
    centre: np.ndarray,
    scale: np.ndarray,
    templates: np.ndarray | None = None,
    norms: np.ndarray | None = None,
) -> np.ndarray:
    """[B] scores of an entry (``centre``/``scale`` rows in the order of feature_names; version 2
    with ``templates``, as the scorer holds them, and ``norms``): every frame's features and
    geometry, its z-scores against its predicted class's row, the largest |z| of the image
    statistics and the geometry's largest z (the gain's one-sided), each over its norm; NaN as
    infinitely unusual."""
    from rrise.ood import FEATURES, GEOMETRY, _block_means

    p = np.asarray(p, dtype=np.float64)
    classes = p.argmax(axis=1)
    rows = classes if len(centre) > 1 else np.zeros(len(p), dtype=np.int64)
    k, d = len(FEATURES), centre.shape[1]
    geo = np.arange(k, k + len(GEOMETRY)) if templates is not None else np.arange(0)
    stat = np.setdiff1d(np.arange(d), geo)
    z = np.abs(frame_features(x, p) - centre[rows][:, stat]) / scale[rows][:, stat]
    s = z.max(axis=1)
    if templates is not None:
        zg = (geometry(_block_means(x), classes, templates) - centre[rows][:, geo]) / scale[rows][:, geo]
        s = np.maximum(s / norms[0], np.maximum(np.abs(zg[:, 0]), zg[:, 1]) / norms[1])
    return np.where(np.isnan(s), np.inf, s)
