"""The out-of-distribution score of one frame (its own path: matrix-vector products, Python floats,
the reference as a list) and of a batch, against the plain numpy definition (ood_oracle.py):
grey and colour, square and not, one frame and 32."""

from __future__ import annotations

import numpy as np
import pytest

from rrise.ood import OodTest, _block_means, frame_features, geometry_features, ood_reference, p_values
from tests.sdk import ood_oracle

SHAPES = [(1, 28, 28), (3, 40, 32), (3, 64, 64)]
K = 4


def blobs(rng: np.random.Generator, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Tinted smooth blobs with noise: model inputs of one family, any channels and aspect."""
    c, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1, 1))
    width = rng.uniform(0.1, 0.3, (n, 1, 1, 1))
    tint = rng.uniform(0.5, 1.0, (n, c, 1, 1))
    blob = tint * np.exp(-((yy / h - cy) ** 2 + (xx / w - cx) ** 2) / (2 * width**2))
    return np.clip(blob + 0.03 * rng.standard_normal((n, c, h, w)), 0, 1).astype(np.float32)


def probs_of(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    logits = rng.standard_normal((len(x), K))
    logits[:, 0] += 6 * x.mean(axis=(1, 2, 3))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def case(request: pytest.FixtureRequest) -> tuple[dict[int, OodTest], np.ndarray, np.ndarray]:
    """Tests of both entry versions fitted on 200 inputs of the shape, and 32 fresh frames: clean
    ones, a blank, a saturated and a half-saturated one, and one of random pixels."""
    rng = np.random.default_rng(sum(request.param))
    cal = blobs(rng, 200, request.param)
    cal_probs = probs_of(rng, cal)
    c = request.param[0]
    tests = {v: OodTest(ood_reference(cal, cal_probs, version=v), num_classes=K, channels=c) for v in (1, 2)}
    x = blobs(rng, 32, request.param)
    x[1], x[2] = 0.0, 1.0
    x[3, :, : request.param[1] // 2] = 1.0
    x[4] = rng.random(request.param, dtype=np.float32)
    return tests, x, probs_of(rng, x)


def plain_scores(test: OodTest, x: np.ndarray, p: np.ndarray) -> np.ndarray:
    templates = None if test.templates is None else test.templates.astype(np.float32)
    return ood_oracle.scores(x, p, test.centre, test.scale, templates, test.norms)


@pytest.mark.parametrize("batch", [1, 32])
def test_features_of_one_frame_and_of_a_batch_are_the_plain_definition(case, batch: int) -> None:
    tests, x, p = case
    templates = tests[2].templates
    for start in range(32) if batch == 1 else [0]:  # every frame alone, or all 32 at once
        xs, ps = x[start : start + batch], p[start : start + batch]
        want = ood_oracle.frame_features(xs, ps)
        np.testing.assert_allclose(frame_features(xs, ps), want, rtol=1e-9, atol=1e-12)
        classes = ps.argmax(axis=1)
        want_geo = ood_oracle.geometry(_block_means(xs), classes, templates)
        np.testing.assert_allclose(geometry_features(xs, classes, templates), want_geo, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("batch", [1, 32])
def test_scores_and_p_values_of_one_frame_and_of_a_batch_are_the_plain_definition(
    case, batch: int, version: int
) -> None:
    """The score is the same function whether a frame comes alone (OodTest.p_values' own path
    for B = 1) or in a batch, and the p-value counts the reference as p_values does."""
    tests, x, p = case
    test = tests[version]
    want = plain_scores(test, x, p)
    want_p = p_values(test.reference, want)
    if batch == 1:
        got = np.array([test._scorer.scores(x[i : i + 1], p[i : i + 1])[0] for i in range(32)])
        got_p = np.array([test.p_values(x[i : i + 1], p[i : i + 1])[0] for i in range(32)])
    else:
        got, got_p = test._scorer.scores(x, p), test.p_values(x, p)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_array_equal(got_p, want_p)
    assert got_p.dtype == np.float64 and got_p.shape == (32,)


def test_a_frame_alone_scores_as_in_its_batch(case) -> None:
    """Batch independence: each frame's features and score alone equal those in the batch up to
    the float64 products' rounding; a flat frame of a value with a long mantissa too (its variance
    is a difference of two equal sums: only their order could make it nonzero)."""
    tests, x, p = case
    x = x.copy()
    x[5] = np.float32(0.3)
    together = frame_features(x, p)
    alone = np.concatenate([frame_features(x[i : i + 1], p[i : i + 1]) for i in range(32)])
    np.testing.assert_allclose(alone, together, rtol=1e-12, atol=1e-14)
    assert alone[5, 1] == together[5, 1]  # log_std of the flat frame: the same float
    for test in tests.values():
        batch = test._scorer.scores(x, p)
        one = np.array([test._scorer.scores(x[i : i + 1], p[i : i + 1])[0] for i in range(32)])
        np.testing.assert_allclose(one, batch, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf · 0 in the products
def test_a_frame_that_is_not_a_number_is_infinitely_unusual_alone_and_in_a_batch(case) -> None:
    tests, x, p = case
    x, p = x[:4].copy(), p[:4].copy()
    x[0, 0, 0, 0] = np.nan
    x[1, 0, 0, 0] = np.inf
    x[2] = -0.5  # outside [0, 1]: NaN features, not an error
    p[3] = np.nan
    for test in tests.values():
        np.testing.assert_array_equal(test._scorer.scores(x, p), np.inf)
        for i in range(4):
            assert test._scorer.scores(x[i : i + 1], p[i : i + 1])[0] == np.inf
            assert test.p_values(x[i : i + 1], p[i : i + 1])[0] == test.min_p
