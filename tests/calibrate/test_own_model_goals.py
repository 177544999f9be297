"""The own-model benchmark's goals, on made-up reports: each goal fails when its number misses."""

from __future__ import annotations

import copy

import pytest

from benchmarks.bench_own_model import goals, result_name

RADII = ("0.0", "0.25", "0.5", "0.75")
OURS = "RRISE (probit, α=0.01), as bundled"


def _row(acc: tuple[float, ...], abstain: float) -> dict:
    return {"certified_accuracy": dict(zip(RADII, acc, strict=True)), "abstain_rate": abstain}


def _form(rrise: tuple[float, ...], abstain: float = 0.08, agree: float = 0.99, seconds: float = 900) -> dict:
    adaptive = {
        "RRISE alone": {**_row(rrise, abstain), "kind": "surrogate", "mean_draws": 0.0,
                        "draws_ratio_to_cohen": 0.0},
        "Adaptive (budget 1000)": {**_row((0.85, 0.80, 0.72, 0.0), 0.05), "kind": "adaptive",
                                   "mean_draws": 60.0, "draws_ratio_to_cohen": 0.057},
        "Cohen MC": {**_row((0.855, 0.80, 0.725, 0.0), 0.04), "kind": "cohen", "mean_draws": 1050.0,
                     "draws_ratio_to_cohen": 1.0},
    }  # fmt: skip
    return {
        "table": {
            OURS: _row(rrise, abstain),
            "Cohen MC (n0=50, n=1000, α=0.01), recomputed for comparison from the same counts": _row(
                (0.855, 0.80, 0.725, 0.0), 0.04
            ),
        },
        "calibration": {"alpha": 0.01},
        "agreement": {"top class agrees": agree},
        "build_seconds": seconds,
        "adaptive": adaptive,
    }


def test_goals_met_within_the_limits():
    out = goals({"onnx": _form((0.82, 0.76, 0.6, 0.0)), "factory": _form((0.825, 0.765, 0.6, 0.0))}, "quick")
    onnx = out["onnx"]
    assert onnx["rrise_gap_to_cohen"] == {"0.0": 0.035, "0.25": 0.04}
    assert onnx["rrise_within_limit"] and onnx["abstain_met"] and onnx["agreement_met"] and onnx["build_met"]
    assert onnx["adaptive"]["met"] and onnx["adaptive"]["row"] == "Adaptive (budget 1000)"
    assert out["onnx_vs_factory"]["met"]


@pytest.mark.parametrize(
    ("change", "goal"),
    [
        (lambda f: f["table"][OURS]["certified_accuracy"].update({"0.25": 0.7}),
         "rrise_within_limit"),
        (lambda f: f["table"][OURS].update(abstain_rate=0.2), "abstain_met"),
        (lambda f: f["agreement"].update({"top class agrees": 0.97}), "agreement_met"),
        (lambda f: f.update(build_seconds=1300), "build_met"),
    ],
)  # fmt: skip
def test_each_goal_fails_when_its_number_misses(change, goal):
    form = copy.deepcopy(_form((0.82, 0.76, 0.6, 0.0)))
    change(form)
    assert not goals({"onnx": form}, "quick")["onnx"][goal]


def test_adaptive_goal_needs_both_accuracy_and_cost():
    form = _form((0.82, 0.76, 0.6, 0.0))
    form["adaptive"]["Adaptive (budget 1000)"]["draws_ratio_to_cohen"] = 0.2
    assert not goals({"onnx": form}, "quick")["onnx"]["adaptive"]["met"]
    form = _form((0.82, 0.76, 0.6, 0.0))
    form["adaptive"]["Adaptive (budget 1000)"]["certified_accuracy"]["0.5"] = 0.70
    got = goals({"onnx": form}, "quick")["onnx"]["adaptive"]
    assert not got["met"] and got["largest_gap"] == pytest.approx(0.025)


def test_a_larger_profile_asks_for_three_points_at_every_radius_to_half():
    form = _form((0.84, 0.78, 0.69, 0.0))
    assert goals({"onnx": form}, "quick")["onnx"]["rrise_within_limit"]
    larger = goals({"onnx": form}, "medium")["onnx"]
    assert set(larger["rrise_gap_to_cohen"]) == {"0.0", "0.25", "0.5"}
    assert not larger["rrise_within_limit"]  # 3.5 points behind at r = 0.5


def test_onnx_far_from_the_factory_form_misses():
    out = goals({"onnx": _form((0.80, 0.74, 0.6, 0.0)), "factory": _form((0.83, 0.76, 0.6, 0.0))}, "quick")
    assert not out["onnx_vs_factory"]["met"]
    assert out["onnx_vs_factory"]["factory_minus_onnx"]["0.0"] == pytest.approx(0.03)


def test_result_name_names_architecture_size_profile_budget_and_tag():
    assert result_name([]) == "own_model-resnet40/quick"
    assert result_name(["--arch", "mobilenet", "--size", "64", "--budget-minutes", "20"]) == (
        "own_model-mobilenet64/quick-budget20"
    )
    assert result_name(["--profile", "medium", "--tag", "now"]) == "own_model-resnet40/medium-now"
