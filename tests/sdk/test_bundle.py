"""Bundle.load refuses what it cannot vouch for; inspect_bundle reports the same; variants' quantiles.

The bundles here are tests.tiny_bundle's linear bundles: built by rrise.export.bundler.pack_bundle from a
hand-made ONNX graph (no torch), with synthetic calibration data, so every file is present and hashed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from rrise import Bundle, BundleError
from rrise.bundle import sha256_file, write_manifest
from rrise.export.bundler import calibration_outputs
from rrise.inspect import format_inspection, inspect_bundle
from tests.tiny_bundle import (
    LINEAR_ALPHA,
    LINEAR_BETA,
    LINEAR_K,
    LINEAR_N_MC,
    LINEAR_SHAPE,
    linear_onnx,
    linear_sources,
    make_linear_bundle,
)

SHAPE, K, N_MC, ALPHA, BETA = LINEAR_SHAPE, LINEAR_K, LINEAR_N_MC, LINEAR_ALPHA, LINEAR_BETA
make_bundle = make_linear_bundle


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """surrogate.onnx, base.onnx, calibration.npz and the Calibration record for them."""
    return linear_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def good(sources, tmp_path_factory) -> Path:
    return make_bundle(sources, tmp_path_factory.mktemp("good") / "bundle").path


@pytest.fixture
def bundle_dir(good, tmp_path) -> Path:
    """A fresh copy of the good bundle, free to damage."""
    return Path(shutil.copytree(good, tmp_path / "bundle"))


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def refused(folder: Path, *names: str) -> str:
    """Bundle.load refuses ``folder``; inspect_bundle reports it; both messages name ``names``."""
    with pytest.raises(BundleError) as info:
        Bundle.load(folder)
    message = str(info.value)
    summary, problems = inspect_bundle(folder)
    assert problems, "inspect_bundle found nothing wrong"
    text = format_inspection(summary, problems)
    assert "Integrity: FAILED" in text and "Integrity: OK" not in text
    for name in names:
        assert name in message, message
        assert any(name in p for p in problems), problems
        assert name in text
    return message


def test_good_bundle_loads_and_inspects_ok(good):
    b = Bundle.load(good)
    assert sorted(b.manifest["files"]) == ["base.onnx", "calibration.npz", "surrogate.onnx"]
    summary, problems = inspect_bundle(good)
    assert problems == []
    assert summary["id"] == b.id and summary["num_classes"] == K and summary["labels"] == ["a", "b", "c"]
    assert summary["variants"][0]["quantile"] == b.manifest["variants"][0]["quantile"]
    assert summary["base_model"] == "base.onnx" and summary["sigma"] == 0.25
    json.dumps(summary)  # what `rrise inspect --json` prints
    text = format_inspection(summary, problems)
    assert "Integrity: OK" in text and "FAILED" not in text
    assert "1 − α − β = 0.89" in text  # 1 − 0.1 − 0.01
    assert "fp32/onnxruntime" in text and b.id in text
    # the largest radius the bundle can ever certify, so a quick bundle does not look like a full one
    cal = b.calibration(b.variant("fp32"))
    assert summary["variants"][0]["max_radius"] == pytest.approx(cal.max_radius())
    assert f"largest radius {cal.max_radius():.4g}" in text and "max_batch 16" in text


def test_changed_file_is_refused(bundle_dir):
    with open(bundle_dir / "base.onnx", "ab") as f:
        f.write(b"\0")
    assert "changed file base.onnx" in refused(bundle_dir, "base.onnx")


def test_missing_file_is_refused(bundle_dir):
    (bundle_dir / "calibration.npz").unlink()
    assert "missing file calibration.npz" in refused(bundle_dir, "calibration.npz")


def test_extra_file_is_refused(bundle_dir):
    (bundle_dir / "notes.txt").write_text("not in the manifest")
    assert "extra file notes.txt" in refused(bundle_dir, "notes.txt")


def test_malformed_json_is_refused(bundle_dir):
    (bundle_dir / "manifest.json").write_text('{"schema_version": 1,')
    assert "not valid JSON" in refused(bundle_dir, "manifest.json")
    summary, _ = inspect_bundle(bundle_dir)
    assert summary["id"] is None and summary["path"] == str(bundle_dir)


def test_unknown_schema_version_is_refused(bundle_dir):
    edit_manifest(bundle_dir, lambda m: m.update(schema_version=99))
    assert "bundle schema 99 is newer than this SDK reads (2): upgrade rrise" in refused(
        bundle_dir, "manifest.json"
    )
    edit_manifest(bundle_dir, lambda m: m.update(schema_version=0))
    assert "unknown schema_version 0" in refused(bundle_dir, "manifest.json")


@pytest.mark.parametrize("drop", ["guarantee", "variants", "calibration.alpha", "smoothing.sigma"])
def test_missing_required_key_is_refused(bundle_dir, drop):
    def edit(m):
        *parents, leaf = drop.split(".")
        for p in parents:
            m = m[p]
        del m[leaf]

    edit_manifest(bundle_dir, edit)
    assert drop in refused(bundle_dir, "manifest.json")


def test_variant_without_quantile_is_refused(bundle_dir):
    edit_manifest(bundle_dir, lambda m: m["variants"][0].pop("quantile"))
    assert "variants[0].quantile" in refused(bundle_dir, "manifest.json")


def test_file_names_outside_the_bundle_are_refused(bundle_dir, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(bundle_dir / "base.onnx", outside)

    def edit(m):
        m["files"]["../outside.onnx"] = m["files"].pop("base.onnx")
        m["base_model"]["file"] = "../outside.onnx"

    (bundle_dir / "base.onnx").unlink()
    edit_manifest(bundle_dir, edit)
    assert "base_model.file: must be a relative path inside the bundle" in refused(
        bundle_dir, "../outside.onnx"
    )


def test_calibration_uses_the_variants_quantile(bundle_dir):
    edit_manifest(bundle_dir, lambda m: m.pop("files"))
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["variants"][0]["quantile"] = 0.123
    write_manifest(bundle_dir, manifest)
    b = Bundle.load(bundle_dir)
    record = b.calibration()
    variant = b.calibration(b.variant("fp32", "onnxruntime"))
    assert record.quantile == pytest.approx(b.manifest["calibration"]["quantile"]) != 0.123
    assert variant.quantile == 0.123
    assert (variant.alpha, variant.beta, variant.n_mc, variant.sigma) == (ALPHA, BETA, N_MC, 0.25)
    with pytest.raises(BundleError, match="no int8"):
        b.variant("int8")


def test_write_manifest_leaves_the_callers_dict_alone(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["model"]["sha256"] = None
    write_manifest(bundle_dir, manifest)
    assert manifest["model"]["sha256"] is None
    assert Bundle.load(bundle_dir).manifest["model"]["sha256"] == manifest["files"]["surrogate.onnx"]


def test_inspect_imports_neither_torch_nor_scipy():
    import subprocess

    code = "import sys, rrise.inspect; sys.exit(any(m in sys.modules for m in ('torch', 'scipy')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("role", ["base", "surrogate"])
def test_a_calibration_from_other_models_is_refused_by_name(sources, tmp_path, role):
    other = linear_onnx(tmp_path / "other.onnx", seed=5, input_name="x" if role == "base" else "input")
    with pytest.raises(ValueError, match=f"is not the {'base model' if role == 'base' else 'surrogate'} the"):
        make_bundle(sources, tmp_path / "b", **{role: other})
    assert not (tmp_path / "b").exists()
    key = f"{role}_sha256"
    unknown = dataclasses.replace(sources["cal"], **{key: None})
    with pytest.raises(ValueError, match=f"has no {key}"):
        make_bundle(sources, tmp_path / "b", cal=unknown)
    assert not (tmp_path / "b").exists()


def test_the_manifest_records_the_models_and_numerics_of_its_calibration(good, sources):
    b = Bundle.load(good)
    assert b.manifest["calibration"]["base_sha256"] == sha256_file(sources["base"])
    assert b.manifest["calibration"]["surrogate_sha256"] == sha256_file(sources["surrogate"])
    v = b.variant("fp32")
    assert v["calibrated_with"] == "onnxruntime-cpu" and v["max_batch"] == 16


def test_calibration_outputs_catch_batch_dependent_numerics():
    rng = np.random.default_rng(0)
    x = rng.random((40, *SHAPE), dtype=np.float32)
    w = rng.standard_normal((16, K))

    def steady(batch):  # row by row: bit-identical whatever the batch size
        return np.concatenate([softmax(row.reshape(1, -1) @ w) for row in batch])

    def drifting(batch):  # e.g. an engine whose kernels change with the batch size
        return softmax((1 + 1e-3 * len(batch)) * (batch.reshape(len(batch), -1) @ w))

    probs, max_batch = calibration_outputs(steady, x)
    assert max_batch == 16 and np.array_equal(probs, steady(x))
    probs, max_batch = calibration_outputs(drifting, x)
    assert max_batch == 1
    assert np.array_equal(probs[3], drifting(x[3:4])[0])  # the batch-1 numerics, the runtime's per frame


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda v: v.pop("calibrated_with"), "variants[0].calibrated_with: missing"),
        (lambda v: v.update(calibrated_with="cuda-maybe"), "variants[0].calibrated_with: must be one of"),
        (lambda v: v.update(calibrated_with="tensorrt"), "calibrated_with: must match its backend"),
        (lambda v: v.update(max_batch=64), "variants[0].max_batch: must be an integer in"),
        (lambda v: v.pop("max_batch"), "variants[0].max_batch: must be an integer in"),
    ],
)
def test_a_variant_must_say_which_numerics_its_quantile_holds_for(bundle_dir, edit, match):
    edit_manifest(bundle_dir, lambda m: edit(m["variants"][0]))
    assert match in refused(bundle_dir, "manifest.json")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("alpha", 2, "calibration.alpha: must be in (0, 1), got 2"),
        ("beta", -1, "calibration.beta: must be in (0, 1), got -1"),
        ("quantile", "lots", "calibration.quantile: must be a number, got 'lots'"),
    ],
)
def test_calibration_values_are_validated_at_load(bundle_dir, key, value, match):
    edit_manifest(bundle_dir, lambda m: m["calibration"].update({key: value}))
    assert match in refused(bundle_dir, "manifest.json")


def test_a_calibration_sigma_that_disagrees_with_smoothing_is_refused(bundle_dir):
    edit_manifest(bundle_dir, lambda m: m["smoothing"].update(sigma=0.5))
    assert "calibration.sigma: must equal smoothing.sigma (0.5), got 0.25" in refused(
        bundle_dir, "manifest.json"
    )
