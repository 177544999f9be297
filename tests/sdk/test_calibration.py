"""The calibration home (rrise.calibration): spec → conformalize → Calibration, its codec, PAC with bins."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import binom

from rrise import Calibration, CalibrationSpec, certify_from_probs, conformalize
from rrise.calibration import conformal_rank, mondrian_quantiles

SPEC = CalibrationSpec(sigma=0.25, n_mc=1000, alpha=0.1, beta=0.01)


def _problem(m: int, rng: np.random.Generator, k: int = 4):
    """Probabilities and MC counts of a synthetic surrogate: top class 0 with ŝ in (0.5, 1)."""
    top = rng.uniform(0.55, 0.999, m)
    probs = np.column_stack([top, *(np.full(m, (1 - top) / (k - 1)) for _ in range(k - 1))])
    p_true = np.clip(top + rng.normal(0, 0.03, m), 0.5, 1.0)
    hits = rng.binomial(SPEC.n_mc, p_true)
    counts = np.column_stack([hits, SPEC.n_mc - hits, *(np.zeros(m, np.int64) for _ in range(k - 2))])
    return probs, counts.astype(np.int64)


def test_conformalize_records_its_spec_and_provenance():
    probs, counts = _problem(400, np.random.default_rng(0))
    cal = conformalize(SPEC, probs, counts, dataset="toy", base_sha256="a" * 64, surrogate_sha256="b" * 64)
    assert cal.spec == SPEC and cal.m == 400 and math.isfinite(cal.quantile)
    assert (cal.dataset, cal.base_sha256, cal.surrogate_sha256) == ("toy", "a" * 64, "b" * 64)
    # recalibrating other numerics is one call on the record and keeps what made it
    sharper = probs**1.5 / (probs**1.5).sum(1, keepdims=True)
    again = cal.recalibrate(sharper, counts, surrogate_sha256="c" * 64)
    assert again.spec == SPEC and again.base_sha256 == "a" * 64 and again.surrogate_sha256 == "c" * 64
    assert again.quantile > cal.quantile  # a more confident variant needs a larger correction


def test_codec_round_trips_through_json():
    probs, counts = _problem(600, np.random.default_rng(1))
    spec = replace(SPEC, delta=0.1, bin_edges=(0.8,), score_map_x=(0.0, 2.0), score_map_y=(-0.1, 1.8))
    cal = conformalize(spec, probs, counts, base_sha256="d" * 64)
    record = json.loads(json.dumps(cal.to_dict(), allow_nan=False))
    back = Calibration.from_dict(record)
    assert back == cal
    assert "surrogate_sha256" not in record  # optional keys only when set


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("alpha", 2, "alpha must be a finite number in"),
        ("beta", -1, "beta must be a finite number in"),
        ("sigma", "0.25", "sigma must be a number"),
        ("n_mc", 10.5, "n_mc must be a positive integer"),
        ("quantile", "lots", "quantile must be a number"),
        ("score", "cubic", "unknown score transform"),
        ("p_cap", 0.5, "p_cap 0.5 is not beta"),
        ("base_sha256", "abc", "base_sha256 must be a sha256"),
        ("bin_edges", "0.5", "bin_edges must be a list"),
    ],
)
def test_codec_refuses_bad_values_by_name(key, value, match):
    record = Calibration(sigma=0.25, quantile=0.5, alpha=0.01, beta=0.001, n_mc=10_000, m=3000).to_dict()
    record[key] = value
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict(record)
    del record[key]
    if key in ("alpha", "beta", "sigma", "n_mc", "quantile", "score"):
        with pytest.raises(ValueError, match=f"lacks {key}"):
            Calibration.from_dict(record)


def test_codec_refuses_a_sigma_that_disagrees_with_smoothing():
    record = Calibration(sigma=0.25, quantile=0.5, alpha=0.01, beta=0.001, n_mc=10_000, m=3000).to_dict()
    assert Calibration.from_dict(record, sigma=0.25).sigma == 0.25
    with pytest.raises(ValueError, match="disagrees with smoothing sigma 0.5"):
        Calibration.from_dict(record, sigma=0.5)


def test_max_radius_is_the_largest_radius_the_rule_gives():
    cal = Calibration(sigma=0.25, quantile=0.4, alpha=0.01, beta=0.001, n_mc=10_000, m=3000)
    best = certify_from_probs(np.array([1.0, 0.0]), cal)
    assert cal.max_radius() == pytest.approx(best.radius, rel=1e-12)
    assert replace(cal, quantile=10.0).max_radius() == 0.0


def test_pac_with_bins_holds_in_every_bin_at_once_by_simulation():
    """With δ, G bins, the chance over calibration draws that ANY bin's conditional coverage falls
    below 1 − α must be ≤ δ. Scores are uniform within each bin, so a bin's coverage is F(q̂) = q̂."""
    alpha, delta, per_bin, reps, g = 0.1, 0.1, 300, 600, 4
    spec = replace(SPEC, alpha=alpha, delta=delta, bin_edges=(0.25, 0.5, 0.75))
    rng = np.random.default_rng(7)
    top_prob = np.repeat([0.1, 0.3, 0.6, 0.9], per_bin)  # bin of each input

    def failure_rate(bin_delta: float) -> float:
        fails = 0
        for _ in range(reps):
            q = mondrian_quantiles(rng.uniform(size=g * per_bin), top_prob, spec.bin_edges, alpha, bin_delta)
            fails += min(q) < 1 - alpha
        return fails / reps

    assert spec.bin_delta == pytest.approx(delta / g)
    rate = failure_rate(spec.bin_delta)
    assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / reps)
    # Exact: the rank at δ/G fails in one bin with P(Bin(m, 1−α) ≥ k) ≤ δ/G; the union is ≤ δ.
    k = conformal_rank(per_bin, alpha, spec.bin_delta)
    assert 1 - (1 - binom.sf(k - 1, per_bin, 1 - alpha)) ** g <= delta
    # The old rule (δ in every bin) fails far more often than δ: the test has power.
    assert failure_rate(delta) > delta + 3 * math.sqrt(delta * (1 - delta) / reps)


def test_conformalize_uses_the_per_bin_delta():
    probs, counts = _problem(3000, np.random.default_rng(3))
    spec = replace(SPEC, delta=0.2, bin_edges=(0.8,))
    cal = conformalize(spec, probs, counts)
    plain = replace(spec, delta=0.1)  # δ/G with G = 2, taken directly per bin
    top = probs.max(1)
    from rrise.calibration import mc_lower_bounds
    from rrise.scores import conformal_scores

    scores = conformal_scores(top, mc_lower_bounds(counts, probs.argmax(1), SPEC.n_mc, SPEC.beta), spec.p_cap)
    assert cal.bin_quantiles == mondrian_quantiles(scores, top, spec.bin_edges, spec.alpha, plain.delta)


def test_clip_at_abstention_is_recorded_only_when_on_and_an_old_record_reads_as_off():
    probs, counts = _problem(400, np.random.default_rng(5))
    on = conformalize(replace(SPEC, clip_at_abstention=True), probs, counts)
    off = conformalize(SPEC, probs, counts)
    assert on.to_dict()["clip_at_abstention"] is True and "clip_at_abstention" not in off.to_dict()
    assert Calibration.from_dict(on.to_dict()) == on and Calibration.from_dict(off.to_dict()).spec == SPEC
    assert on.quantile <= off.quantile
    with pytest.raises(ValueError, match="clip_at_abstention must be true or false"):
        Calibration.from_dict({**on.to_dict(), "clip_at_abstention": "yes"})
