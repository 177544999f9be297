"""rrise audit as a user meets it: the dataset comes from the bundle, progress goes to stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from rrise.cli import app
from tests.runtime_fixtures import make_bundle


def test_audit_draws_from_the_bundles_dataset_and_keeps_stdout_for_its_result(tiny_bundle: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rrise", "audit", "--bundle", str(tiny_bundle), "--n", "8", "--n-mc", "100"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr  # 1 only if the binomial test fails
    assert done.stdout.startswith("audited 8 inputs with 100 fresh draws each")
    assert len(done.stdout.strip().splitlines()) == 1  # the progress bar went to stderr
    assert "Monte Carlo" in done.stderr and "800/800" in done.stderr  # the progress bar, on stderr


def test_audit_of_a_bundle_calibrated_on_user_images_asks_for_a_dataset(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")  # its calibration dataset is "test", not a built-in
    result = CliRunner().invoke(app, ["audit", "--bundle", str(bundle), "--n", "4"])
    assert result.exit_code == 1
    assert "--dataset" in " ".join(result.output.split()) and "'test'" in result.output


def test_audit_of_adaptive_records_reports_violations_per_path(tiny_bundle: Path, tmp_path: Path) -> None:
    table = tmp_path / "audit.tsv"
    flags = ["--mc-budget", "1024", "--require-radius", "0.25", "--out", str(table)]
    result = CliRunner().invoke(
        app, ["audit", "--bundle", str(tiny_bundle), "--n", "8", "--n-mc", "100", *flags]
    )
    assert result.exit_code in (0, 1), result.output  # 1 only if the binomial test fails
    lines = result.stdout.splitlines()
    assert lines[0].startswith("audited 8 inputs with 100 fresh draws each (adaptive, --mc-budget 1024)")
    assert "α+β+A" in lines[0] and "detection limit" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:3]] == ["surrogate", "mc"]
    assert all("Clopper-Pearson interval" in line for line in lines[1:3])
    rows = [r.split("\t") for r in table.read_text().splitlines()]
    assert rows[0][-2:] == ["certified_by", "mc_draws"] and len(rows) == 9
    assert all(r[-2] in ("surrogate", "mc", "-") and 0 <= int(r[-1]) <= 1024 for r in rows[1:])


def test_audit_refuses_bad_adaptive_options_naming_them_with_exit_2(tiny_bundle: Path) -> None:
    for flags, named in (
        (["--require-radius", "0.25"], "--mc-budget"),  # a required radius needs draws
        (["--mc-budget", "1024"], "--require-radius"),  # this bundle states no routing rule
        (["--mc-budget", "1024", "--require-radius", "9"], "--require-radius"),  # out of reach
    ):
        result = CliRunner().invoke(app, ["audit", "--bundle", str(tiny_bundle), "--n", "2", *flags])
        assert result.exit_code == 2, (flags, result.output)
        assert named in " ".join(result.output.split()) and "Traceback" not in result.output
