"""``rrise-export sign`` (and the flat ``--sign``) verifies a bundle before it signs it: an edit
that re-hashes the manifest but changes a value a certificate depends on is refused, one line,
exit 1, nothing written; ``--release`` and ``--expires`` go into the signature."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rrise import Bundle
from rrise.bundle import write_manifest
from rrise.export.cli import app as export_app
from rrise.signing import read_signature, write_signing_keypair

runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    pub, key = write_signing_keypair(tmp_path_factory.mktemp("keys") / "release")
    return {"pub": pub, "key": key}


@pytest.fixture
def copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _double_sigma(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["smoothing"]["sigma"] = manifest["calibration"]["sigma"] = 0.5
    write_manifest(bundle, manifest)


@pytest.mark.parametrize("verb", [["sign"], []])
def test_an_edited_sigma_is_not_signed(copy, keys, verb):
    _double_sigma(copy)
    result = runner.invoke(export_app, [*verb, "--bundle", str(copy), "--sign", str(keys["key"])])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "not signed: the bundle does not verify: σ or the calibration counts" in errors[0]
    )
    assert not (copy / "manifest.sig").exists()


def test_a_verified_bundle_is_signed_with_its_release_and_expiry(copy, keys):
    args = ["sign", "--bundle", str(copy), "--sign", str(keys["key"]), "--release", "4"]
    result = runner.invoke(export_app, [*args, "--expires", "2099-01-31T00:00:00Z"])
    assert result.exit_code == 0, result.output
    info = read_signature(copy)
    assert (info.release, info.expires) == (4, "2099-01-31T00:00:00Z")
    Bundle.load(copy, trust=keys["pub"], min_release=4)
    flat = runner.invoke(export_app, ["--bundle", str(copy), "--sign", str(keys["key"]), "--release", "5"])
    assert flat.exit_code == 0, flat.output
    assert read_signature(copy).release == 5


def test_a_bad_expiry_is_refused_by_its_option_before_anything_is_written(copy, keys):
    args = ["sign", "--bundle", str(copy), "--sign", str(keys["key"]), "--expires", "next week"]
    result = runner.invoke(export_app, args)
    assert result.exit_code == 1 and "--expires" in result.output
    assert not (copy / "manifest.sig").exists()
