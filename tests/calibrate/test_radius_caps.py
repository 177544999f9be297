"""`rrise build` says, before it spends a draw, the largest radius its sizes can certify."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from rrise.calibrate.build_cost import log_caps, radius_caps
from rrise.calibrate.profiles import get_profile
from rrise.stats import norm_ppf


def test_caps_follow_the_sizes() -> None:
    quick = get_profile("quick")
    caps = radius_caps(quick, 0.5)
    assert caps["rrise"] == pytest.approx(0.5 * norm_ppf(0.001 ** (1 / 1000)))
    assert caps["cohen"] == pytest.approx(0.5 * norm_ppf(0.001 ** (1 / 1000)))
    lifted = radius_caps(replace(quick, cap_draws=30_000), 0.5)
    assert lifted["rrise"] == pytest.approx(0.5 * norm_ppf(0.001 ** (1 / 31_000)))
    assert radius_caps(get_profile("full"), 0.25)["rrise"] > caps["rrise"] / 2


def test_a_calibration_smaller_than_cohens_test_is_called_out() -> None:
    lines: list[str] = []
    small = replace(get_profile("quick"), n_cal=500)
    log_caps(SimpleNamespace(prof=small, config=SimpleNamespace(sigma=0.25)), lines.append)
    assert lines[0].startswith("[build] largest radius these sizes can certify: RRISE 0.551")
    assert "Cohen 0.616" in lines[0]
    assert "N_cal = 500 caps RRISE below Cohen's 0.616" in lines[1]
    same: list[str] = []
    log_caps(SimpleNamespace(prof=get_profile("quick"), config=SimpleNamespace(sigma=0.25)), same.append)
    assert len(same) == 1
