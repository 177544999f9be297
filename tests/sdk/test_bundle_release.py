"""No rollback: a validly signed but older bundle, or one whose signature expired, is refused.

A version-2 signature signs a ``release`` number and an optional ``expires`` time with the manifest
(rrise.signing, "Releases"); ``Bundle.load(..., trust=KEY, min_release=N)`` refuses a lower release
by name, and every trusted load refuses an expired signature.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rrise import Bundle, BundleError
from rrise.bundle import manifest_id, sign_bundle
from rrise.signing import SigningError, read_signature, verify_signature, write_signing_keypair
from tests.tiny_bundle import linear_sources, make_linear_bundle


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    pub, key = write_signing_keypair(tmp_path_factory.mktemp("keys") / "release")
    return {"pub": pub, "key": key}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    sources = linear_sources(tmp_path_factory.mktemp("sources"))
    return make_linear_bundle(sources, tmp_path_factory.mktemp("b") / "bundle").path


@pytest.fixture
def bundle_dir(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


def future(days: int = 30) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_an_older_signed_release_is_refused_by_name(bundle_dir, keys):
    before = manifest_id(json.loads((bundle_dir / "manifest.json").read_text()))
    sign_bundle(bundle_dir, keys["key"], release=3, expires=future())
    b = Bundle.load(bundle_dir, trust=keys["pub"], min_release=3)
    assert b.id == before  # signing a release changes neither the manifest nor the id
    Bundle.load(bundle_dir, trust=keys["pub"], min_release=2)
    with pytest.raises(BundleError, match=r"is release 3, older than the lowest release accepted \(4\)"):
        Bundle.load(bundle_dir, trust=keys["pub"], min_release=4)
    info = read_signature(bundle_dir)
    assert (info.version, info.release) == (2, 3)


def test_an_expired_signature_is_refused_even_without_min_release(bundle_dir, keys):
    sign_bundle(bundle_dir, keys["key"], release=5, expires="2020-01-01T00:00:00Z")
    with pytest.raises(BundleError, match=r"expired at 2020-01-01T00:00:00Z \(release 5\)"):
        Bundle.load(bundle_dir, trust=keys["pub"])
    Bundle.load(bundle_dir)  # without a trusted key nothing about a signature is claimed
    at = datetime(2019, 12, 31, tzinfo=timezone.utc)
    assert verify_signature(Bundle.load(bundle_dir), keys["pub"], now=at)


def test_a_release_or_expiry_edited_in_the_signature_file_breaks_it(bundle_dir, keys):
    sign_bundle(bundle_dir, keys["key"], release=1, expires="2020-01-01T00:00:00Z")
    sig_path = bundle_dir / "manifest.sig"
    for change in ({"release": 9}, {"expires": "2099-01-01T00:00:00Z"}, {"version": 1, "release": None}):
        record = json.loads(sig_path.read_text())
        original = dict(record)
        record.update(change)
        if record.get("version") == 1:
            record.pop("release"), record.pop("expires")
        sig_path.write_text(json.dumps(record))
        with pytest.raises(BundleError, match="is not valid"):
            Bundle.load(bundle_dir, trust=keys["pub"])
        sig_path.write_text(json.dumps(original))


def test_an_old_signature_without_a_release_verifies_but_not_with_min_release(bundle_dir, keys):
    sign_bundle(bundle_dir, keys["key"])  # as every bundle was signed before releases
    assert read_signature(bundle_dir).version == 1
    Bundle.load(bundle_dir, trust=keys["pub"])
    with pytest.raises(BundleError, match="carries no signed release number"):
        Bundle.load(bundle_dir, trust=keys["pub"], min_release=1)


def test_min_release_needs_a_trusted_key_and_bad_values_are_refused(bundle_dir, keys):
    with pytest.raises(BundleError, match="without a trusted key"):
        Bundle.load(bundle_dir, min_release=1)
    for release, expires, match in (
        (-1, None, "release must be an integer"),
        (True, None, "release must be an integer"),
        (1, "2027-01-01T00:00:00", "has no timezone"),
        (1, "next tuesday", "not an ISO 8601 time"),
    ):
        with pytest.raises(SigningError, match=match):
            sign_bundle(bundle_dir, keys["key"], release=release, expires=expires)
    sign_bundle(bundle_dir, keys["key"], release=2, expires="2099-06-01T02:00:00+02:00")
    assert read_signature(bundle_dir).expires == "2099-06-01T00:00:00Z"


def test_inspect_shows_the_release_and_refuses_an_expired_signature(bundle_dir, keys):
    from rrise.inspect import format_inspection, inspect_bundle

    sign_bundle(bundle_dir, keys["key"], release=7, expires="2099-01-01T00:00:00Z")
    summary, problems = inspect_bundle(bundle_dir, trust=keys["pub"])
    assert problems == [] and summary["signature"]["release"] == 7
    assert "release 7, expires 2099-01-01T00:00:00Z" in format_inspection(summary, problems)
    sign_bundle(bundle_dir, keys["key"], release=7, expires="2020-01-01T00:00:00Z")
    summary, problems = inspect_bundle(bundle_dir, trust=keys["pub"])
    assert any("expired at 2020-01-01T00:00:00Z" in p for p in problems)
    assert "Integrity: OK" not in format_inspection(summary, problems)


def test_rrise_run_min_release_refuses_a_rollback(bundle_dir, keys, tmp_path):
    import cv2
    import numpy as np
    from typer.testing import CliRunner

    from rrise.cli import app

    sign_bundle(bundle_dir, keys["key"], release=3)
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "f.png"), np.full((4, 4), 128, np.uint8))
    base = ["run", "--bundle", str(bundle_dir), "--source", str(frames), "--trust", str(keys["pub"])]
    ok = CliRunner().invoke(app, [*base, "--min-release", "3", "--jsonl", str(tmp_path / "ok.jsonl")])
    assert ok.exit_code == 0, ok.output
    old = CliRunner().invoke(app, [*base, "--min-release", "4", "--jsonl", str(tmp_path / "no.jsonl")])
    assert old.exit_code == 1 and "older than the lowest release accepted (4)" in old.output
    assert "Traceback" not in old.output
