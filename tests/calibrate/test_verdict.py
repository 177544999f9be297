"""The three lines `rrise build` ends with: RRISE as bundled beside Cohen MC at the same α, and next steps."""

from __future__ import annotations

from rrise.calibrate.verdict import verdict_lines

RADII = [0.0, 0.25, 0.5, 0.75]


def _metrics(rrise: list[float], cohen: list[float], adaptive: bool = True) -> dict:
    section = {
        "radii": RADII,
        "bundled_row": "Adaptive (budget 256, routing rule chosen on the selection split, α_MC=0.001)",
        "rows": {
            "RRISE alone (the surrogate, no draws)": {"kind": "surrogate", "certified_accuracy": rrise},
            "Adaptive (budget 256, routing rule chosen on the selection split, α_MC=0.001)": {
                "kind": "adaptive", "mc_budget": 256, "mean_draws": 12.5,
                "certified_accuracy": [0.9, 0.8, 0.7, 0.5],
            },
        },
    }  # fmt: skip
    return {
        "radii": RADII,
        "calibration": {"alpha": 0.05},
        "methods": {
            "RRISE (margin, one quantile, α=0.01), recomputed": {"n": 100, "certified_accuracy": [1, 1, 1, 1],
                                                                 "abstain_rate": 0.0},
            "RRISE (margin, one quantile, α=0.05), as bundled": {"n": 100, "certified_accuracy": rrise,
                                                                 "abstain_rate": 0.12},
            "Cohen MC (n0=64, n=1000, α=0.001)": {"n": 100, "certified_accuracy": [1] * 4, "abstain_rate": 0},
            "Cohen MC (n0=64, n=1000, α=0.05), recomputed from the same counts": {
                "n": 100, "certified_accuracy": cohen, "abstain_rate": 0.07},
        },
        "adaptive": section if adaptive else None,
    }  # fmt: skip


def test_far_behind_names_the_adaptive_row_and_its_numbers() -> None:
    lines = verdict_lines(_metrics([0.9, 0.6, 0.3, 0.1], [0.92, 0.8, 0.6, 0.3]))
    assert len(lines) == 3
    assert "α=0.05" in lines[0] and "100 test inputs" in lines[0]
    assert "RRISE as bundled 90.0% / 60.0% / 30.0%" in lines[0]
    assert "Cohen MC 92.0% / 80.0% / 60.0%" in lines[0]  # the row at RRISE's α, not Cohen's own 0.001
    assert "RRISE 12.0%" in lines[1] and "Cohen MC 7.0%" in lines[1]
    assert "30.0 points behind" in lines[2] and "--profile" in lines[2]
    assert "`rrise run --mc-budget 256` certifies 90.0% / 80.0% / 70.0% with 12.5 mean" in lines[2]


def test_far_behind_without_an_adaptive_section_still_says_what_to_do() -> None:
    lines = verdict_lines(_metrics([0.9, 0.6, 0.3, 0.1], [0.92, 0.8, 0.6, 0.3], adaptive=False))
    assert "more images" in lines[2] and "rrise run --mc-budget N" in lines[2]


def test_the_best_adaptive_row_is_quoted_with_its_flags() -> None:
    m = _metrics([0.9, 0.6, 0.3, 0.1], [0.92, 0.8, 0.6, 0.3])
    m["adaptive"]["rows"]["Adaptive (--require-radius 0.5, budget 256, α_MC=0.001)"] = {
        "kind": "required", "mc_budget": 256, "require_radius": 0.5, "mean_draws": 80.0,
        "certified_accuracy": [0.9, 0.85, 0.75, 0.5],
    }  # fmt: skip
    line = verdict_lines(m)[2]
    assert "`rrise run --mc-budget 256 --require-radius 0.5` certifies 90.0% / 85.0% / 75.0%" in line


def test_close_to_cohen_says_the_bundle_is_ready() -> None:
    lines = verdict_lines(_metrics([0.9, 0.78, 0.57, 0.1], [0.92, 0.8, 0.6, 0.3]))
    assert "within 5 points" in lines[2] and "behind" not in lines[2]


def test_no_bundled_row_is_said_not_invented() -> None:
    m = _metrics([0.9, 0.6, 0.3, 0.1], [0.92, 0.8, 0.6, 0.3])
    m["methods"] = {k: v for k, v in m["methods"].items() if "as bundled" not in k}
    assert verdict_lines(m) == ["[verdict] no RRISE row was bundled: see report/report.md"]
