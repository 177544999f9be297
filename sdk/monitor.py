"""Distribution-shift monitor: is the deployed stream still drawn like the calibration inputs?

The certificate (docs/CERTIFICATE.md) holds only while deployed inputs are exchangeable with the calibration
inputs. This module keeps, per precision variant, the calibration-time distribution of what the
runtime sees for every frame — the surrogate's top-class probability ŝ, whether the record
abstains and, where the bundle has one, the frame's out-of-distribution p-value (:mod:`rrise.ood`) —
and tests the stream against it. numpy only.

Reference (``reference_from_probs``, stored in the manifest as ``variants[i].monitor``): ŝ binned
at the calibration quantiles of ŝ (``bins`` bins of roughly equal calibration mass), the count of
calibration inputs in each bin, the number of calibration inputs that abstain under that
variant's own quantile, and (with the calibration images) the ``ood`` entry of :mod:`rrise.ood`.

Test (``ShiftMonitor``): every ``step`` scored records, once ``window`` have been seen, the last
``window`` records are compared with the calibration sample by up to three two-sample chi-square
statistics: on the ŝ bins, on abstain / certify, and on the bins ≤ 0.01, ≤ 0.05, ≤ 0.2, ≤ 0.5, > 0.5
of the out-of-distribution p-values (whose law for clean frames is known exactly: the reference's
order statistics cut the line into n_ref + 1 gaps of Dirichlet(1, …, 1) mass). Each test runs at
level ``false_alarm / (statistics × ⌈window / step⌉)`` (Bonferroni), so the windows that end within
any stretch of ``window`` in-distribution records raise a false alarm with probability at most
``false_alarm``: overlapping windows react and release about ``window − step`` records sooner than
disjoint ones (``step = window``) at the same false-alarm rate per record. The thresholds are the
``1 − level`` quantiles of each statistic under the null, simulated by a parametric bootstrap with a
fixed seed, so they are deterministic. With ``window = 200`` at 30 frames/s, ``false_alarm = 1e-3``
means about one false alarm in 1.9 hours of in-distribution input. A rejecting test sets the alarm
word (``"shift:"`` and the rejecting statistics: ``score``, ``abstain``, ``ood_p``, joined by ``+``)
on every record until a later test passes.

Caveat: consecutive video frames are correlated, not independent draws, so a static scene can
look "shifted" although each frame is in distribution; ``stride = k`` tests every k-th record
only. The alarm says the guarantee's premise is in doubt, not that a certificate is wrong.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "MONITOR_OPTIONS",
    "MONITOR_VERSION",
    "OOD_P_EDGES",
    "expected_false_alarm_interval_s",
    "load_monitors",
    "ShiftMonitor",
    "reference_from_probs",
    "two_sample_chi2",
    "validate_monitor",
]

MONITOR_VERSION = 1
DEFAULT_BINS = 10
DEFAULT_WINDOW = 200
DEFAULT_FALSE_ALARM = 1e-3
STEPS_PER_WINDOW = 4  # default step = window // 4
N_SIM = 40_000
MAX_SIM = 2_000_000
SIM_CHUNK = 100_000
SEED = 20240601
OOD_P_EDGES = (0.01, 0.05, 0.2, 0.5)  # bins of the out-of-distribution p-values: p ≤ edge
MONITOR_OPTIONS = ("window", "false_alarm", "step", "stride", "ood", "ood_rate")
TEST_NAME = (
    "two-sample chi-square on top-class-probability bins, on abstentions and on out-of-distribution "
    "p-value bins over overlapping windows, Bonferroni-split false-alarm rate, thresholds by "
    "parametric bootstrap"
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


def _n_sim(level: float) -> int:
    """Bootstrap draws for a (1 − level) quantile: at least 20 beyond it."""
    return max(N_SIM, math.ceil(20 / level))


def _threshold(ref_counts: np.ndarray, window: int, level: float, seed: int, gaps: bool = False) -> float:
    """The (1 − level) quantile of the statistic under the null. ``gaps=False``: reference and
    window both drawn from ref/m. ``gaps=True`` (conformal p-value bins): ``ref_counts`` are the
    numbers of reference gaps per bin, the bin masses are Dirichlet(gaps) and the window is drawn
    from them."""
    ref_counts = np.asarray(ref_counts, dtype=np.int64)
    m = int(ref_counts.sum())
    p = ref_counts / m
    rng = np.random.default_rng(seed)
    total = _n_sim(level)
    stats = []
    for start in range(0, total, SIM_CHUNK):
        size = min(SIM_CHUNK, total - start)
        if gaps:  # a bin no gap falls in can hold no p-value: leave it out
            kept = ref_counts[ref_counts > 0]
            sim_ref = np.broadcast_to(kept, (size, len(kept)))
            sim_win = rng.multinomial(window, rng.dirichlet(kept, size=size))
        else:
            sim_ref = rng.multinomial(m, p, size=size)
            sim_win = rng.multinomial(window, p, size=size)
        stats.append(two_sample_chi2(sim_ref, sim_win))
    return float(np.quantile(np.concatenate(stats), 1.0 - level, method="higher"))


def _check_settings(window: int, false_alarm: float, step: int, statistics: int) -> float:
    """Check the settings; return the level of each test."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 10:
        raise ValueError(f"monitor window must be an integer >= 10 records, got {window!r}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step <= window:
        raise ValueError(f"monitor step must be an integer in [1, window = {window}], got {step!r}")
    if isinstance(false_alarm, bool) or not isinstance(false_alarm, (int, float, np.floating)):
        raise ValueError(f"monitor false_alarm must be a number in (0, 1), got {false_alarm!r}")
    if not 0.0 < float(false_alarm) < 1.0:
        raise ValueError(f"monitor false_alarm must be in (0, 1), got {false_alarm!r}")
    level = float(false_alarm) / (statistics * math.ceil(window / step))
    if _n_sim(level) > MAX_SIM:
        smallest = 20 / MAX_SIM * statistics * math.ceil(window / step)
        raise ValueError(
            f"monitor false_alarm {false_alarm} is too small to estimate its thresholds from "
            f"{MAX_SIM} simulations with window {window} and step {step} (needs >= {smallest:g})"
        )
    return level


def ood_gaps(n_ref: int) -> np.ndarray:
    """How many of the n_ref + 1 gaps between sorted reference scores give a p-value in each bin of
    :data:`OOD_P_EDGES` (a score in the j-th gap from the top has p = j / (n_ref + 1))."""
    p = np.arange(1, n_ref + 2) / (n_ref + 1)
    return np.bincount(np.searchsorted(OOD_P_EDGES, p, side="left"), minlength=len(OOD_P_EDGES) + 1)


def _thresholds(
    counts: np.ndarray, m: int, abstain: int, n_ref: int | None, window: int, step: int, false_alarm: float
) -> dict[str, float]:
    """The critical values of the statistics (``score``, ``abstain``, and ``ood_p`` with n_ref)."""
    level = _check_settings(window, false_alarm, step, 2 if n_ref is None else 3)
    out = {
        "score": _threshold(counts, window, level, SEED),
        "abstain": _threshold(np.array([abstain, m - abstain]), window, level, SEED + 1),
    }
    if n_ref is not None:
        out["ood_p"] = _threshold(ood_gaps(n_ref), window, level, SEED + 2, gaps=True)
    return out


def reference_from_probs(
    probs: np.ndarray,
    calibration: Any,
    *,
    images: np.ndarray | None = None,
    bins: int = DEFAULT_BINS,
    window: int = DEFAULT_WINDOW,
    false_alarm: float = DEFAULT_FALSE_ALARM,
    step: int | None = None,
) -> dict[str, Any]:
    """The manifest's ``monitor`` entry of one variant, from that variant's own ``probs`` [m, K] on
    the calibration inputs, its :class:`~rrise.Calibration` (with the variant's quantile) and, for
    the per-frame out-of-distribution test, the calibration ``images`` [m, C, H, W] themselves.

    Keys: ``version``, ``test``, ``edges`` (interior bin edges of ŝ), ``counts`` (calibration
    inputs per bin), ``m``, ``abstain`` (calibration inputs that abstain), ``window``, ``step``,
    ``false_alarm``, ``score_threshold``, ``abstain_threshold`` (the simulated critical values),
    and with ``images``: ``ood`` (:func:`rrise.ood.ood_reference`) and ``ood_threshold``.
    """
    from .certificate import certify_from_probs
    from .ood import ood_reference

    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] < 2 * bins:
        raise ValueError(f"probs must be [m, K] with K >= 2 and m >= {2 * bins}, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf")
    if not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"monitor bins must be an integer >= 2, got {bins!r}")
    step = max(1, window // STEPS_PER_WINDOW) if step is None else step
    _check_settings(window, false_alarm, step, 2)
    ood = None if images is None else ood_reference(images, p)
    cert = certify_from_probs(p, calibration)
    score = np.asarray(cert.score, dtype=np.float64)
    edges = np.unique(np.quantile(score, np.arange(1, bins) / bins))
    counts = np.bincount(np.searchsorted(edges, score, side="right"), minlength=len(edges) + 1)
    abstain = int(np.count_nonzero(cert.abstain))
    m = len(score)
    n_ref = None if ood is None else len(ood["reference"])
    thresholds = _thresholds(counts, m, abstain, n_ref, int(window), int(step), float(false_alarm))
    entry = {
        "version": MONITOR_VERSION,
        "test": TEST_NAME,
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "m": int(m),
        "abstain": abstain,
        "window": int(window),
        "step": int(step),
        "false_alarm": float(false_alarm),
        "score_threshold": thresholds["score"],
        "abstain_threshold": thresholds["abstain"],
    }
    if ood is not None:
        entry["ood"] = ood
        entry["ood_threshold"] = thresholds["ood_p"]
    return entry


def _reference_settings(reference: Mapping[str, Any]) -> tuple[list[float], np.ndarray, int, int, int | None]:
    """edges, counts, m, abstain and the ood reference size of a ``monitor`` entry, checked."""
    try:
        if reference["version"] != MONITOR_VERSION:
            raise ValueError(f"monitor version {reference['version']!r} is not {MONITOR_VERSION}")
        edges = [float(e) for e in reference["edges"]]
        counts = np.asarray(reference["counts"], dtype=np.int64)
        m, abstain = int(reference["m"]), int(reference["abstain"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"monitor reference is malformed: {exc!r}") from None
    if counts.ndim != 1 or len(counts) != len(edges) + 1 or int(counts.sum()) != m or np.any(counts < 0):
        raise ValueError(
            f"monitor reference has {counts.size} counts summing to {int(counts.sum())} for "
            f"{len(edges)} edges and m = {m}"
        )
    if not all(math.isfinite(e) for e in edges) or edges != sorted(edges):
        raise ValueError("monitor edges must be finite and ascending")
    if not 0 <= abstain <= m:
        raise ValueError(f"monitor reference abstain {abstain} is not in [0, m = {m}]")
    ood = reference.get("ood")
    ref = ood.get("reference") if isinstance(ood, Mapping) else None
    return edges, counts, m, abstain, (len(ref) if isinstance(ref, list) else None)


def _stored_thresholds(reference: Mapping[str, Any], window: int, false_alarm: float, step: int, ood: bool):
    """The manifest's thresholds when they were simulated for exactly these settings, else None.
    An entry without ``step`` was made for disjoint windows (step = window) and two statistics."""
    try:
        same = (
            int(reference["window"]) == window
            and float(reference["false_alarm"]) == false_alarm
            and int(reference.get("step", reference["window"])) == step
            and ("ood_threshold" in reference) == ood
        )
        if not same:
            return None
        out = {"score": float(reference["score_threshold"]), "abstain": float(reference["abstain_threshold"])}
        if ood:
            out["ood_p"] = float(reference["ood_threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"monitor thresholds are malformed: {exc!r}") from None
    if not all(math.isfinite(t) and t >= 0 for t in out.values()):
        raise ValueError(f"monitor thresholds must be finite numbers >= 0, got {out}")
    return out


class ShiftMonitor:
    """The sequential shift test over a stream of (ŝ, abstain, ood p-value) records; see the module
    docstring.

    ``update(score, abstain, ood_p)`` → the alarm word (``None`` while the stream looks like
    calibration). ``window``, ``false_alarm`` and ``step`` default to the reference's (``step``: a
    quarter of the window for entries made before it was stored); other values recompute the
    thresholds. ``ood=False`` leaves the p-value statistic out (as does an entry without ``ood``).
    Not thread-safe: call from one thread (``Runtime`` does, under its lock).
    """

    def __init__(
        self,
        reference: Mapping[str, Any],
        *,
        window: int | None = None,
        false_alarm: float | None = None,
        stride: int = 1,
        step: int | None = None,
        ood: bool = True,
    ) -> None:
        self.edges, self.ref_counts, self.m, self.ref_abstain, n_ref = _reference_settings(reference)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"monitor stride must be an integer >= 1, got {stride!r}")
        try:
            self.window = int(reference["window"]) if window is None else window
            self.false_alarm = float(reference["false_alarm"]) if false_alarm is None else false_alarm
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"monitor reference is malformed: {exc!r}") from None
        if step is None:
            step = reference.get("step") if window is None else None
            step = max(1, self.window // STEPS_PER_WINDOW) if step is None else step
        self.step = step
        self.n_ref = n_ref if ood else None
        _check_settings(self.window, self.false_alarm, self.step, 2 if self.n_ref is None else 3)
        self.thresholds = _stored_thresholds(
            reference, self.window, self.false_alarm, self.step, self.n_ref is not None
        ) or _thresholds(
            self.ref_counts, self.m, self.ref_abstain, self.n_ref, self.window, self.step, self.false_alarm
        )
        self._refs = {
            "score": self.ref_counts,
            "abstain": np.array([self.ref_abstain, self.m - self.ref_abstain], dtype=np.int64),
        }
        if self.n_ref is not None:
            self._refs["ood_p"] = ood_gaps(self.n_ref)
        self.stride = stride
        self.alarm: str | None = None
        self.windows_tested = 0
        self.windows_alarmed = 0
        self.last_statistics: tuple[float, ...] | None = None
        self._seen = 0
        self._since_test = 0
        self._buffer: deque[tuple[int, int, int]] = deque()
        self._counts = {k: np.zeros(len(v), dtype=np.int64) for k, v in self._refs.items()}

    @classmethod
    def from_variant(cls, variant: Mapping[str, Any], **kwargs: Any) -> ShiftMonitor | None:
        """The monitor of a manifest variant, or None when the bundle has no ``monitor`` entry."""
        ref = variant.get("monitor")
        return None if ref is None else cls(ref, **kwargs)

    @property
    def score_threshold(self) -> float:
        return self.thresholds["score"]

    @property
    def abstain_threshold(self) -> float:
        return self.thresholds["abstain"]

    def _bins(self, score: float, abstain: bool, ood_p: float | None) -> tuple[int, int, int]:
        ood_bin = -1
        if self.n_ref is not None and ood_p is not None:
            ood_bin = bisect.bisect_left(OOD_P_EDGES, ood_p)
        return bisect.bisect_right(self.edges, score), 0 if abstain else 1, ood_bin

    def update(self, score: float, abstain: bool, ood_p: float | None = None) -> str | None:
        """Add one scored record (and its out-of-distribution p-value, when the bundle has the
        test); every ``step`` records once ``window`` are in, run the tests. Returns the alarm word."""
        self._seen += 1
        if self.stride > 1 and (self._seen - 1) % self.stride:
            return self.alarm
        bins = self._bins(score, abstain, ood_p)
        self._buffer.append(bins)
        self._add(bins, 1)
        if len(self._buffer) > self.window:
            self._add(self._buffer.popleft(), -1)
        self._since_test += 1
        if len(self._buffer) == self.window and self._since_test >= self.step:
            self._test()
        return self.alarm

    def _add(self, bins: tuple[int, int, int], sign: int) -> None:
        self._counts["score"][bins[0]] += sign
        self._counts["abstain"][bins[1]] += sign
        if bins[2] >= 0:
            self._counts["ood_p"][bins[2]] += sign

    def _test(self) -> None:
        stats = {}
        for name, ref in self._refs.items():
            win = self._counts[name]
            stats[name] = float(two_sample_chi2(ref, win)) if win.sum() else 0.0
        self.last_statistics = tuple(stats.values())
        words = [name for name, value in stats.items() if value > self.thresholds[name]]
        self.alarm = "shift:" + "+".join(words) if words else None
        self.windows_tested += 1
        self.windows_alarmed += 1 if words else 0
        self._since_test = 0

    def state(self) -> dict[str, Any]:
        """For status records: the alarm, windows tested/alarmed, the last statistics."""
        return {
            "alarm": self.alarm,
            "windows_tested": self.windows_tested,
            "windows_alarmed": self.windows_alarmed,
            "last_statistics": None
            if self.last_statistics is None
            else [round(x, 4) for x in self.last_statistics],
            "thresholds": list(self.thresholds.values()),
            "window": self.window,
            "step": self.step,
        }

    def __repr__(self) -> str:
        return (
            f"ShiftMonitor(bins={len(self.edges) + 1}, m={self.m}, window={self.window}, step={self.step}, "
            f"false_alarm={self.false_alarm:g}, ood={self.n_ref is not None}, alarm={self.alarm!r})"
        )


def load_monitors(
    variant: Mapping[str, Any], *, num_classes: int, channels: int, options: Mapping[str, Any] | None = None
) -> tuple[ShiftMonitor | None, Any]:
    """The shift monitor and the per-frame :class:`rrise.ood.OodTest` of a manifest variant (each
    None when the variant's ``monitor`` entry lacks it), every value checked by key name.

    ``options`` (:data:`MONITOR_OPTIONS`): ``window``, ``false_alarm``, ``step``, ``stride`` for the
    shift test; ``ood`` (False: no per-frame test) and ``ood_rate`` (the per-frame flag rate, 0:
    p-values only) for the out-of-distribution test.
    """
    from .ood import OodTest

    opts = dict(options or {})
    unknown = sorted(set(opts) - set(MONITOR_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown monitor option(s) {', '.join(unknown)}; known: {', '.join(MONITOR_OPTIONS)}"
        )
    use_ood, rate = opts.pop("ood", True), opts.pop("ood_rate", None)
    entry = variant.get("monitor")
    if entry is None:
        return None, None
    if not isinstance(entry, Mapping):
        raise ValueError("monitor must be an object")
    ood = (
        OodTest.from_variant(variant, num_classes=num_classes, channels=channels, rate=rate)
        if use_ood
        else None
    )
    return ShiftMonitor(entry, ood=ood is not None, **opts), ood


def validate_monitor(entry: Any, *, num_classes: int, channels: int) -> None:
    """Check a manifest variant's ``monitor`` entry as the runtime will read it, without simulating
    anything: the shift reference (version, bins, counts, abstentions), its window, step and
    false-alarm settings, its stored thresholds and, where present, ``ood`` (:class:`rrise.ood.OodTest`).
    Raises ValueError naming the bad key (``monitor.…``)."""
    from .ood import OodTest

    if not isinstance(entry, Mapping):
        raise ValueError("monitor: must be an object")
    try:
        _reference_settings(entry)
        window, false_alarm = entry["window"], entry["false_alarm"]
        step = entry.get("step", window)
        _check_settings(window, false_alarm, step, 3 if "ood_threshold" in entry else 2)
        _stored_thresholds(entry, int(window), float(false_alarm), int(step), "ood_threshold" in entry)
    except KeyError as exc:
        raise ValueError(f"monitor.{exc.args[0]}: missing (a required key)") from None
    except ValueError as exc:
        raise ValueError(f"monitor: {exc}") from None
    if entry.get("ood") is not None:
        OodTest(entry["ood"], num_classes=num_classes, channels=channels, rate=0.0)


def expected_false_alarm_interval_s(window: int, false_alarm: float, fps: float) -> float:
    """Mean seconds between false alarms on in-distribution input: window / (fps · false_alarm)."""
    if fps <= 0 or false_alarm <= 0:
        return math.inf
    return window / (fps * false_alarm)
