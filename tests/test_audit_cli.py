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
