"""Distribution-shift monitor: is the deployed stream still drawn like the calibration inputs?

The certificate (docs/CERTIFICATE.md) holds only while deployed inputs are exchangeable with the calibration
inputs. This module keeps, per precision variant, the calibration-time distribution of the two
things the runtime sees for every frame — the surrogate's top-class probability ŝ and whether the
record abstains — and tests the stream against it. numpy only.

Reference (``reference_from_probs``, stored in the manifest as ``variants[i].monitor``): ŝ binned
at the calibration quantiles of ŝ (``bins`` bins of roughly equal calibration mass), the count of
calibration inputs in each bin, and the number of calibration inputs that abstain under that
variant's own quantile.

Test (``ShiftMonitor``): the stream is cut into consecutive windows of ``window`` scored records.
At the end of each window two two-sample tests compare the window with the calibration sample:

* a two-sample chi-square statistic on the ŝ bins, and
* the same statistic on the two categories abstain / certify,

each at level ``false_alarm / 2`` (Bonferroni), so a window whose records are exchangeable with
the calibration inputs raises an alarm with probability at most about ``false_alarm``. The
thresholds are the ``1 − false_alarm/2`` quantiles of each statistic under the null, simulated by
a parametric bootstrap (reference and window redrawn from the reference's bin frequencies) with a
fixed seed, so they are deterministic. With ``window = 200`` at 30 frames/s a test runs every
6.7 s, and ``false_alarm = 1e-3`` means about one false alarm in 1.9 hours of in-distribution
input. A rejecting window sets the alarm word (``"shift:score"``, ``"shift:abstain"`` or
``"shift:score+abstain"``) on every record until a later window passes.

Caveat: consecutive video frames are correlated, not independent draws, so a static scene can
look "shifted" although each frame is in distribution; ``stride = k`` tests every k-th record
only. The alarm says the guarantee's premise is in doubt, not that a certificate is wrong.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "MONITOR_VERSION",
    "expected_false_alarm_interval_s",
    "ShiftMonitor",
    "reference_from_probs",
    "two_sample_chi2",
]

MONITOR_VERSION = 1
DEFAULT_BINS = 10
DEFAULT_WINDOW = 200
DEFAULT_FALSE_ALARM = 1e-3
N_SIM = 40_000
SEED = 20240601
TEST_NAME = (
    "windowed two-sample chi-square on top-class-probability bins and on abstentions, "
    "Bonferroni-split false-alarm rate, thresholds by parametric bootstrap"
)


def two_sample_chi2(ref: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Two-sample chi-square statistic between count vectors ``ref`` [..., B] and ``win`` [..., B].

    ``Σ_b (w_b/W − c_b/m)² / (p_b (1/W + 1/m))`` with ``p_b`` the pooled frequency; bins empty in
    both samples contribute 0. Broadcasts over leading axes. Under the null (both samples from one
    distribution) it is approximately χ² with (non-empty bins − 1) degrees of freedom.
    """
    c = np.asarray(ref, dtype=np.float64)
    w = np.asarray(win, dtype=np.float64)
    m = c.sum(axis=-1, keepdims=True)
    n = w.sum(axis=-1, keepdims=True)
    pooled = (c + w) / (m + n)
    diff = w / n - c / m
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pooled > 0, diff * diff / (pooled * (1.0 / n + 1.0 / m)), 0.0)
    return terms.sum(axis=-1)


def _threshold(ref_counts: np.ndarray, window: int, level: float, seed: int) -> float:
    """The (1 − level) quantile of the statistic with reference and window drawn from ref/m."""
    ref_counts = np.asarray(ref_counts, dtype=np.int64)
    m = int(ref_counts.sum())
    p = ref_counts / m
    rng = np.random.default_rng(seed)
    sim_ref = rng.multinomial(m, p, size=N_SIM)
    sim_win = rng.multinomial(window, p, size=N_SIM)
    stats = two_sample_chi2(sim_ref, sim_win)
    return float(np.quantile(stats, 1.0 - level, method="higher"))


def _check_settings(window: int, false_alarm: float) -> None:
    if not isinstance(window, (int, np.integer)) or window < 10:
        raise ValueError(f"monitor window must be an integer >= 10 records, got {window!r}")
    if not 0.0 < float(false_alarm) < 1.0:
        raise ValueError(f"monitor false_alarm must be in (0, 1), got {false_alarm!r}")
    if float(false_alarm) / 2 * N_SIM < 20:
        raise ValueError(
            f"monitor false_alarm {false_alarm} is too small to estimate its threshold from "
            f"{N_SIM} simulations (needs >= {40 / N_SIM:g})"
        )


def reference_from_probs(
    probs: np.ndarray,
    calibration: Any,
    *,
    bins: int = DEFAULT_BINS,
    window: int = DEFAULT_WINDOW,
    false_alarm: float = DEFAULT_FALSE_ALARM,
) -> dict[str, Any]:
    """The manifest's ``monitor`` entry of one variant, from that variant's own ``probs`` [m, K] on
    the calibration inputs and its :class:`~rrise.Calibration` (with the variant's quantile).

    Keys: ``version``, ``test``, ``edges`` (interior bin edges of ŝ), ``counts`` (calibration
    inputs per bin), ``m``, ``abstain`` (calibration inputs that abstain), ``window``,
    ``false_alarm``, ``score_threshold``, ``abstain_threshold`` (the simulated critical values).
    """
    from .certificate import certify_from_probs

    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] < 2 * bins:
        raise ValueError(f"probs must be [m, K] with K >= 2 and m >= {2 * bins}, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf")
    if not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"monitor bins must be an integer >= 2, got {bins!r}")
    _check_settings(window, false_alarm)
    cert = certify_from_probs(p, calibration)
    score = np.asarray(cert.score, dtype=np.float64)
    edges = np.unique(np.quantile(score, np.arange(1, bins) / bins))
    counts = np.bincount(np.searchsorted(edges, score, side="right"), minlength=len(edges) + 1)
    abstain = int(np.count_nonzero(cert.abstain))
    m = len(score)
    return {
        "version": MONITOR_VERSION,
        "test": TEST_NAME,
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "m": int(m),
        "abstain": abstain,
        "window": int(window),
        "false_alarm": float(false_alarm),
        "score_threshold": _threshold(counts, int(window), false_alarm / 2, SEED),
        "abstain_threshold": _threshold(
            np.array([abstain, m - abstain]), int(window), false_alarm / 2, SEED + 1
        ),
    }


class ShiftMonitor:
    """The sequential shift test over a stream of (ŝ, abstain) pairs; see the module docstring.

    ``update(score, abstain)`` → the alarm word (``None`` while the stream looks like calibration).
    ``window`` and ``false_alarm`` default to the reference's; other values recompute thresholds.
    Not thread-safe: call from one thread (``Runtime`` does, under its lock).
    """

    def __init__(
        self,
        reference: Mapping[str, Any],
        *,
        window: int | None = None,
        false_alarm: float | None = None,
        stride: int = 1,
    ) -> None:
        try:
            if int(reference["version"]) != MONITOR_VERSION:
                raise ValueError(f"monitor version {reference['version']!r} is not {MONITOR_VERSION}")
            self.edges = [float(e) for e in reference["edges"]]
            self.ref_counts = np.asarray(reference["counts"], dtype=np.int64)
            self.m = int(reference["m"])
            self.ref_abstain = int(reference["abstain"])
            ref_window = int(reference["window"])
            ref_fa = float(reference["false_alarm"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"monitor reference is malformed: {exc!r}") from None
        if len(self.ref_counts) != len(self.edges) + 1 or int(self.ref_counts.sum()) != self.m:
            raise ValueError(
                f"monitor reference has {len(self.ref_counts)} counts summing to "
                f"{int(self.ref_counts.sum())} for {len(self.edges)} edges and m = {self.m}"
            )
        if not 0 <= self.ref_abstain <= self.m:
            raise ValueError(f"monitor reference abstain {self.ref_abstain} is not in [0, m = {self.m}]")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"monitor stride must be an integer >= 1, got {stride!r}")
        self.window = ref_window if window is None else int(window)
        self.false_alarm = ref_fa if false_alarm is None else float(false_alarm)
        _check_settings(self.window, self.false_alarm)
        if self.window == ref_window and self.false_alarm == ref_fa:
            self.score_threshold = float(reference["score_threshold"])
            self.abstain_threshold = float(reference["abstain_threshold"])
        else:
            level = self.false_alarm / 2
            ref_ab = np.array([self.ref_abstain, self.m - self.ref_abstain])
            self.score_threshold = _threshold(self.ref_counts, self.window, level, SEED)
            self.abstain_threshold = _threshold(ref_ab, self.window, level, SEED + 1)
        self.stride = stride
        self._ref_ab = np.array([self.ref_abstain, self.m - self.ref_abstain], dtype=np.int64)
        self.alarm: str | None = None
        self.windows_tested = 0
        self.windows_alarmed = 0
        self.last_statistics: tuple[float, float] | None = None
        self._seen = 0
        self._reset_window()

    @classmethod
    def from_variant(cls, variant: Mapping[str, Any], **kwargs: Any) -> ShiftMonitor | None:
        """The monitor of a manifest variant, or None when the bundle has no ``monitor`` entry."""
        ref = variant.get("monitor")
        return None if ref is None else cls(ref, **kwargs)

    def _reset_window(self) -> None:
        self._bins = [0] * (len(self.edges) + 1)
        self._abstain = 0
        self._n = 0

    def update(self, score: float, abstain: bool) -> str | None:
        """Add one scored record; at the end of a window run the tests. Returns the alarm word."""
        self._seen += 1
        if self.stride > 1 and (self._seen - 1) % self.stride:
            return self.alarm
        self._bins[bisect.bisect_right(self.edges, score)] += 1
        self._abstain += 1 if abstain else 0
        self._n += 1
        if self._n >= self.window:
            self._test()
        return self.alarm

    def _test(self) -> None:
        win = np.asarray(self._bins, dtype=np.int64)
        s_stat = float(two_sample_chi2(self.ref_counts, win))
        a_stat = float(two_sample_chi2(self._ref_ab, np.array([self._abstain, self._n - self._abstain])))
        self.last_statistics = (s_stat, a_stat)
        hits = (("score", s_stat > self.score_threshold), ("abstain", a_stat > self.abstain_threshold))
        words = [w for w, hit in hits if hit]
        self.alarm = "shift:" + "+".join(words) if words else None
        self.windows_tested += 1
        self.windows_alarmed += 1 if words else 0
        self._reset_window()

    def state(self) -> dict[str, Any]:
        """For status records: the alarm, windows tested/alarmed, the last statistics."""
        return {
            "alarm": self.alarm,
            "windows_tested": self.windows_tested,
            "windows_alarmed": self.windows_alarmed,
            "last_statistics": None
            if self.last_statistics is None
            else [round(x, 4) for x in self.last_statistics],
            "thresholds": [self.score_threshold, self.abstain_threshold],
        }

    def __repr__(self) -> str:
        return (
            f"ShiftMonitor(bins={len(self.edges) + 1}, m={self.m}, window={self.window}, "
            f"false_alarm={self.false_alarm:g}, alarm={self.alarm!r})"
        )


def expected_false_alarm_interval_s(window: int, false_alarm: float, fps: float) -> float:
    """Mean seconds between false alarms on in-distribution input: window / (fps · false_alarm)."""
    if fps <= 0 or false_alarm <= 0:
        return math.inf
    return window / (fps * false_alarm)
