"""The distribution-shift monitor: reference from calibration probs, windowed sequential test."""

from __future__ import annotations

import numpy as np
import pytest

from rrise import Calibration
from rrise.monitor import ShiftMonitor, reference_from_probs, two_sample_chi2

CAL = Calibration(sigma=0.25, quantile=0.5, alpha=0.05, beta=0.001, n_mc=1000, m=500)


def probs_with_top(scores: np.ndarray, k: int = 10) -> np.ndarray:
    """[n, k] probability rows whose top-class probability is ``scores`` (each > 1/k)."""
    rest = (1.0 - scores)[:, None] / (k - 1)
    p = np.repeat(rest, k, axis=1)
    p[:, 0] = scores
    return p


def in_distribution(rng: np.random.Generator, n: int) -> np.ndarray:
    return 0.15 + 0.85 * rng.beta(5, 1.2, size=n)


def abstains(scores: np.ndarray) -> np.ndarray:
    from rrise import certify_from_probs

    return np.asarray(certify_from_probs(probs_with_top(scores), CAL).abstain)


def test_reference_bins_hold_equal_calibration_mass_and_count_abstentions() -> None:
    rng = np.random.default_rng(0)
    scores = in_distribution(rng, 500)
    ref = reference_from_probs(probs_with_top(scores), CAL, bins=10, window=100, false_alarm=0.01)
    assert ref["m"] == 500 and sum(ref["counts"]) == 500 and len(ref["counts"]) == len(ref["edges"]) + 1
    assert max(ref["counts"]) - min(ref["counts"]) <= 2
    from rrise import certify_from_probs

    assert ref["abstain"] == int(certify_from_probs(probs_with_top(scores), CAL).abstain.sum())
    assert 0 < ref["abstain"] < 500
    assert ref["score_threshold"] > 0 and ref["abstain_threshold"] > 0


def test_thresholds_are_close_to_the_chi_square_quantiles() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    ref = reference_from_probs(probs_with_top(in_distribution(rng, 2000)), CAL, window=400, false_alarm=0.01)
    df = len(ref["counts"]) - 1
    assert ref["score_threshold"] == pytest.approx(scipy_stats.chi2.ppf(1 - 0.005, df), rel=0.15)
    assert ref["abstain_threshold"] == pytest.approx(scipy_stats.chi2.ppf(1 - 0.005, 1), rel=0.2)


def test_false_alarm_rate_is_controlled_on_in_distribution_streams() -> None:
    # Marginal over the calibration draw, as the guarantee is: fresh reference, fresh windows.
    rng = np.random.default_rng(2)
    windows = alarms = 0
    for _ in range(12):
        ref = reference_from_probs(
            probs_with_top(in_distribution(rng, 600)), CAL, window=100, false_alarm=0.05
        )
        mon = ShiftMonitor(ref)
        stream = in_distribution(rng, 100 * 40)
        for s, a in zip(stream, abstains(stream), strict=True):
            mon.update(float(s), bool(a))
        windows += mon.windows_tested
        alarms += mon.windows_alarmed
    assert windows == 480
    assert alarms / windows < 0.05 * 1.8  # nominal 5 %, with room for binomial noise


def test_alarm_is_raised_on_shift_and_cleared_when_the_stream_recovers() -> None:
    rng = np.random.default_rng(3)
    cal_scores = in_distribution(rng, 500)
    ref = reference_from_probs(probs_with_top(cal_scores), CAL, window=100, false_alarm=0.01)
    threshold_s = np.sort(cal_scores)[ref["abstain"] - 1]  # abstention is monotone in ŝ
    mon = ShiftMonitor(ref)
    words = [mon.update(float(s), bool(s <= threshold_s)) for s in in_distribution(rng, 300)]
    assert set(words) == {None}
    # Blur, fog, a new scene: the surrogate gets unsure, ŝ falls and abstentions rise.
    shifted = 0.15 + 0.5 * rng.random(200)
    words = [mon.update(float(s), bool(s <= threshold_s)) for s in shifted]
    assert words[98] is None and words[99] == "shift:score+abstain" and words[-1] == "shift:score+abstain"
    assert mon.windows_alarmed == 2
    words = [mon.update(float(s), bool(s <= threshold_s)) for s in in_distribution(rng, 100)]
    assert words[-2] == "shift:score+abstain" and words[-1] is None


def test_score_only_shift_is_named() -> None:
    rng = np.random.default_rng(4)
    ref = reference_from_probs(probs_with_top(in_distribution(rng, 500)), CAL, window=100, false_alarm=0.01)
    mon = ShiftMonitor(ref)
    # Every frame certifies with a top probability squeezed into one calibration bin.
    lo, hi = ref["edges"][6], ref["edges"][7]
    for s in rng.uniform(lo, hi, 100):
        word = mon.update(float(s), False)
    assert word is not None and word.startswith("shift:") and "score" in word


def test_stride_and_overrides() -> None:
    rng = np.random.default_rng(5)
    ref = reference_from_probs(probs_with_top(in_distribution(rng, 500)), CAL, window=100, false_alarm=0.01)
    mon = ShiftMonitor(ref, stride=3)
    for s in in_distribution(rng, 297):
        mon.update(float(s), False)
    assert mon.windows_tested == 0  # records 0, 3, ..., 294: 99 of the 100 a window needs
    mon.update(0.9, False)
    assert mon.windows_tested == 1
    other = ShiftMonitor(ref, window=50, false_alarm=0.05)
    assert other.window == 50 and other.score_threshold < ref["score_threshold"]


def test_two_sample_statistic() -> None:
    assert two_sample_chi2(np.array([50, 50]), np.array([10, 10])) == 0.0
    assert two_sample_chi2(np.array([50, 50, 0]), np.array([0, 10, 0])) > 5
    batch = two_sample_chi2(np.array([[5, 5], [5, 5]]), np.array([[5, 5], [10, 0]]))
    assert batch.shape == (2,) and batch[0] == 0 and batch[1] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version"),
        ({"counts": [1, 2]}, "counts"),
        ({"abstain": 10_000}, "abstain"),
        ({"edges": None}, "malformed"),
    ],
)
def test_malformed_references_are_refused(change: dict, message: str) -> None:
    rng = np.random.default_rng(6)
    ref = reference_from_probs(probs_with_top(in_distribution(rng, 100)), CAL, window=50, false_alarm=0.05)
    with pytest.raises(ValueError, match=message):
        ShiftMonitor({**ref, **change})


def test_bad_settings_are_refused() -> None:
    p = probs_with_top(in_distribution(np.random.default_rng(7), 100))
    with pytest.raises(ValueError, match="window"):
        reference_from_probs(p, CAL, window=5)
    with pytest.raises(ValueError, match="false_alarm"):
        reference_from_probs(p, CAL, false_alarm=1e-6)
    with pytest.raises(ValueError, match="probs"):
        reference_from_probs(p[:5], CAL)
    with pytest.raises(ValueError, match="NaN"):
        reference_from_probs(np.full((40, 3), np.nan), CAL)
    assert ShiftMonitor.from_variant({"precision": "fp32"}) is None
