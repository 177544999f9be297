"""The offline evaluation of adaptive certification (rrise.calibrate.adaptive_eval) on synthetic counts."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from rrise.calibrate.adaptive_eval import (
    BY_MC,
    BY_SURROGATE,
    EvalSplit,
    RoutingRule,
    RoutingSearch,
    RowPlan,
    adaptive_certify_offline,
    adaptive_rows,
    choose_routing_rule,
    plot_cost_accuracy,
    reference_violations_check,
    replayed_draws,
)
from rrise.certificate import CertificateBatch
from rrise.runtime.adaptive import McOptions
from rrise.sequential import SequentialOptions, required_probability, sequential_test
from rrise.stats import norm_cdf, norm_ppf

SIGMA = 0.25
K = 4


def _synthetic(n_inputs: int, n_draws: int, seed: int, n0: int = 50) -> tuple[EvalSplit, np.ndarray]:
    """Inputs with a known class probability ``p`` of the surrogate's class, stored draws from it, and a
    conservative surrogate certificate (ŝ ≈ p, calibrated p̃ well below it). Returns (split, p)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n_inputs)
    top = np.where(rng.random(n_inputs) < 0.9, labels, (labels + 1) % K)
    p = np.clip(1.0 - rng.beta(0.6, 6.0, n_inputs), 0.3, 0.99999)
    probs = np.tile(((1.0 - p) / (K - 1))[:, None], (1, K))
    probs[np.arange(n_inputs), top] = p
    counts = np.stack([rng.multinomial(n_draws, q) for q in probs])
    counts_selection = np.stack([rng.multinomial(n0, q) for q in probs])
    score = np.clip(p + rng.normal(0, 0.01, n_inputs), 0.01, 0.99999)
    p_tilde = np.asarray(norm_cdf(np.asarray(norm_ppf(score)) - 0.8))
    abstain = p_tilde <= 0.5
    radius = np.where(abstain, 0.0, SIGMA * np.asarray(norm_ppf(np.maximum(p_tilde, 0.5))))
    cert = CertificateBatch(top_class=top, abstain=abstain, radius=radius, score=score, p_lower=p_tilde)
    return EvalSplit(cert, labels, counts, counts_selection), p


@pytest.fixture(scope="module")
def test_split():
    return _synthetic(240, 2_000, seed=1)


@pytest.fixture(scope="module")
def selection_split():
    return _synthetic(240, 2_000, seed=2)[0]


def _chi2_pvalue(observed: np.ndarray, m: int, p: float) -> float:
    """Goodness of fit of integer samples to Binomial(m, p), cells pooled to expected counts >= 5."""
    pmf = stats.binom.pmf(np.arange(m + 1), m, p) * len(observed)
    obs = np.bincount(observed, minlength=m + 1).astype(float)
    cells_obs, cells_exp, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(obs, pmf):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            cells_obs.append(acc_o)
            cells_exp.append(acc_e)
            acc_o = acc_e = 0.0
    cells_obs[-1] += acc_o
    cells_exp[-1] += acc_e
    return float(stats.chisquare(cells_obs, cells_exp).pvalue)


def _replay(k_of: callable, n: int, batches: tuple[int, ...], reps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((reps, len(batches)), dtype=np.int64)
    for i in range(reps):
        draw = replayed_draws(k_of(rng), n, rng)
        out[i] = [draw(m) for m in batches]
    return out


def test_replayed_draws_follow_the_binomial_law():
    """Stored i.i.d. draws replayed without replacement are i.i.d. draws: each batch, and their sum,
    Binomial; the same test rejects draws replayed from a FIXED count (its law is hypergeometric)."""
    n, p, batches, reps = 200, 0.7, (60, 40), 4_000
    iid = _replay(lambda rng: int(rng.binomial(n, p)), n, batches, reps, seed=0)
    for j, m in enumerate(batches):
        assert _chi2_pvalue(iid[:, j], m, p) > 1e-3
    assert _chi2_pvalue(iid.sum(axis=1), sum(batches), p) > 1e-3
    assert abs(np.corrcoef(iid[:, 0], iid[:, 1])[0, 1]) < 0.06  # independent batches
    fixed = _replay(lambda rng: int(n * p), n, batches, reps, seed=0)
    assert _chi2_pvalue(fixed.sum(axis=1), sum(batches), p) < 1e-6


def test_the_sequential_test_stops_alike_on_replayed_and_on_fresh_draws():
    """The whole path: the runtime's sequential test fed replayed stored draws stops after as many
    draws, and with the same verdict, as when fed fresh Binomial draws (same law, two samples)."""
    n, p, reps = 1_024, 0.985, 600
    options = SequentialOptions(budget=n, batch_size=64)
    required = required_probability(0.5, SIGMA)
    rng = np.random.default_rng(11)
    replayed = [
        sequential_test(replayed_draws(int(rng.binomial(n, p)), n, rng), required, options)
        for _ in range(reps)
    ]
    fresh = [sequential_test(lambda m: int(rng.binomial(m, p)), required, options) for _ in range(reps)]
    cells = sorted({(r.draws, r.stop) for r in replayed + fresh})
    table = np.array(
        [[sum((r.draws, r.stop) == c for r in runs) for c in cells] for runs in (replayed, fresh)]
    )
    table = table[:, table.sum(axis=0) >= 10]
    assert table.shape[1] >= 3  # the stopping time does vary
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_replayed_draws_never_invent_draws():
    draw = replayed_draws(3, 10, np.random.default_rng(0))
    assert draw(6) + draw(4) == 3
    with pytest.raises(ValueError, match="stored draws left"):
        draw(1)


def test_budget_zero_is_the_surrogate(test_split):
    split, _ = test_split
    cert = split.certificates
    rec = adaptive_certify_offline(cert, split.counts, SIGMA, McOptions())
    np.testing.assert_array_equal(rec.pred, cert.pred)
    np.testing.assert_array_equal(rec.radius, np.where(cert.abstain, 0.0, cert.radius))
    np.testing.assert_array_equal(rec.p_lower, cert.p_lower)
    assert not rec.mc_draws.any()
    assert list(rec.certified_by) == [None if a else BY_SURROGATE for a in cert.abstain]


def test_required_radius_only_adds_to_the_surrogate(test_split):
    split, p = test_split
    cert, required = split.certificates, 0.5
    mc = McOptions(mc_budget=1_024, require_radius=required)
    rec = adaptive_certify_offline(cert, split.counts, SIGMA, mc, seed=3)
    s_radius = np.where(cert.abstain, 0.0, cert.radius)
    short = cert.radius < required
    assert np.all(rec.radius >= s_radius)
    assert set(np.unique(rec.pred)) <= set(np.unique(cert.top_class)) | {-1}
    certified = rec.pred >= 0
    np.testing.assert_array_equal(rec.pred[certified], cert.top_class[certified])  # never another class
    np.testing.assert_array_equal(rec.mc_draws > 0, short)  # draws exactly where the surrogate falls short
    by_mc = rec.certified_by == BY_MC
    assert by_mc.sum() >= 10 and np.all(rec.radius[by_mc] > s_radius[by_mc])
    assert np.all(rec.radius[rec.mc_stop == "success"] >= required)
    assert np.count_nonzero(rec.p_lower[by_mc] > p[by_mc]) <= 1  # the MC bound holds (level 0.001)
    assert rec.mc_draws.max() <= 1_024


def test_budgets_above_the_stored_draws_are_refused(test_split):
    split, _ = test_split
    with pytest.raises(ValueError, match="--mc-budget 4096 is above the 2000 draws stored"):
        adaptive_certify_offline(
            split.certificates, split.counts, SIGMA, McOptions(mc_budget=4096, require_radius=0.5)
        )
    with pytest.raises(ValueError, match="--mc-deadline-ms"):
        adaptive_certify_offline(
            split.certificates,
            split.counts,
            SIGMA,
            McOptions(mc_budget=512, mc_deadline_ms=5.0, require_radius=0.5),
        )
    with pytest.raises(ValueError, match="routing rule"):
        adaptive_certify_offline(split.certificates, split.counts, SIGMA, McOptions(mc_budget=512))


def test_routing_rule_is_chosen_within_its_draws_on_selection(selection_split):
    s = selection_split
    mc = McOptions(mc_budget=1_024)
    loose = choose_routing_rule(
        s.certificates, s.labels, s.counts, SIGMA, mc, RoutingSearch(max_mean_draws=500)
    )
    tight = choose_routing_rule(
        s.certificates, s.labels, s.counts, SIGMA, mc, RoutingSearch(max_mean_draws=0)
    )
    assert tight.score_below == 0.0 and tight.selection_mean_draws == 0.0
    assert 0 < loose.selection_mean_draws <= 500
    assert np.mean(loose.selection_certified_accuracy) > np.mean(tight.selection_certified_accuracy)
    replayed = adaptive_certify_offline(s.certificates, s.counts, SIGMA, mc, route=loose, seed=0)
    assert replayed.mc_draws.mean() == pytest.approx(loose.selection_mean_draws, abs=1e-3)
    d = loose.to_dict()
    assert d["chosen_on"] == "selection split" and d["mc_budget"] == 1_024 and "validity" in d
    assert RoutingRule.from_dict(json.loads(json.dumps(d))) == loose
    everything = RoutingRule(score_below=math.inf, target_radius=0.5)
    assert RoutingRule.from_dict(everything.to_dict()) == everything
    with pytest.raises(ValueError, match="target_radius"):
        RoutingRule.from_dict({"score_below": 0.9})
    stepping = RoutingRule(score_below=0.99, target_radius=0.5, step_down=True)
    assert RoutingRule.from_dict(json.loads(json.dumps(stepping.to_dict()))) == stepping


def test_a_step_down_rule_certifies_at_least_as_much_as_the_same_rule_without(selection_split):
    """Routed frames the target is out of reach for keep drawing for half of it, then any radius:
    certified accuracy at every radius never falls (same draws replayed), and draws only grow."""
    s = selection_split
    mc = McOptions(mc_budget=1_024)
    plain = RoutingRule(score_below=math.inf, target_radius=0.5)
    stepped = replace(plain, step_down=True)
    a = adaptive_certify_offline(s.certificates, s.counts, SIGMA, mc, route=plain, seed=0)
    b = adaptive_certify_offline(s.certificates, s.counts, SIGMA, mc, route=stepped, seed=0)
    ok_a, ok_b = a.pred == s.labels, b.pred == s.labels
    for r in (0.0, 0.125, 0.25, 0.5):
        assert np.sum(ok_b & (b.radius >= r)) >= np.sum(ok_a & (a.radius >= r))
    assert np.all(b.mc_draws >= a.mc_draws) and b.mc_draws.sum() > a.mc_draws.sum()
    assert np.sum(ok_b & (b.radius >= 0.25)) > np.sum(ok_a & (a.radius >= 0.25))


def test_rows_never_look_at_test_inputs_to_route(test_split, selection_split, tmp_path):
    split, _ = test_split
    other, _ = _synthetic(240, 2_000, seed=9)
    plan = RowPlan(budgets=(0, 100, 1_000, 10_000), required_radii=(0.0, 0.5), max_draws_fraction=0.05)
    reference = np.stack([np.random.default_rng(5).multinomial(100_000, np.full(K, 1 / K))] * 20)
    check = reference_violations_check(np.arange(20), reference)
    result = adaptive_rows(split, selection_split, SIGMA, plan, violations=check)
    again = adaptive_rows(other, selection_split, SIGMA, plan)
    rows = result["rows"]
    routed = {k: v for k, v in rows.items() if v["kind"] == "adaptive"}
    assert [v["mc_budget"] for v in routed.values()] == [100, 1_000, 2_000]  # capped at the stored n
    rules = [v["routing"] for v in routed.values()]
    assert rules == [v["routing"] for v in again["rows"].values() if v["kind"] == "adaptive"]
    cohen = next(v for v in rows.values() if v["kind"] == "cohen")
    assert cohen["draws_ratio_to_cohen"] == 1.0 and cohen["mean_draws"] == 2_050
    alone = next(v for v in rows.values() if v["kind"] == "surrogate")
    assert alone["mean_draws"] == 0 and alone["certified_by"][BY_MC] == 0
    required = [v for v in rows.values() if v["kind"] == "required"]
    assert [v["require_radius"] for v in required] == [0.0, 0.5]
    assert required[1]["certified_accuracy"][2] >= alone["certified_accuracy"][2]
    for v in routed.values():
        assert v["mean_draws"] <= v["mc_budget"] and v["violations"]["inputs"] == 20
    figure = plot_cost_accuracy(result, tmp_path / "cost.png")
    assert figure.stat().st_size > 1_000


def test_benchmark_states_every_goal_beside_its_number(test_split, selection_split, tmp_path, monkeypatch):
    """The benchmark's contract on synthetic splits (the work folder's loaders replaced): every goal
    with its measured number and verdict, rows at both routing allowances, the figure written."""
    from types import SimpleNamespace

    from benchmarks import bench_adaptive

    with pytest.raises(SystemExit, match="not a finished work folder"):
        bench_adaptive._open(tmp_path / "missing")
    split, _ = test_split
    w = SimpleNamespace(config=SimpleNamespace(sigma=SIGMA), prof=SimpleNamespace(mc_alpha=0.001))
    monkeypatch.setattr(bench_adaptive, "_open", lambda workdir: (w, None))
    monkeypatch.setattr(bench_adaptive, "_splits", lambda w, cal: (split, selection_split, np.arange(240)))
    monkeypatch.setattr(bench_adaptive, "_violations", lambda w, index: None)
    figure = tmp_path / "cost.png"
    out = bench_adaptive.main(["--workdir", str(tmp_path), "--budgets", "0", "1000", "--figure", str(figure)])
    assert figure.is_file() and out["mc_alpha"] == 0.001 and out["test_inputs"] == 240
    kinds = [row["kind"] for row in out["rows"].values()]
    assert kinds.count("adaptive") == 2 and kinds.count("cohen") == 1 and kinds.count("surrogate") == 1
    texts = [g["goal"] for g in out["goals"]]
    assert len(texts) == 8 and any("--require-radius 0.5" in t for t in texts)
    cohen = next(v for v in out["rows"].values() if v["kind"] == "cohen")
    one_row = out["goals"][0]  # one routed row for r = 0, 0.25, 0.5 together: its gaps are that row's
    gaps = [
        100 * (cohen["certified_accuracy"][i] - out["rows"][one_row["row"]]["certified_accuracy"][i])
        for i in range(3)
    ]
    assert one_row["points_below_cohen"] == pytest.approx(gaps, abs=1e-4)
    assert one_row["met"] == (max(gaps) <= 0.5)
    for g in out["goals"]:
        assert isinstance(g["met"], bool) and g["row"] in out["rows"]
        row = out["rows"][g["row"]]
        if "draws_ratio_to_cohen" in g:
            assert g["draws_ratio_to_cohen"] == row["draws_ratio_to_cohen"]
        if "abstain_points_above_cohen" in g:
            expected = 100 * (row["abstain_rate"] - cohen["abstain_rate"])
            assert g["abstain_points_above_cohen"] == pytest.approx(expected, abs=1e-4)
            assert g["met"] == (abs(expected) <= 0.5)


def test_benchmark_results_at_another_level_keep_their_own_file():
    from benchmarks import bench_adaptive
    from benchmarks.__main__ import result_name

    assert result_name("adaptive", ["--workdir", "w"]) == "adaptive"
    assert result_name("adaptive", ["--workdir", "w", "--mc-alpha", "0.01"]) == "adaptive-alpha0.01"
    assert result_name("adaptive", ["--tag", "s0.5", "--mc-alpha", "0.01"]) == "adaptive-s0.5-alpha0.01"
    assert result_name("mc", ["--quick"]) == "mc"
    args = bench_adaptive._parse(["--workdir", "w", "--mc-alpha", "0.01"])
    assert args.figure.name == "adaptive-alpha0.01_cost_accuracy.png"
