"""A rule the bundle would refuse (an infinite conformal quantile) is never the one the selection picks."""

from __future__ import annotations

import dataclasses

import numpy as np

import rrise.calibrate.rules as rules_module
from rrise.calibrate.report import _rules_section
from rrise.calibrate.rules import compare_rules

N_MC = 1000


def _selection(seed: int = 0, size: int = 800) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes; an honest surrogate, MC counts from the same p."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.55, 1.0, size)
    probs = np.stack([p, 1 - p], axis=1)
    k0 = rng.binomial(N_MC, p)
    return probs, np.stack([k0, N_MC - k0], axis=1), np.zeros(size, dtype=np.int64)


def _compare(probs, counts, labels) -> dict:
    return compare_rules(probs, counts, labels, n_mc=N_MC, sigma=0.25, alpha=0.05, beta=0.001, repeats=6)


def _infinite_for(monkeypatch, doomed: set[str]) -> None:
    """Make the conformal quantile of the rules in ``doomed`` infinite (the rule being calibrated is
    the one :func:`fit_rule` fitted last: the comparison fits, then calibrates, rule by rule)."""
    real_fit, real_conformalize, current = rules_module.fit_rule, rules_module.conformalize, [""]

    def fit(rule, *args, **kwargs):
        current[0] = rule.name
        return real_fit(rule, *args, **kwargs)

    def conformalize(spec, *args, **kwargs):
        cal = real_conformalize(spec, *args, **kwargs)
        return dataclasses.replace(cal, quantile=float("inf")) if current[0] in doomed else cal

    monkeypatch.setattr(rules_module, "fit_rule", fit)
    monkeypatch.setattr(rules_module, "conformalize", conformalize)


def test_a_rule_with_an_infinite_quantile_is_excluded_and_said(monkeypatch) -> None:
    probs, counts, labels = _selection()
    winner = _compare(probs, counts, labels)["winner"]
    _infinite_for(monkeypatch, {winner})
    result = _compare(probs, counts, labels)
    assert result["winner"] != winner
    assert set(result["excluded"]) == {winner}
    assert "infinite on 6 of 6" in result["excluded"][winner]
    assert result["rules"][winner]["excluded"] == result["excluded"][winner]
    text = "\n".join(_rules_section({"chosen": result["winner"], "selection": result}))
    rule = result["rules"][winner]["rule"]
    assert f"| {winner} ({rule}) — excluded: its calibration quantile was infinite" in text


def test_when_every_rule_is_infinite_somewhere_the_least_often_infinite_stay(monkeypatch) -> None:
    probs, counts, labels = _selection()
    _infinite_for(monkeypatch, {r.name for r in rules_module.RULES})
    result = _compare(probs, counts, labels)
    assert result["excluded"] == {} and result["winner"] in result["rules"]
