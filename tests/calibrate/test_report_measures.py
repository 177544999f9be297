"""Like-for-like measures of the report: Cohen at another α from the same counts, violation rates over
all inputs with their detection limit, and well-formed report tables."""

from __future__ import annotations

import numpy as np
import pytest

from rrise.calibrate.cohen import cohen_from_counts
from rrise.calibrate.measures import detection_limit, violation_stats
from rrise.calibrate.report import _rules_section, format_markdown_table
from rrise.stats import clopper_pearson_lower, clopper_pearson_upper, norm_ppf


def test_cohen_from_counts_matches_clopper_pearson_at_each_alpha():
    sel = np.array([[40, 10, 0], [5, 45, 0], [20, 20, 10]])
    est = np.array([[990, 10, 0], [300, 700, 0], [545, 445, 10]])
    strict = cohen_from_counts(sel, est, sigma=0.25, alpha=0.001)
    loose = cohen_from_counts(sel, est, sigma=0.25, alpha=0.01)
    for alpha, (pred, radius, p_low) in ((0.001, strict), (0.01, loose)):
        np.testing.assert_allclose(p_low[:2], clopper_pearson_lower(np.array([990, 700]), 1000, alpha))
        assert list(pred[:2]) == [0, 1]
        np.testing.assert_allclose(radius[:2], 0.25 * norm_ppf(p_low[:2]))
    # input 2: Â = 0 (ties go to the first class), 545/1000 certifies at α = 0.01 but not at 0.001
    assert clopper_pearson_lower(545, 1000, 0.01) > 0.5 > clopper_pearson_lower(545, 1000, 0.001)
    assert strict[0][2] == -1 and strict[1][2] == 0.0
    assert loose[0][2] == 0 and loose[1][2] > 0
    assert np.all(loose[1] >= strict[1])  # same draws, less confidence: never a smaller radius


@pytest.mark.parametrize("p", [0.6, 0.9, 0.99, 0.999])
def test_detection_limit_is_where_the_upper_bound_test_starts_to_flag(p):
    n, level = 20_000, 0.001
    d = float(detection_limit(p, n, level)[0])
    k_star = round((p - d) * n)
    assert clopper_pearson_upper(k_star, n, level) < p <= clopper_pearson_upper(k_star + 1, n, level)
    # about z_(1−level) standard errors, so it shrinks as the reference grows
    se = np.sqrt(p * (1 - p) / n)
    assert 2.0 * se < d < 5.0 * se + 2.0 / n
    assert float(detection_limit(p, 10 * n, level)[0]) < d


def test_violation_rates_count_all_inputs_and_the_point_estimate():
    n_ref = 10_000
    # 4 inputs: certified at p̃ = 0.95 with reference frequencies 0.97 (fine), 0.949 (just above the
    # point estimate, invisible to the upper-bound test), 0.90 (a clear violation); one abstains.
    ref = np.array([[9700, 300], [9490, 510], [9000, 1000], [5000, 5000]])
    pred, p_low = np.array([0, 0, 0, -1]), np.array([0.95, 0.95, 0.95, 0.0])
    v = violation_stats(pred, p_low, ref, level=0.001)
    assert (v["violations"], v["certified"]) == (1, 3)
    assert v["above_point_estimate"]["count"] == 2 and v["above_point_estimate"]["of"] == 4
    assert v["above_point_estimate"]["rate"] == pytest.approx(0.5)
    lo, hi = v["above_point_estimate"]["ci95"]
    assert lo == pytest.approx(clopper_pearson_lower(2, 4, 0.025)) and hi == pytest.approx(
        clopper_pearson_upper(2, 4, 0.025)
    )
    assert v["above_upper_bound_over_all_inputs"]["rate"] == pytest.approx(0.25)
    assert v["detection_limit"]["largest over certified p̃"] == pytest.approx(
        float(detection_limit(0.95, n_ref, 0.001)[0])
    )


def _rows_have_header_width(text: str) -> None:
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    widths = {ln.count("|") for ln in table}
    assert len(widths) == 1, table


def test_report_tables_have_as_many_cells_as_columns():
    sel_row = {
        "rule": "one quantile",
        "certified_accuracy": {"0": 80.0, "0.25": 70.0, "0.5": 0.0, "0.75": 0.0},
        "mean_certified_accuracy": 37.5,
        "acr": 0.2,
        "abstain_pct": 10.0,
        "miss_rate": 0.001,
    }
    rules = {
        "chosen": "single",
        "selection": {
            "inputs": 400,
            "n_mc": 1000,
            "alpha": 0.01,
            "split": "selection",
            "radii": [0, 0.25, 0.5, 0.75],
            "rules": {"single": sel_row, "bins": {"rule": "3 bins", "error": "m too small"}},
        },
        "test": {
            "single": {
                "rule": "one quantile",
                "certified_accuracy": [0.8, 0.7, 0.0, 0.0],
                "acr": 0.2,
                "abstain_rate": 0.1,
            },
            "bins": {"rule": "3 bins", "error": "m too small"},
        },
    }
    lines = _rules_section(rules)
    blocks = "\n".join(lines).split("\n\n")
    for block in blocks:
        if block.strip().startswith("|"):
            _rows_have_header_width(block)
    assert any("could not run: m too small" in ln for ln in lines)
    metrics = {
        "radii": [0.0, 0.25],
        "methods": {
            "a": {"certified_accuracy": [0.5, 0.4], "acr": 0.1, "abstain_rate": 0.2},
            "b": {
                "certified_accuracy": [0.5, 0.4],
                "acr": 0.1,
                "abstain_rate": 0.2,
                "violations": violation_stats(np.array([0]), np.array([0.9]), np.array([[850, 150]])),
            },
        },
    }
    table = format_markdown_table(metrics)
    _rows_have_header_width(table)
    assert "1/1 (100.0%" in table


def test_adaptive_section_states_draws_rule_and_figure_with_full_rows():
    """The report's adaptive section: a row per adaptive row with its draws per query and their
    ratio to Cohen's, every row as wide as the header, the rows not run with why, and the bundled
    routing rule in words."""
    from rrise.calibrate.adaptive_eval import RowPlan, adaptive_rows
    from rrise.calibrate.report import _adaptive_lines
    from tests.calibrate.test_adaptive_eval import _synthetic

    test, _ = _synthetic(80, 1_000, seed=3)
    selection = _synthetic(80, 1_000, seed=4)[0]
    result = adaptive_rows(test, selection, 0.25, RowPlan(budgets=(0, 100), max_draws_fraction=0.05))
    for row in result["rows"].values():
        row["per_query_s"] = 1e-4 + row["mean_draws"] * 1e-6
    rule = next(r["routing"] for r in result["rows"].values() if r["kind"] == "adaptive")
    section = {
        **result,
        "bundled_routing": {**rule, "chosen_on": "selection", "max_draws_fraction": 0.05},
        "figure": "adaptive_cost.png",
        "note": "replayed",
    }
    lines = _adaptive_lines(section)
    table = "\n".join(ln for ln in lines if ln.startswith("|"))
    _rows_have_header_width(table)
    assert len(table.splitlines()) == 2 + len(result["rows"])
    cohen = next(k for k, r in result["rows"].items() if r["kind"] == "cohen")
    assert f"| {cohen} |" in table and "| 1.0000 |" in table  # Cohen's draws over Cohen's
    text = "\n".join(lines)
    assert "Routing rule in the bundle (`adaptive.routing`, chosen on the selection split)" in text
    assert f"at budget {rule['mc_budget']}" in text and "![cost and accuracy](adaptive_cost.png)" in text
    assert all(f"- {name}: not run: {why}" in text for name, why in result["not_run"].items())
    assert _adaptive_lines(None) == []


def test_agreement_counts_the_surrogates_class_against_the_monte_carlo_majority():
    from rrise.calibrate.evaluating import agreement_summary

    counts = np.array([[90, 10, 0], [30, 70, 0], [50, 50, 0], [40, 30, 30]])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.9, 0.0], [0.2, 0.7, 0.1]])
    out = agreement_summary({"counts": counts, "probs": probs})
    # rows 0 and 2 (a tie that includes the surrogate's class) agree; rows 1 and 3 do not
    assert out["calibration inputs"] == 4
    assert out["top class agrees"] == 0.5
    # MC's top class holds more than half the draws on rows 0 and 1 only: one of the two agrees
    assert out["top class agrees where MC's top class holds > 1/2 of the draws"] == 0.5
    assert agreement_summary({"counts": counts[:0], "probs": probs[:0]}) == {}
