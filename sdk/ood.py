"""Per-frame out-of-distribution flag: a conformal p-value of "this frame looks like calibration".

The certificate (docs/CERTIFICATE.md) holds for deployed inputs exchangeable with the calibration
inputs. A white, blank, noise or checkerboard frame is not, yet the surrogate may call it "Bag" with
the largest radius. This module gives every frame a p-value that is small for such frames and valid
for clean ones. numpy only.

Score (version 1, fixed in this code, not fitted to the reference): a vector of simple statistics
of the model input ``x`` ∈ [0, 1]^{C×H×W} and of the surrogate's probabilities (:data:`FEATURES`:
mean, spread, saturated fractions, high-frequency energy, roughness, border brightness,
anisotropy, elongation, surprise −log ŝ, and per-channel colour cast for C = 3), each turned
into a robust z-score against the centre and scale of the predicted class (shrunk towards the
global ones), and the score is the largest |z|.

Reference (``ood_reference``, stored as ``variants[i].monitor.ood``): the calibration inputs the
bundle already carries, with the variant's own probabilities on them, split by position: every
:data:`FIT_EVERY`-th input fits the centres and scales, the others are the reference sample whose
sorted scores are stored. The split does not look at the data, so the reference stays exchangeable
with a deployed frame and independent of the fitted score.

Geometry (version 2): the statistics above are blind to where the mass of the image lies, so a
rotated, flipped, shifted or tiled frame passes them. Version 2 reduces the model input to block
means (at most :data:`TEMPLATE_SIDE` pixels a side), standardizes it (mean 0, norm 1) and compares
it with the *templates*, the standardized mean of the fit part's reduced inputs per predicted class
(the global mean where a class has fewer than two), stored in the entry (``templates``, K rows of
C·h·w numbers rounded to :data:`TEMPLATE_DECIMALS` decimals; ``template_shape`` [C, h, w]). Two
features (:data:`GEOMETRY`): ``template_distance`` ``log(1 + eps − ρ)``, ρ the correlation with the
predicted class's template; ``orientation_gain``, how much better the best-fitting template fits
once the frame is rotated, flipped or shifted by a fifth of a side than as it is (one-sided: a
clean frame sits the way the calibration inputs do, so moving it rarely helps; a rotated one fits
better rotated back). Their centre and scale are global, not per class. The score is the larger of
the two groups' largest z (image statistics; geometry), each divided by its largest value on the
fit part (``norms``), so that neither group's tail drowns the other's. A version-1 entry (no
templates) keeps being read with the version-1 score. Cost per frame: block sums by strided adds,
then two small products (every moved copy's dot product with every template and its moments are
linear in the block sums, :func:`_moved_maps`); on a 28×28 input about 8 µs per frame more than
version 1 in batches of 32, about 25 µs more for a frame alone (numpy's per-call overhead).

Cost: a frame alone (a batch of one, the runtime's usual case) takes its own path,
:meth:`OodTest.p_values` → :meth:`_Scorer.one_score`: the same features and score, with the pixel
reductions as matrix-vector products and whole-array reductions (:func:`_pixel_reductions`),
everything that depends only on the entry or on the input shape prepared once (:func:`_plan`, the
moved maps, the centres and scales as Python floats, the reference as a list) and the few dozen
scalars combined in Python floats, where numpy's overhead per call would dominate. It agrees with
the batched path to float64 rounding (about 1e-15 relative: BLAS sums in an order that depends on
the batch size, as it always has). Version 2, per frame, on a 2-core x86 CPU shared with other work
(so best read as ratios): a 28×28 grey input about 55 µs alone (the batched path takes 1.8 times
as long on one frame) and 16 µs in batches of 32; a 3×64×64 input about 120 µs alone (1.7 times)
and 85 µs in batches of 32.

p-value: ``p = (1 + #{reference scores ≥ s}) / (n_ref + 1)``. Why it is valid: everything the
score depends on (centres, scales, templates and norms) is computed from the fit part alone, chosen by
position, so given the fit part the score is a fixed function, and the reference inputs and a
clean deployed frame are exchangeable (the certificate's own premise); their scores are then
exchangeable too, and the rank of the frame's score among them is uniform, so ``P(p ≤ a) ≤ a``
for every ``a``: a clean frame is flagged at rate at most ``a``, marginally over the reference and
the frame. The smallest p-value is ``1 / (n_ref + 1)``, so a rate below that flags nothing.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_OOD_RATE",
    "FEATURES",
    "GEOMETRY",
    "OOD_VERSION",
    "OodTest",
    "check_rate",
    "combine_alarms",
    "feature_names",
    "frame_features",
    "ood_reference",
    "p_values",
    "geometry_features",
    "template_shape",
]

log = logging.getLogger("rrise.ood")

OOD_VERSION = 2
OOD_VERSIONS = (1, 2)  # version 1: no templates, read with the version-1 score
TEMPLATE_SIDE = 16  # templates are at most this many pixels a side
TEMPLATE_EPS = 1e-3  # keeps the log of 1 − ρ finite for a frame equal to its template
TEMPLATE_DECIMALS = 4  # stored templates are rounded; the reference is scored with the rounded ones
SHIFT_FRACTION = 0.2  # the shifts orientation_gain tries, as a fraction of a side
NORM_FLOOR = 1e-3
DEFAULT_OOD_RATE = 1e-3
FIT_EVERY = 5  # calibration inputs 0, 5, 10, … fit the score; the others are the reference
SHRINK = 10.0  # pseudo-count pulling a class's centre and scale towards the global ones
MIN_PER_CLASS = 5  # class-wise centres only when the fit part has this many inputs per class
MIN_REFERENCE = 19  # p can reach 0.05
SCALE_FLOOR = 1e-3
GRID = 112  # features read about GRID × GRID pixels of a larger input
HIGH, LOW = 254.5 / 255, 0.5 / 255  # a pixel at least HIGH is saturated high, at most LOW low
_IQR80 = 2.5631031310892007  # q90 − q10 of a standard normal
FEATURES = (
    "mean",
    "log_std",
    "saturated_high",
    "saturated_low",
    "midtones",
    "log_high_freq",
    "roughness",
    "log_border",
    "anisotropy",
    "elongation",
    "log_surprise",
)
GEOMETRY = ("template_distance", "orientation_gain")
CHROMA = ("chroma_0", "chroma_1", "chroma_2")
SCORE_TEXT_V1 = (
    "max over features of |feature - centre of the predicted class| / scale of that class; "
    "features: statistics of the model input and -log of the top-class probability"
)
SCORE_TEXT = (
    "max over two groups of (max over the group's features of |feature - centre| / scale) / the "
    "group's norm; group 1: statistics of the model input and -log of the top-class probability, "
    "centred on the predicted class; group 2 (global centres, orientation_gain one-sided): the "
    "distance to the predicted class's template and the gain in template fit from rotating, "
    "flipping or shifting the frame"
)
FIT_TEXT = (
    f"calibration inputs at positions divisible by {FIT_EVERY} fit centres, scales and templates; "
    "the others are the reference sample"
)


def feature_names(channels: int, version: int = OOD_VERSION) -> tuple[str, ...]:
    """The feature names of a ``channels``-channel model input (colour cast only for C = 3; the
    template distance from version 2 on)."""
    geometry = GEOMETRY if version >= 2 else ()
    return FEATURES + geometry + (CHROMA if channels == 3 else ())


def _grid_step(h: int, w: int) -> int:
    """The stride at which inputs of 224 pixels a side and more are read."""
    return max(1, min(h, w) // GRID)


def _block(h: int, w: int) -> tuple[int, int]:
    """The block (rows, columns) averaged into one template pixel of an ``h`` × ``w`` input read
    on the grid: the smallest one that leaves at most :data:`TEMPLATE_SIDE` pixels a side."""
    f = max(1, -(-max(h, w) // TEMPLATE_SIDE))
    return min(f, h), min(f, w)


def template_shape(channels: int, height: int, width: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the templates of a ``channels`` × ``height`` × ``width`` model input."""
    s = _grid_step(height, width)
    h, w = -(-height // s), -(-width // s)
    bh, bw = _block(h, w)
    return channels, h // bh, w // bw


_template_shape = functools.lru_cache(maxsize=16)(template_shape)


def _block_means(x: np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` → ``[B, C, h, w]`` float32: block sums of the input read on the grid (the
    block means times the block size: the same correlations)."""
    plan = _plan(*x.shape[1:])
    s = plan.step
    g = np.asarray(x[:, :, ::s, ::s] if s > 1 else x, dtype=np.float32)
    bh, bw, h, w = plan.block
    if g.shape[2:] != (h, w):
        g = g[:, :, :h, :w]
    if bh > 1:  # strided adds, in this order: far faster than a sum over reshaped axes
        rows = g[:, :, 0::bh] + g[:, :, 1::bh]
        for i in range(2, bh):
            rows += g[:, :, i::bh]
        g = rows
    if bw > 1:
        out = g[..., 0::bw] + g[..., 1::bw]
        for j in range(2, bw):
            out += g[..., j::bw]
        g = out
    return g


def _standardized(flat: np.ndarray) -> np.ndarray:
    """Rows ``[..., n]`` to mean 0 and norm 1 (a flat row stays all zeros), float64."""
    out = flat.astype(np.float64)
    out -= out.mean(axis=-1, keepdims=True)
    norm = np.sqrt(np.einsum("...i,...i->...", out, out))
    return out / np.where(norm > 1e-9, norm, 1.0)[..., None]


@functools.lru_cache(maxsize=16)
def _moved_index(c: int, h: int, w: int) -> np.ndarray:
    """``[V, C·h·w]`` gathers of a flattened ``[C, h, w]`` image: itself (row 0), rotated by 180°
    (and by ±90° when square), flipped either way, and shifted by about a fifth of a side each way
    (edges repeated)."""
    base = np.arange(c * h * w).reshape(c, h, w)
    moved = [base, base[:, ::-1, ::-1], base[:, :, ::-1], base[:, ::-1, :]]
    if h == w:
        moved += [np.rot90(base, 1, axes=(1, 2)), np.rot90(base, 3, axes=(1, 2))]
    dy, dx = max(1, round(h * SHIFT_FRACTION)), max(1, round(w * SHIFT_FRACTION))
    rows, cols = np.arange(h), np.arange(w)
    if h > dy and w > dx:
        for sy, sx in ((0, dx), (0, -dx), (dy, 0), (-dy, 0)):
            moved.append(base[:, np.clip(rows - sy, 0, h - 1)][:, :, np.clip(cols - sx, 0, w - 1)])
    return np.stack([m.reshape(-1) for m in moved])


def _templates(x: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, C·h·w]`` standardized class-mean images of ``x``'s standardized block means, rounded
    as stored; the global mean for a class with fewer than two inputs."""
    r = _standardized(_block_means(x).reshape(len(x), -1))
    out = np.repeat(r.mean(axis=0)[None], num_classes, 0)
    for k in range(num_classes):
        own = r[classes == k]
        if len(own) >= 2:
            out[k] = own.mean(axis=0)
    return np.round(_standardized(out), TEMPLATE_DECIMALS)


def _moved_maps(templates: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For a ``shape`` [C, h, w] reduced image ``g`` (flattened, n pixels): ``linear`` [n, V + V·K]
    with ``g @ linear`` = each of the V moved copies' sum, then every moved copy's dot product with
    every template; ``counts`` [n, V] with ``(g·g) @ counts`` = each moved copy's sum of squares.
    float64, so that a frame's features do not depend on the batch it is in."""
    idx = _moved_index(*shape)
    moves, n = idx.shape
    t = np.asarray(templates, dtype=np.float64).T  # [n, K]
    weights = np.zeros((moves, n, t.shape[1]))
    counts = np.zeros((moves, n))
    for v in range(moves):
        np.add.at(weights[v], idx[v], t)
        np.add.at(counts[v], idx[v], 1.0)
    flat_weights = weights.transpose(1, 0, 2).reshape(n, -1)
    return np.concatenate([counts.T, flat_weights], axis=1), counts.T.copy()


def _geometry_row(
    sums: list[float], squares: list[float], best: list[float], own: float, n: int
) -> tuple[float, float]:
    """One frame's (template distance, orientation gain) from its moved copies' ``sums`` and
    ``squares``, the ``best`` dot product of each copy with any template and ``own``, the
    unmoved frame's dot product with its class's template."""
    inv = []
    for total, sq in zip(sums, squares):
        var = sq - total * total / n
        inv.append(1.0 / math.sqrt(max(var, 1e-30)) if var > 1e-7 * sq + 1e-30 else 0.0)  # flat: ρ = 0
    fits = [i * b for i, b in zip(inv, best)]  # inv ≥ 0: the best correlation of each copy
    distance = _log(max(1.0 + TEMPLATE_EPS - own * inv[0], TEMPLATE_EPS))
    return distance, max(fits[1:]) - fits[0]


def _geometry_rows(
    g: np.ndarray, classes: list[int], maps: tuple[np.ndarray, np.ndarray]
) -> list[tuple[float, float]]:
    """:func:`geometry_features` of block sums ``g`` [B, C, h, w] with :func:`_moved_maps`, one
    (distance, gain) per frame: two float64 products, then Python floats per frame."""
    linear, counts = maps
    b, moves = len(g), counts.shape[1]
    flat = g.reshape(b, -1).astype(np.float64)
    lin = flat @ linear
    sums, squares = lin[:, :moves].tolist(), ((flat * flat) @ counts).tolist()
    best = lin[:, moves:].reshape(b, moves, -1).max(axis=2).tolist()
    n = flat.shape[1]
    return [
        _geometry_row(sums[i], squares[i], best[i], lin.item(i, moves + k), n) for i, k in enumerate(classes)
    ]


def geometry_features(x: np.ndarray, classes: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """``[B, 2]``: ``template_distance`` ``log(1 + eps − ρ)``, ρ the correlation of each input
    ``x`` [B, C, H, W] with the template (a row of ``templates`` [K, C·h·w], mean 0, norm 1) of
    its class ``classes`` [B]; ``orientation_gain``, how much better the best template fits the
    frame once rotated, flipped or shifted (:func:`_moved_index`) than as it is."""
    g = _block_means(x)
    rows = _geometry_rows(g, np.asarray(classes).tolist(), _moved_maps(templates, g.shape[1:]))
    return np.array(rows, dtype=np.float64).reshape(len(g), 2)


@functools.lru_cache(maxsize=16)
def _linear_map(c: int, h: int, w: int) -> tuple[np.ndarray, int]:
    """``[c·h·w, 6]`` float64 (9 columns for C = 3) and the border's pixel count: a flattened
    ``[C, h, w]`` input times it gives its sum, its border's sum (the outer ``max(1, min(h, w) //
    14)`` rows and columns), the first two moments of the brightness over row positions (Σ y·x,
    Σ y²·x) and over column positions, and for C = 3 each channel's sum."""
    bw = max(1, min(h, w) // 14)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    border = np.ones((h, w))
    border[bw : h - bw, bw : w - bw] = 0.0
    planes = [np.ones((h, w)), border, ys, ys * ys, xs, xs * xs]
    cols = [np.broadcast_to(plane, (c, h, w)).reshape(-1) for plane in planes]
    if c == 3:
        cols += list(np.repeat(np.eye(3), h * w, axis=1))
    return np.stack(cols, axis=1), max(int(border.sum()) * c, 1)


class _Plan(NamedTuple):
    """What the features of a ``[C, H, W]`` input need that depends on its shape alone."""

    step: int  # the grid step (:func:`_grid_step`)
    size: int  # pixels read
    linear: np.ndarray  # the :func:`_linear_map` of the pixels read, [size, 6 or 9]
    linear_t: np.ndarray  # its transpose, C-ordered: one frame's sums by one matrix-vector product
    n_border: int
    pairs: tuple[int, int]  # neighbouring pixel pairs read along width and along height
    block: tuple[int, int, int, int]  # template pixel rows and columns (:func:`_block`), rows and
    # columns of the input read that the template covers
    wraps: tuple[int, np.ndarray, np.ndarray] | None  # read whole (step 1): the width, and where
    # the differences of the flattened input pair the end of a row (of a channel) with the next


def _wraps(c: int, h: int, w: int) -> tuple[int, np.ndarray, np.ndarray]:
    """For a flattened ``[c, h, w]`` input ``v``: ``w``, the indices ``i`` of ``v[1:] − v[:-1]``
    that pair the last pixel of a row with the first of the next, and those of ``v[w:] − v[:-w]``
    that pair the last row of a channel with the first row of the next."""
    across_rows = np.arange(1, c * h) * w - 1
    across_channels = (np.arange(1, c)[:, None] * h * w - w + np.arange(w)).reshape(-1)
    return w, across_rows, across_channels


@functools.lru_cache(maxsize=16)
def _plan(c: int, height: int, width: int) -> _Plan:
    """The :class:`_Plan` of a ``c`` × ``height`` × ``width`` input (cached by shape)."""
    s = _grid_step(height, width)
    h, w = -(-height // s), -(-width // s)
    linear, n_border = _linear_map(c, h, w)
    pairs = c * h * len(range(0, width - 1, s)), c * len(range(0, height - 1, s)) * w
    bh, bw = _block(h, w)
    block = (bh, bw, h // bh * bh, w // bw * bw)
    wraps = _wraps(c, h, w) if s == 1 else None
    linear_t = np.ascontiguousarray(linear.T)
    for shared in (linear, linear_t, *(wraps[1:] if wraps else ())):
        shared.setflags(write=False)  # cached for every later input of the shape
    return _Plan(s, c * h * w, linear, linear_t, n_border, pairs, block, wraps)


def _pixel_reductions(full: np.ndarray, plan: _Plan) -> tuple[list, list, list, list, list, list]:
    """Per input of ``full`` [B, C, H, W] float32: the :func:`_linear_map` sums, the sum of squared
    pixels, the mean squared difference between neighbouring pixels along width and along height
    over the pairs that start on the grid, and the saturated-high and -low pixel counts. Float32
    differences, float64 sums, each input's own. The products' summation order, and so the last
    bits of a sum, may depend on the batch size (BLAS picks its kernel by shape); the sum of
    squares, on which a flat input's variance depends, is summed alike in every batch."""
    b, s = len(full), plan.step
    flat = (full[:, :, ::s, ::s] if s > 1 else full).reshape(b, plan.size)
    if b == 1:  # a matrix-vector product, reductions over all axes: the same sums, less overhead
        sums = [np.dot(plan.linear_t, flat[0].astype(np.float64)).tolist()]
        high, low = [int(np.count_nonzero(flat >= HIGH))], [int(np.count_nonzero(flat <= LOW))]
    else:
        sums = (flat.astype(np.float64) @ plan.linear).tolist()
        high = np.count_nonzero(flat >= HIGH, axis=1).tolist()
        low = np.count_nonzero(flat <= LOW, axis=1).tolist()
    # one einsum per row, as before: var = squares / n − mean² of a flat input depends on its order
    squares = np.einsum("bi,bi->b", flat, flat, dtype=np.float64).tolist()
    if b == 1 and plan.wraps is not None:
        ex, ey = _edges_flat(flat[0], plan)
    else:
        ex, ey = _edges(full, plan)
    return sums, squares, ex, ey, high, low


def _edges(full: np.ndarray, plan: _Plan) -> tuple[list[float], list[float]]:
    """Per input of ``full`` [B, C, H, W], the mean squared difference between neighbouring pixels
    along width and along height, over the pairs that start on the grid (float32 differences)."""
    b, s = len(full), plan.step
    (nx, ny), (h, w) = plan.pairs, full.shape[2:]
    ex = ey = [0.0] * b
    if nx:  # the pairs (x[.., i, j], x[.., i, j + 1]) with i, j on the grid
        rows = full[:, :, ::s]
        ex = _mean_square((rows[..., 1::s] - rows[..., : w - 1 : s]).reshape(b, nx))
    if ny:
        cols = full[..., ::s]
        ey = _mean_square((cols[:, :, 1::s] - cols[:, :, : h - 1 : s]).reshape(b, ny))
    return ex, ey


def _edges_flat(v: np.ndarray, plan: _Plan) -> tuple[list[float], list[float]]:
    """:func:`_edges` of one input read whole, flattened to ``v``: the differences of the whole
    vector shifted by one pixel and by one row, those that wrap (:func:`_wraps`) set to 0."""
    (nx, ny), (w, across_rows, across_channels) = plan.pairs, plan.wraps
    out = []
    for shift, wrapped, pairs in ((1, across_rows, nx), (w, across_channels, ny)):
        if not pairs:
            out.append([0.0])
            continue
        d = v[shift:] - v[:-shift]
        d[wrapped] = 0.0
        d = d.astype(np.float64)
        out.append([float(np.dot(d, d)) / pairs])
    return out[0], out[1]


def _mean_square(d: np.ndarray) -> list[float]:
    """The mean square of each row of ``d`` [B, n] (float32 differences), summed in float64."""
    n = d.shape[1]
    if len(d) == 1:  # one dot product: several times cheaper than the cast einsum, same to 1e-15
        v = d[0].astype(np.float64)
        return [float(np.dot(v, v)) / n]
    return [total / n for total in np.einsum("bi,bi->b", d, d, dtype=np.float64).tolist()]


def _log(v: float) -> float:
    """``math.log`` with numpy's answers outside its domain (−inf at 0, NaN below)."""
    return math.log(v) if v > 0 else (-math.inf if v == 0 else math.nan)


def _row_features(
    sums: list[float],
    squares: float,
    counts: tuple[int, int],
    edges: tuple[float, float],
    top: float,
    shape: tuple[int, int],
) -> list[float]:
    """One input's :data:`FEATURES` (and colour cast) from its reductions: ``sums`` (the
    :func:`_linear_map` columns), the sum of squared pixels, the saturated-high and -low pixel
    counts, the gradient energies along width and height, the top-class probability; ``shape``
    is (pixels read, border pixels)."""
    n, n_border = shape
    total, border, sy, syy, sx, sxx = sums[:6]
    high, low = counts
    ex, ey = edges
    mean = total / n
    var = max(squares / n - mean * mean, 0.0)
    mass = total + 1e-9
    vy = max(syy / mass - (sy / mass) ** 2, 0.0)
    vx = max(sxx / mass - (sx / mass) ** 2, 0.0)

    # math.log where the argument is > 0 or NaN (no error, the same value as _log); _log where
    # it can be ≤ 0 (the border of an input outside [0, 1])
    log = math.log
    odds = [log((k + 1) / n) - log((n - k + 1) / n) for k in (high, low, n - high - low)]
    rough = log(ex + ey + 1e-4)
    feats = [
        mean,
        log(math.sqrt(var) + 1 / 255),
        *odds,  # log of each fraction against its complement, each + 1/n
        rough,
        rough - log(2 * var + 1e-4),
        _log(border / n_border + 1 / 255),
        log(ex + 1e-4) - log(ey + 1e-4),
        log(vy + 1) - log(vx + 1),
        log(1e-4 - log(min(max(top, 1e-12), 1.0))),
    ]
    return feats + [s / (n / 3) - mean for s in sums[6:]]


def frame_features(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` model inputs in [0, 1] and ``[B, K]`` probabilities → ``[B, d]`` features,
    in the order of :func:`feature_names` (C). The pixel reductions run batched
    (:func:`_pixel_reductions`: float32 pixels, float64 sums), the few scalars per input are then
    combined in Python floats: for one frame that is several times cheaper than numpy's per-call
    overhead on arrays of one row. Inputs of 224 pixels a side and more are read on a grid of
    every ``min(H, W) // 112``-th row and column (gradients still between neighbouring pixels), so
    the cost stays ~ 112² pixels."""
    full, p = _checked(x, probs)
    top = p.max(axis=1).tolist() if p.shape[1] else [math.nan] * len(p)
    rows = _feature_rows(full, top)
    return np.array(rows, dtype=np.float64).reshape(
        len(full), len(FEATURES) + (3 if full.shape[1] == 3 else 0)
    )


def _checked(x: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` as float32 [B, C, H, W] and ``probs`` as float64 [B, K], or a ValueError."""
    full = np.asarray(x, dtype=np.float32)
    p = np.asarray(probs, dtype=np.float64)
    if full.ndim != 4 or p.ndim != 2 or len(full) != len(p):
        raise ValueError(f"need x [B, C, H, W] and probs [B, K], got {full.shape} and {p.shape}")
    return full, p


def _feature_rows(full: np.ndarray, top: list[float]) -> list[list[float]]:
    """:func:`frame_features` of float32 inputs ``full`` with top-class probabilities ``top``, one
    list per input."""
    plan = _plan(*full.shape[1:])
    sums, squares, ex, ey, high, low = _pixel_reductions(full, plan)
    shape = (plan.size, plan.n_border)
    return [
        _row_features(sums[i], squares[i], (high[i], low[i]), (ex[i], ey[i]), top[i], shape)
        for i in range(len(full))
    ]


def _centre_scale(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q10, q50, q90 = np.quantile(f, [0.1, 0.5, 0.9], axis=0)
    return q50, (q90 - q10) / _IQR80


def _fit(feats: np.ndarray, classes: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres and scales: one row (global) or one per class, shrunk towards the global row."""
    centre, scale = _centre_scale(feats)
    scale = np.maximum(scale, SCALE_FLOOR)
    if len(feats) < MIN_PER_CLASS * num_classes:
        return centre[None], scale[None]
    centres, scales = np.repeat(centre[None], num_classes, 0), np.repeat(scale[None], num_classes, 0)
    for k in range(num_classes):
        own = feats[classes == k]
        if len(own) >= 2:
            w = len(own) / (len(own) + SHRINK)
            c_k, s_k = _centre_scale(own)
            centres[k] = w * c_k + (1 - w) * centre
            scales[k] = np.maximum(w * s_k + (1 - w) * scale, np.maximum(0.25 * scale, SCALE_FLOOR))
    return centres, scales


def _nan_max(values: list[float]) -> float:
    """``max`` of ``values`` ≥ 0, NaN when one is NaN (numpy's answer, not Python's)."""
    total = sum(values)  # NaN exactly when one of them is: they are ≥ 0 or NaN
    return max(values) if total == total else math.nan


def _maximum(a: float, b: float) -> float:
    """``np.maximum`` of two floats: NaN when either is."""
    return math.nan if a != a or b != b else max(a, b)


class _Scorer:
    """The score of an entry: ``scores(x, probs)`` → ``[B]``, the same code for the reference at
    bundle time and for a frame at run time. ``centre``/``scale`` [rows, d] in the order of
    :func:`feature_names`; with ``templates`` (version 2) the two groups of the module docstring,
    ``norms`` dividing their largest z (None: not yet fitted, only :meth:`group_z` is usable).
    Everything that depends on the entry alone is prepared here, as Python floats per row, so a
    frame costs its pixel reductions and a few dozen float operations."""

    def __init__(
        self,
        centre: np.ndarray,
        scale: np.ndarray,
        templates: np.ndarray | None = None,
        norms: np.ndarray | None = None,
    ) -> None:
        self.centre, self.scale, self.norms = centre, scale, norms
        self.templates = None if templates is None else np.asarray(templates, dtype=np.float32)
        self._maps: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        geo = list(range(len(FEATURES), len(FEATURES) + len(GEOMETRY))) if templates is not None else []
        self._stat_centre, self._stat_scale = np.delete(centre, geo, axis=1), np.delete(scale, geo, axis=1)
        self._geo_centre, self._geo_scale = centre[:, geo], scale[:, geo]
        # one frame (:meth:`one_score`): the same numbers as Python floats, per row
        self._stat = list(zip(self._stat_centre.tolist(), self._stat_scale.tolist()))
        self._geo = np.concatenate([self._geo_centre, self._geo_scale], axis=1).tolist()
        self._norms = None if norms is None or templates is None else [float(v) for v in norms]

    def maps(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The :func:`_moved_maps` of the templates for block sums of ``shape`` [C, h, w]."""
        key = tuple(shape)
        if key not in self._maps:
            self._maps[key] = _moved_maps(self.templates, key)
        return self._maps[key]

    def group_z(self, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """``[B, 1]`` the largest |z| of the image statistics (version 1), or ``[B, 2]`` that and
        the geometry's largest z (|z| of the distance, the gain's z when above its centre)."""
        full, p = _checked(x, probs)
        b = len(p)
        classes = p.argmax(axis=1)
        rows = classes if len(self.centre) > 1 else np.zeros(b, dtype=np.int64)
        f = np.array(_feature_rows(full, p.max(axis=1).tolist()), dtype=np.float64).reshape(b, -1)
        stat = (np.abs(f - self._stat_centre[rows]) / self._stat_scale[rows]).max(axis=1)
        if self.templates is None:
            return stat[:, None]
        g = _block_means(full)
        geo = np.array(_geometry_rows(g, classes.tolist(), self.maps(g.shape[1:])), dtype=np.float64)
        z = (geo.reshape(b, 2) - self._geo_centre[rows]) / self._geo_scale[rows]
        return np.stack([stat, np.maximum(np.abs(z[:, 0]), z[:, 1])], axis=1)

    def one_score(self, full: np.ndarray, p: np.ndarray) -> float:
        """:meth:`scores` of one frame (``full`` float32 [1, C, H, W], ``p`` float64 [1, K]): the
        same float operations in Python floats, without numpy's per-call overhead."""
        label = int(p.argmax())
        row = label if len(self._stat) > 1 else 0
        (f,) = _feature_rows(full, [p.item(0, label)])
        centre, scale = self._stat[row]
        s = _nan_max([abs(v - c) / d for v, c, d in zip(f, centre, scale)])
        if self._norms is not None:  # templates: the geometry group
            g = _block_means(full)
            ((distance, gain),) = _geometry_rows(g, [label], self.maps(g.shape[1:]))
            c_d, c_g, s_d, s_g = self._geo[row]
            geo = _maximum(abs((distance - c_d) / s_d), (gain - c_g) / s_g)
            s = _maximum(s / self._norms[0], geo / self._norms[1])
        return math.inf if s != s else s

    def scores(self, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The score of each row; NaN counts as infinitely unusual."""
        full, p = _checked(x, probs)
        if len(p) == 1:
            return np.array([self.one_score(full, p)])
        z = self.group_z(full, p)
        s = z[:, 0] if self.norms is None else (z / self.norms).max(axis=1)
        return np.where(np.isnan(s), np.inf, s)


def p_values(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(1 + #{reference ≥ s}) / (n + 1)`` for each score ``s``; ``reference`` sorted ascending."""
    n = len(reference)
    above = n - np.searchsorted(reference, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + above) / (n + 1.0)


def _all_features(x: np.ndarray, p: np.ndarray, templates: np.ndarray | None) -> np.ndarray:
    """:func:`frame_features`, with the template distance inserted after :data:`FEATURES` when
    there are ``templates`` (the order of :func:`feature_names`)."""
    feats = frame_features(x, p)
    if templates is None:
        return feats
    geo = geometry_features(x, p.argmax(axis=1), templates)
    k = len(FEATURES)
    return np.concatenate([feats[:, :k], geo, feats[:, k:]], axis=1)


def ood_reference(images: np.ndarray, probs: np.ndarray, *, version: int = OOD_VERSION) -> dict[str, Any]:
    """The manifest's ``monitor.ood`` entry of one variant, from the calibration ``images``
    ``[m, C, H, W]`` (the model inputs) and that variant's own ``probs`` ``[m, K]`` on them.

    Keys: ``version``, ``score``, ``fit`` (what fitted it), ``features``, ``n_fit``, ``centre`` and
    ``scale`` (one row, or one per class), ``template_shape`` and ``templates`` (one row per class;
    version 2 only), ``reference`` (the sorted scores of the reference part). ``version`` 1 makes
    the entry of earlier releases (for comparisons).
    """
    if version not in OOD_VERSIONS:
        raise ValueError(f"ood reference version must be one of {list(OOD_VERSIONS)}, got {version!r}")
    x, p = np.asarray(images), np.asarray(probs, dtype=np.float64)
    if x.ndim != 4 or p.ndim != 2 or len(x) != len(p):
        raise ValueError(f"need images [m, C, H, W] and probs [m, K], got {x.shape} and {p.shape}")
    fit = np.arange(len(x)) % FIT_EVERY == 0
    if int((~fit).sum()) < MIN_REFERENCE:
        raise ValueError(
            f"{len(x)} calibration inputs leave {int((~fit).sum())} for the out-of-distribution "
            f"reference; it needs at least {MIN_REFERENCE}"
        )
    classes = p.argmax(axis=1)
    templates = _templates(x[fit], classes[fit], p.shape[1]) if version >= 2 else None
    centre, scale = _fit(_all_features(x[fit], p[fit], templates), classes[fit], p.shape[1])
    names = feature_names(x.shape[1], version)
    norms = None
    if templates is not None:  # the geometry features: one global centre and scale
        geo = slice(len(FEATURES), len(FEATURES) + len(GEOMETRY))
        g_centre, g_scale = _centre_scale(geometry_features(x[fit], classes[fit], templates))
        centre[:, geo], scale[:, geo] = g_centre, np.maximum(g_scale, SCALE_FLOOR)
        fit_z = _Scorer(centre, scale, templates).group_z(x[fit], p[fit])
        norms = np.maximum(fit_z.max(axis=0), NORM_FLOOR)
    ref = np.sort(_Scorer(centre, scale, templates, norms).scores(x[~fit], p[~fit]))
    if not np.all(np.isfinite(ref)):
        raise ValueError("out-of-distribution scores of the calibration inputs are not finite")
    entry: dict[str, Any] = {
        "version": version,
        "score": SCORE_TEXT if templates is not None else SCORE_TEXT_V1,
        "fit": FIT_TEXT,
        "features": list(names),
        "n_fit": int(fit.sum()),
        "centre": centre.tolist(),
        "scale": scale.tolist(),
    }
    if templates is not None:
        entry["norms"] = norms.tolist()
        entry["template_shape"] = list(template_shape(*x.shape[1:]))
        entry["templates"] = templates.tolist()
    return {**entry, "reference": ref.tolist()}


def _matrix(
    entry: Mapping[str, Any], key: str, rows: tuple[int, ...], d: int, positive: bool, unit: str = "feature"
) -> np.ndarray:
    name = f"monitor.ood.{key}"
    value = entry.get(key)
    if not isinstance(value, list) or len(value) not in rows:
        raise ValueError(f"{name} must be a list of {' or '.join(map(str, rows))} rows")
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != d:
            raise ValueError(f"{name}[{i}] must be a list of {d} numbers (one per {unit})")
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}[{i}][{j}] must be a finite number, got {v!r}")
            if positive and v <= 0:
                raise ValueError(f"{name}[{i}][{j}] must be > 0, got {v!r}")
    return np.asarray(value, dtype=np.float64)


def _reference(entry: Mapping[str, Any]) -> np.ndarray:
    value = entry.get("reference")
    if not isinstance(value, list) or len(value) < MIN_REFERENCE:
        raise ValueError(f"monitor.ood.reference must be a list of at least {MIN_REFERENCE} scores")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise ValueError(f"monitor.ood.reference must hold numbers, got {bad[0]!r}")
    ref = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(ref)) or np.any(ref < 0):
        raise ValueError("monitor.ood.reference must hold finite scores >= 0")
    if np.any(np.diff(ref) < 0):
        raise ValueError("monitor.ood.reference must be sorted in ascending order")
    return ref


def _norms(entry: Mapping[str, Any]) -> np.ndarray:
    """The two group norms of a version-2 entry, checked."""
    value = entry.get("norms")
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
            for v in value
        )
    ):
        raise ValueError(f"monitor.ood.norms must be a list of 2 finite numbers > 0, got {value!r}")
    return np.asarray(value, dtype=np.float64)


def _entry_templates(entry: Mapping[str, Any], num_classes: int, channels: int) -> np.ndarray:
    """``[K, C·h·w]`` templates of a version-2 entry, shape and values checked by key name."""
    shape = entry.get("template_shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape)
        or shape[0] != channels
        or shape[1] > TEMPLATE_SIDE
        or shape[2] > TEMPLATE_SIDE
    ):
        raise ValueError(
            f"monitor.ood.template_shape must be [C, h, w] with C = {channels} and h, w in "
            f"1..{TEMPLATE_SIDE}, got {shape!r}"
        )
    size = shape[0] * shape[1] * shape[2]
    templates = _matrix(entry, "templates", (num_classes,), size, positive=False, unit="pixel")
    if np.any(np.abs(templates) > 1.0):
        raise ValueError("monitor.ood.templates must hold standardized images (values in [-1, 1])")
    return templates


def check_rate(rate: float | None, n_ref: int) -> float:
    """The flag rate to use: ``rate`` checked to be in [0, 1), or by default the larger of
    :data:`DEFAULT_OOD_RATE` and the smallest p-value ``1 / (n_ref + 1)``."""
    floor = 1.0 / (n_ref + 1)
    if rate is None:
        return max(DEFAULT_OOD_RATE, floor)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"ood rate must be a number in [0, 1) (0: never flag), got {rate!r}")
    if 0 < rate < floor:
        log.warning(
            "ood rate %g is below the smallest p-value 1/%d of this bundle's reference: no frame "
            "can be flagged; use a rate >= %.3g",
            rate,
            n_ref + 1,
            floor,
        )
    return float(rate)


class OodTest:
    """A variant's out-of-distribution test: ``p_values(x, probs)`` → conformal p-values; a frame
    is flagged when its p-value is ≤ :attr:`rate` (see the module docstring for the guarantee).

    ``entry`` is the manifest's ``monitor.ood``; every bad value is refused with a ValueError naming
    its key. ``rate``: None for the default (:func:`check_rate`), 0 to report p-values only.
    """

    def __init__(
        self, entry: Mapping[str, Any], *, num_classes: int, channels: int, rate: float | None = None
    ) -> None:
        if not isinstance(entry, Mapping):
            raise ValueError("monitor.ood must be an object")
        version = entry.get("version")
        if isinstance(version, bool) or version not in OOD_VERSIONS:
            raise ValueError(f"monitor.ood.version {version!r} is not one of {list(OOD_VERSIONS)}")
        names = list(feature_names(channels, version))
        if entry.get("features") != names:
            raise ValueError(f"monitor.ood.features must be {names} for a {channels}-channel input")
        rows = (1, num_classes)
        self.centre = _matrix(entry, "centre", rows, len(names), positive=False)
        self.scale = _matrix(entry, "scale", rows, len(names), positive=True)
        if len(self.centre) != len(self.scale):
            raise ValueError("monitor.ood.centre and monitor.ood.scale must have the same rows")
        self.reference = _reference(entry)
        self.norms = _norms(entry) if version >= 2 else None
        self.templates = _entry_templates(entry, num_classes, channels) if version >= 2 else None
        self._scorer = _Scorer(self.centre, self.scale, self.templates, self.norms)
        self.template_shape = tuple(entry["template_shape"]) if version >= 2 else None
        if self.template_shape is not None:
            self._scorer.maps(self.template_shape)  # the moved maps, ready before the first frame
        self._reference = self.reference.tolist()
        self.version = int(version)
        self.channels = channels
        self.rate = check_rate(rate, self.n_ref)

    @classmethod
    def from_variant(
        cls, variant: Mapping[str, Any], *, num_classes: int, channels: int, rate: float | None = None
    ) -> OodTest | None:
        """The test of a manifest variant, or None when its ``monitor`` has no ``ood`` entry."""
        entry = (variant.get("monitor") or {}).get("ood")
        return None if entry is None else cls(entry, num_classes=num_classes, channels=channels, rate=rate)

    @property
    def n_ref(self) -> int:
        return len(self.reference)

    @property
    def min_p(self) -> float:
        """The smallest p-value this reference can give, ``1 / (n_ref + 1)``."""
        return 1.0 / (self.n_ref + 1)

    def p_values(self, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """``[B, C, H, W]`` model inputs and the variant's ``[B, K]`` probabilities → ``[B]`` p-values.

        Guarantee: for a frame exchangeable with the calibration inputs, ``P(p ≤ a) ≤ a``."""
        x = np.asarray(x)
        if (
            self.templates is not None
            and x.ndim == 4
            and self.template_shape != _template_shape(*x.shape[1:])
        ):
            raise ValueError(
                f"monitor.ood.template_shape {list(self.template_shape)} does not fit inputs of shape "
                f"{list(x.shape[1:])}"
            )
        full, p = _checked(x, probs)
        if len(p) != 1:
            return p_values(self.reference, self._scorer.scores(full, p))
        n = len(self._reference)  # one frame: the same count, without numpy's per-call overhead
        above = n - bisect.bisect_left(self._reference, self._scorer.one_score(full, p))
        return np.array([(1.0 + above) / (n + 1.0)])

    def flagged(self, p: float | None) -> bool:
        """Whether a frame with p-value ``p`` is flagged (never when ``p`` is None or the rate 0)."""
        return p is not None and p <= self.rate

    def state(self) -> dict[str, Any]:
        return {"rate": self.rate, "n_ref": self.n_ref, "min_p": self.min_p}

    def __repr__(self) -> str:
        return (
            f"OodTest(version={self.version}, n_ref={self.n_ref}, rate={self.rate:g}, "
            f"rows={len(self.centre)})"
        )


def combine_alarms(words: Sequence[str | None]) -> str | None:
    """``["ood", "shift:score"]`` → ``"ood+shift:score"``; None when no word is set."""
    kept = [w for w in words if w]
    return "+".join(kept) if kept else None
