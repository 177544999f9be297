"""The distribution-shift monitor: reference from calibration probs, overlapping-window sequential test."""

from __future__ import annotations

import numpy as np
import pytest

from rrise import Calibration
from rrise.monitor import OOD_P_EDGES, ShiftMonitor, ood_gaps, reference_from_probs, two_sample_chi2

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
    level = 0.01 / (2 * (400 // ref["step"]))  # two statistics, four overlapping tests per window
    assert ref["score_threshold"] == pytest.approx(scipy_stats.chi2.ppf(1 - level, df), rel=0.15)
    assert ref["abstain_threshold"] == pytest.approx(scipy_stats.chi2.ppf(1 - level, 1), rel=0.2)


@pytest.mark.parametrize("step", [100, 25])
def test_false_alarm_rate_is_controlled_on_in_distribution_streams(step: int, monkeypatch) -> None:
    # Marginal over the calibration draw, as the guarantee is: a fresh reference for every short
    # stream (one unlucky reference raises many alarms, so few long streams would measure little).
    # Overlapping windows (step 25: four tests per window) split the rate by Bonferroni, so the
    # false alarms per 100 in-distribution records stay within the same 5 %.
    import rrise.monitor

    monkeypatch.setattr(rrise.monitor, "N_SIM", 4000)  # >= 20 draws beyond every threshold here
    rng = np.random.default_rng(2)
    tests = alarms = 0
    for _ in range(150):
        ref = reference_from_probs(
            probs_with_top(in_distribution(rng, 600)), CAL, window=100, false_alarm=0.05, step=step
        )
        mon = ShiftMonitor(ref)
        stream = in_distribution(rng, 400)
        for s, a in zip(stream, abstains(stream), strict=True):
            mon.update(float(s), bool(a))
        tests += mon.windows_tested
        alarms += mon.windows_alarmed
    assert tests == 150 * (1 + (400 - 100) // step)
    per_window_span = alarms / tests * (100 // step)
    assert per_window_span < 0.05 * 1.4  # nominal <= 5 %, with room for the noise of 150 references


def test_alarm_is_raised_on_shift_and_cleared_when_the_stream_recovers() -> None:
    rng = np.random.default_rng(3)
    cal_scores = in_distribution(rng, 500)
    ref = reference_from_probs(probs_with_top(cal_scores), CAL, window=100, false_alarm=0.01, step=100)
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
    mon = ShiftMonitor(ref, stride=3, step=100)
    for s in in_distribution(rng, 297):
        mon.update(float(s), False)
    assert mon.windows_tested == 0  # records 0, 3, ..., 294: 99 of the 100 a window needs
    mon.update(0.9, False)
    assert mon.windows_tested == 1
    other = ShiftMonitor(ref, window=50, false_alarm=0.05)
    assert other.window == 50 and other.step == 12 and other.score_threshold < ref["score_threshold"]


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
        ({"edges": [0.9, 0.1]}, "counts"),
        ({"step": 0}, "step"),
        ({"step": 500}, "step"),
        ({"window": "many"}, "malformed"),
        ({"false_alarm": 2.0}, "false_alarm"),
        ({"score_threshold": "x"}, "thresholds"),
        ({"score_threshold": float("nan")}, "thresholds"),
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
    with pytest.raises(ValueError, match="step"):
        reference_from_probs(p, CAL, window=50, step=51)
    with pytest.raises(ValueError, match="probs"):
        reference_from_probs(p[:5], CAL)
    with pytest.raises(ValueError, match="NaN"):
        reference_from_probs(np.full((40, 3), np.nan), CAL)
    assert ShiftMonitor.from_variant({"precision": "fp32"}) is None


def test_overlapping_windows_react_sooner_at_the_same_false_alarm_rate() -> None:
    rng = np.random.default_rng(8)
    cal_scores = in_distribution(rng, 800)
    threshold_s = float(np.quantile(cal_scores, 0.1))
    clean, shifted = in_distribution(rng, 400), 0.15 + 0.5 * rng.random(400)
    stream = np.concatenate([clean, shifted, in_distribution(rng, 400)])
    first_alarm, released = {}, {}
    for step in (200, 50):
        ref = reference_from_probs(probs_with_top(cal_scores), CAL, window=200, false_alarm=0.01, step=step)
        mon = ShiftMonitor(ref)
        words = [mon.update(float(s), bool(s <= threshold_s)) for s in stream]
        first_alarm[step] = next(i for i, w in enumerate(words) if w) - 400
        released[step] = next(i for i in range(800, 1200) if words[i] is None) - 800
        assert all(w is None for w in words[:400])
    assert first_alarm[200] == 199 and first_alarm[50] < 100
    assert released[50] <= released[200]


def test_stored_thresholds_are_reused_and_recomputed_for_other_settings() -> None:
    rng = np.random.default_rng(9)
    probs = probs_with_top(in_distribution(rng, 400))
    ref = reference_from_probs(probs, CAL, window=100, false_alarm=0.02)
    assert ref["step"] == 25
    mon = ShiftMonitor(ref)
    assert mon.step == 25 and mon.score_threshold == ref["score_threshold"]
    disjoint = ShiftMonitor(ref, step=100)  # a quarter of the tests per window: lower thresholds
    assert disjoint.score_threshold < mon.score_threshold
    # An entry made before ``step`` was stored: its thresholds are for disjoint windows.
    old = reference_from_probs(probs, CAL, window=100, false_alarm=0.02, step=100)
    del old["step"]
    assert ShiftMonitor(old, step=100).thresholds == {
        "score": old["score_threshold"],
        "abstain": old["abstain_threshold"],
    }
    upgraded = ShiftMonitor(old)  # overlapping windows by default, thresholds simulated anew
    assert upgraded.step == 25 and upgraded.thresholds == mon.thresholds


def test_ood_p_gaps_follow_the_conformal_law() -> None:
    gaps = ood_gaps(399)  # p = j / 400, j = 1..400
    assert gaps.sum() == 400 and len(gaps) == len(OOD_P_EDGES) + 1
    assert list(gaps) == [4, 16, 60, 120, 200]
    assert list(ood_gaps(19)) == [0, 1, 3, 6, 10]  # no p-value can be <= 0.01 with 19 references


def _probs_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.clip(0.3 + 0.2 * rng.standard_normal((n, 1, 6, 6)), 0, 1).astype(np.float32)
    return probs_with_top(in_distribution(rng, n)), images


def test_ood_p_statistic_fires_on_small_p_values_and_not_on_uniform_ones() -> None:
    rng = np.random.default_rng(10)
    probs, images = _probs_images(rng, 500)
    ref = reference_from_probs(probs, CAL, images=images, window=100, false_alarm=0.01)
    assert "ood" in ref and ref["ood_threshold"] > 0
    n_ref = len(ref["ood"]["reference"])
    mon = ShiftMonitor(ref)
    assert mon.n_ref == n_ref and len(mon.thresholds) == 3
    scores = in_distribution(rng, 600)
    grid = np.arange(1, n_ref + 2) / (n_ref + 1)
    words = [mon.update(float(s), False, float(rng.choice(grid))) for s in scores[:300]]
    assert "ood_p" not in "".join(w or "" for w in words)
    words = [
        mon.update(float(s), False, 1 / (n_ref + 1) if i % 2 else 0.7) for i, s in enumerate(scores[300:])
    ]
    assert words[-1] is not None and "ood_p" in words[-1]
    assert ShiftMonitor(ref, ood=False).n_ref is None
