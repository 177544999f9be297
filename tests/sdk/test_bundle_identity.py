"""A bundle no one can quietly change: its id is the digest of the canonical manifest, a robot can pin
it (``expect_id``, ``--expect-id``) or trust only a key's signature (``trust``, ``--trust``), and
``inspect --verify`` recomputes every variant's quantile.

Each attack of issue 13 ("Found" 1) is here: editing a manifest value without touching any file, and
swapping ``surrogate.onnx`` then rewriting the hashes with ``write_manifest``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rrise import Bundle, BundleError
from rrise.bundle import canonical_manifest, manifest_id, sign_bundle, write_manifest
from rrise.cli import app
from rrise.export.cli import app as export_app
from rrise.inspect import format_inspection, inspect_bundle
from rrise.scores import p_cap
from rrise.signing import (
    key_fingerprint,
    load_private_key,
    load_public_key,
    read_signature,
    verify_signature,
    write_signing_keypair,
)
from tests.conftest import NO_TORCH_PRELUDE
from tests.sound_bundle import sound_linear_sources
from tests.tiny_bundle import linear_onnx, make_linear_bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    return sound_linear_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    pub, key = write_signing_keypair(d / "release")
    other_pub, other_key = write_signing_keypair(d / "other")
    return {"pub": pub, "key": key, "other_pub": other_pub, "other_key": other_key}


@pytest.fixture(scope="module")
def pristine(sources, tmp_path_factory) -> Path:
    return make_linear_bundle(sources, tmp_path_factory.mktemp("b") / "bundle").path


@pytest.fixture
def bundle_dir(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


@pytest.fixture
def signed(bundle_dir, keys) -> Path:
    sign_bundle(bundle_dir, keys["key"])
    return bundle_dir


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(d / f"f{i}.png"), rng.integers(0, 256, (8, 8), dtype=np.uint8))
    return d


def edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


# --- the id ----------------------------------------------------------------------------------------
def test_the_id_is_the_sha256_of_the_canonical_manifest_whatever_its_formatting(bundle_dir, keys):
    b = Bundle.load(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert b.id == hashlib.sha256(canonical.encode()).hexdigest() == manifest_id(manifest)
    assert len(b.id) == 64 and canonical_manifest(manifest) == canonical.encode()
    # reformatting the file (indentation, key order) changes no value, so not the id either
    reordered = dict(reversed(list(manifest.items())))
    (bundle_dir / "manifest.json").write_text(json.dumps(reordered, indent=7))
    assert Bundle.load(bundle_dir).id == b.id
    # the signature is no part of what it signs: signing changes neither the manifest nor the id
    sign_bundle(bundle_dir, keys["key"])
    assert Bundle.load(bundle_dir).id == b.id and "manifest.sig" not in b.manifest["files"]
    summary, problems = inspect_bundle(bundle_dir)
    assert problems == [] and summary["id"] == b.id and b.id in format_inspection(summary, problems)


def _edit_quantile(m):
    m["variants"][0]["quantile"] -= 0.3


def _edit_n_mc(m):  # consistent: p_cap follows n_mc, so only the id and the signature can tell
    m["calibration"]["n_mc"] = 100_000
    m["calibration"]["p_cap"] = p_cap(m["calibration"]["beta"], 100_000)


def _edit_sigma(m):
    m["smoothing"]["sigma"] = m["calibration"]["sigma"] = 25.0


def _edit_labels(m):
    m["model"]["labels"] = ["b", "a", "c"]


def _edit_output_kind(m):
    m["model"]["output"]["kind"] = "probs"


EDITS = [_edit_quantile, _edit_n_mc, _edit_sigma, _edit_labels, _edit_output_kind]


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__[6:])
def test_an_edited_manifest_value_changes_the_id_and_fails_pin_and_signature(signed, keys, edit):
    before = Bundle.load(signed, trust=keys["pub"]).id
    edit_manifest(signed, edit)
    after = Bundle.load(signed).id  # a consistent edit passes the schema: the id is what tells
    assert after != before
    with pytest.raises(BundleError) as pinned:
        Bundle.load(signed, expect_id=before)
    assert before in str(pinned.value) and after in str(pinned.value)
    with pytest.raises(BundleError, match="the manifest changed after it was signed"):
        Bundle.load(signed, trust=keys["pub"])
    summary, problems = inspect_bundle(signed, trust=keys["pub"])
    assert summary["signature"]["trusted"] is False and len(problems) == 1
    assert "Signature    FAILED" in format_inspection(summary, problems)


def test_a_swapped_model_with_rewritten_hashes_fails_the_signature(signed, keys, tmp_path):
    before = Bundle.load(signed).id
    other = linear_onnx(tmp_path / "other.onnx", seed=9)
    shutil.copyfile(other, signed / "surrogate.onnx")
    write_manifest(signed, json.loads((signed / "manifest.json").read_text()))
    b = Bundle.load(signed)  # every hash matches again: integrity alone cannot tell
    assert b.id != before
    with pytest.raises(BundleError, match="not valid: the manifest changed after it was signed"):
        Bundle.load(signed, trust=keys["pub"])
    with pytest.raises(BundleError, match=before):
        Bundle.load(signed, expect_id=before)


def test_another_signer_or_no_signature_or_a_garbled_one_is_refused(signed, keys):
    with pytest.raises(BundleError, match="signed by key .*, not by the trusted key"):
        Bundle.load(signed, trust=keys["other_pub"])
    sig = json.loads((signed / "manifest.sig").read_text())
    flipped = bytearray(base64.b64decode(sig["signature"]))
    flipped[10] ^= 1
    sig["signature"] = base64.b64encode(bytes(flipped)).decode()
    (signed / "manifest.sig").write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="is not valid"):
        Bundle.load(signed, trust=keys["pub"])
    (signed / "manifest.sig").write_text("{not json")
    with pytest.raises(BundleError, match="not an rrise Ed25519 signature"):
        Bundle.load(signed, trust=keys["pub"])
    (signed / "manifest.sig").unlink()
    with pytest.raises(BundleError, match="is not signed"):
        Bundle.load(signed, trust=keys["pub"])
    Bundle.load(signed)  # without a trusted key, an unsigned bundle is as before


def test_re_signing_replaces_the_signature(signed, keys):
    sign_bundle(signed, keys["other_key"])
    assert read_signature(signed).key == key_fingerprint(load_public_key(keys["other_pub"]))
    Bundle.load(signed, trust=keys["other_pub"])
    with pytest.raises(BundleError):
        Bundle.load(signed, trust=keys["pub"])
    assert sorted(p.name for p in signed.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_a_loaded_bundle_is_pinned_on_what_it_holds_not_on_its_id_attribute(bundle_dir):
    from rrise.runtime import Runtime

    b = Bundle.load(bundle_dir)
    good = b.id
    b.manifest["variants"][0]["quantile"] -= 0.3  # changed in memory after loading
    with pytest.raises(BundleError, match="was expected"):
        Runtime(b, expect_id=good)
    b2 = Bundle.load(bundle_dir)
    with Runtime(b2, expect_id=good) as rt:
        record = rt.certify(np.zeros((4, 4), np.uint8))
    assert record["bundle"] == good


def test_expect_id_must_look_like_an_id(bundle_dir):
    with pytest.raises(BundleError, match="is not a bundle id"):
        Bundle.load(bundle_dir, expect_id="abc")


# --- keys -----------------------------------------------------------------------------------------
def test_keys_are_written_private_and_never_overwritten(tmp_path):
    result = runner.invoke(app, ["keys", str(tmp_path / "robot"), "--kind", "signing"])
    assert result.exit_code == 0, result.output
    key, pub = tmp_path / "robot.key", tmp_path / "robot.pub"
    assert os.stat(key).st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    load_private_key(key), load_public_key(pub)
    again = runner.invoke(app, ["keys", str(tmp_path / "robot"), "--kind", "signing"])
    assert again.exit_code == 1 and "already exists" in again.output and "Traceback" not in again.output


def test_keys_also_makes_curve_pairs(tmp_path):
    pytest.importorskip("zmq")
    result = runner.invoke(app, ["keys", str(tmp_path / "robot"), "--kind", "curve"])
    assert result.exit_code == 0, result.output
    assert os.stat(tmp_path / "robot.curve.key").st_mode & 0o777 == 0o600
    assert (tmp_path / "robot.curve.pub").is_file() and not (tmp_path / "robot.key").exists()


def test_a_raw_32_byte_key_pair_signs_and_verifies(bundle_dir, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    (tmp_path / "k.raw").write_bytes(
        key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    )
    (tmp_path / "p.raw").write_bytes(key.public_key().public_bytes(raw, serialization.PublicFormat.Raw))
    sign_bundle(bundle_dir, tmp_path / "k.raw")
    assert verify_signature(Bundle.load(bundle_dir), tmp_path / "p.raw")


@pytest.mark.parametrize("which", ["key", "missing", "garbage"])
def test_a_bad_trust_key_is_one_clear_message(signed, keys, tmp_path, which):
    path = {"key": keys["key"], "missing": tmp_path / "nope.pub", "garbage": tmp_path / "g.pub"}[which]
    if which == "garbage":
        path.write_text("hello")
    for args in (["inspect", str(signed)], ["run", "--bundle", str(signed), "--source", str(tmp_path)]):
        result = runner.invoke(app, [*args, "--trust", str(path)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "--trust: " in result.output and str(path) in result.output


# --- the command line -----------------------------------------------------------------------------
def test_rrise_run_refuses_another_bundle_and_an_unsigned_one(signed, keys, frames):
    good = Bundle.load(signed).id
    base = ["run", "--bundle", str(signed), "--source", str(frames), "--jsonl", "-", "--max-frames", "2"]
    ok = runner.invoke(app, [*base, "--expect-id", good, "--trust", str(keys["pub"])])
    assert ok.exit_code == 0, ok.output
    records = [json.loads(line) for line in ok.stdout.splitlines() if line.startswith('{"v"')]
    assert records and all(r["bundle"] == good for r in records)
    edit_manifest(signed, _edit_quantile)
    now = Bundle.load(signed).id
    pinned = runner.invoke(app, [*base, "--expect-id", good])
    assert pinned.exit_code == 1 and good in pinned.output and now in pinned.output
    assert "Traceback" not in pinned.output and '{"v"' not in pinned.output
    trusted = runner.invoke(app, [*base, "--trust", str(keys["pub"])])
    assert trusted.exit_code == 1 and "manifest changed after it was signed" in trusted.output
    (signed / "manifest.sig").unlink()
    unsigned = runner.invoke(app, [*base, "--trust", str(keys["pub"])])
    assert unsigned.exit_code == 1 and "is not signed" in unsigned.output


def test_rrise_inspect_shows_the_signature_and_refuses_a_tampered_one(signed, keys):
    plain = runner.invoke(app, ["inspect", str(signed)])
    assert plain.exit_code == 0 and "not checked: pass --trust" in plain.output
    trusted = runner.invoke(app, ["inspect", str(signed), "--trust", str(keys["pub"])])
    assert trusted.exit_code == 0 and "Signature    OK" in trusted.output
    edit_manifest(signed, _edit_labels)
    tampered = runner.invoke(app, ["inspect", str(signed), "--trust", str(keys["pub"]), "--json"])
    assert tampered.exit_code == 1
    out = json.loads(tampered.output)
    assert out["ok"] is False and out["summary"]["signature"]["trusted"] is False


def test_rrise_export_signs_and_add_variant_drops_a_stale_signature(sources, keys, tmp_path):
    out = tmp_path / "bundle"
    record = tmp_path / "calibration.json"
    record.write_text(json.dumps(sources["cal"].to_dict() | {"dataset": "synthetic"}))
    build = [
        "build",
        "--surrogate", str(sources["surrogate"]),
        "--base", str(sources["base"]),
        "--calibration", str(sources["npz"]),
        "--calibration-record", str(record),
        "--out", str(out),
    ]  # fmt: skip
    bad = runner.invoke(export_app, [*build, "--sign", str(keys["pub"])])
    assert bad.exit_code == 1 and "is a public key" in bad.output and not out.exists()
    built = runner.invoke(export_app, [*build, "--sign", str(keys["key"])])
    assert built.exit_code == 0, built.output
    assert "signed    manifest.sig" in built.output
    Bundle.load(out, trust=keys["pub"])
    added = runner.invoke(export_app, ["add-variant", "--bundle", str(out), "--precision", "fp16"])
    assert added.exit_code == 0, added.output
    assert "old signature no longer holds and was removed" in added.output
    assert not (out / "manifest.sig").exists()
    Bundle.load(out)
    resigned = runner.invoke(
        export_app, ["add-variant", "--bundle", str(out), "--precision", "fp16", "--sign", str(keys["key"])]
    )
    assert resigned.exit_code == 0, resigned.output
    b = Bundle.load(out, trust=keys["pub"])
    assert {v["precision"] for v in b.manifest["variants"]} == {"fp32", "fp16"}
    # a bundle as it is, signed again by another key: the verb and the flat form
    for args in (["sign", "--bundle", str(out)], ["--bundle", str(out)]):
        again = runner.invoke(export_app, [*args, "--sign", str(keys["other_key"])])
        assert again.exit_code == 0, again.output
        assert Bundle.load(out, trust=keys["other_pub"]).id == b.id


# --- inspect --verify -----------------------------------------------------------------------------
def test_verify_recomputes_every_quantile_and_names_a_mismatch(bundle_dir):
    summary, problems = inspect_bundle(bundle_dir, verify=True)
    assert problems == [] and [r["status"] for r in summary["verification"]] == ["ok"]
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    recorded = manifest["variants"][0]["quantile"]
    manifest["variants"][0]["quantile"] = recorded - 0.05  # re-hashed: only recomputing can tell
    write_manifest(bundle_dir, manifest)
    Bundle.load(bundle_dir)
    summary, problems = inspect_bundle(bundle_dir, verify=True)
    assert len(problems) == 1 and "variant fp32/onnxruntime (surrogate.onnx)" in problems[0]
    assert f"{recorded - 0.05:.9g} recorded, {recorded:.9g} recomputed" in problems[0]
    result = runner.invoke(app, ["inspect", str(bundle_dir), "--verify"])
    assert result.exit_code == 1 and "MISMATCH" in result.output


def test_verify_says_a_tensorrt_engine_is_not_verifiable_here(bundle_dir):
    (bundle_dir / "surrogate.fp16.engine").write_bytes(b"an engine for another machine")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    fp32 = manifest["variants"][0]
    engine = {
        "precision": "fp16",
        "backend": "tensorrt",
        "file": "surrogate.fp16.engine",
        "quantile": fp32["quantile"],
        "calibrated_with": "tensorrt",
        "max_batch": 1,
        "trt_version": "10.3.0",
        "compute_capability": "8.7",
    }
    manifest["variants"].append(engine)
    write_manifest(bundle_dir, manifest)
    result = runner.invoke(app, ["inspect", str(bundle_dir), "--verify"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "fp16/tensorrt surrogate.fp16.engine not verifiable on this machine" in text
    assert "fp32/onnxruntime surrogate.onnx OK" in text


def test_inspect_verify_runs_without_torch(pristine):
    code = NO_TORCH_PRELUDE + (
        f"from rrise.cli import main\nmain(['inspect', {str(pristine)!r}, '--verify'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fp32/onnxruntime  surrogate.onnx  OK" in out.stdout
