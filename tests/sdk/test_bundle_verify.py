"""``rrise inspect --verify`` binds σ and the calibration counts to the base model: a Monte Carlo
spot-check of fresh draws against the stored counts, the record against ``calibration.npz``, and
the bundle id shown. Each edit here is re-hashed with ``write_manifest``, so only recomputing can
tell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rrise import Bundle
from rrise.bundle import write_manifest
from rrise.cli import app
from rrise.count_check import fisher_exact_two_sided
from rrise.inspect import inspect_bundle
from rrise.recalibration import read_calibration_npz, record_problems

runner = CliRunner()
MISMATCH = "σ or the calibration counts do not match the base model"


@pytest.fixture
def copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _edit(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    write_manifest(bundle, manifest)


def test_the_sound_bundle_passes_the_spot_check_and_shows_what_was_recomputed(tiny_bundle):
    summary, problems = inspect_bundle(tiny_bundle, verify=True)
    assert problems == []
    spot = summary["count_verification"]["spot_check"]
    assert spot["status"] == "ok" and spot["inputs"] == 16 and spot["draws"] == 256
    assert spot["min_p"] >= spot["threshold"] == pytest.approx(1e-3 / 16)
    result = runner.invoke(app, ["inspect", str(tiny_bundle), "--verify"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "16 calibration inputs × 256 fresh draws of the base model at σ = 0.25" in text
    assert f"id {Bundle.load(tiny_bundle).id}: the digest of the manifest verified here" in text
    assert "Not recomputable from the bundle: the preprocess, what each label means" in text


def test_a_doubled_sigma_is_refused_by_name(copy):
    def double(m):
        m["smoothing"]["sigma"] = 0.5
        m["calibration"]["sigma"] = 0.5

    _edit(copy, double)
    Bundle.load(copy)  # every hash holds: the edit is invisible to the file check
    summary, problems = inspect_bundle(copy, verify=True)
    assert [r["status"] for r in summary["verification"]] == ["ok"]  # the quantile alone cannot tell
    assert len(problems) == 1 and problems[0].startswith(MISMATCH) and "sigma = 0.5" in problems[0]
    result = runner.invoke(app, ["inspect", str(copy), "--verify"])
    assert result.exit_code == 1 and MISMATCH in " ".join(result.output.split())


def test_forged_counts_with_a_recomputed_quantile_are_refused(copy):
    counts, cap_counts, images = read_calibration_npz(copy / "calibration.npz")
    with np.load(copy / "calibration.npz") as z:
        probs = z["probs"]
    forged = np.zeros_like(counts)
    forged[np.arange(len(counts)), counts.argmax(axis=1)] = counts.sum(axis=1)  # "every draw agreed"
    np.savez_compressed(copy / "calibration.npz", images=images, counts=forged, probs=probs)
    fresh = Bundle.load(copy, verify=False).calibration().recalibrate(probs, forged)
    _edit(copy, lambda m: [v.update(quantile=fresh.quantile) for v in (m["calibration"], *m["variants"])])
    summary, problems = inspect_bundle(copy, verify=True)
    assert [r["status"] for r in summary["verification"]] == ["ok"]
    assert len(problems) == 1 and problems[0].startswith(MISMATCH)


def test_the_record_is_checked_against_the_arrays(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    counts, cap_counts, images = read_calibration_npz(tiny_bundle / "calibration.npz")
    assert record_problems(bundle, counts, cap_counts, images) == []
    found = record_problems(bundle, counts[:, :-1] * 2, np.zeros((len(counts), 3)), images[:, :, :4])
    text = " ".join(found)
    assert "not [m, num_classes = 10]" in text and "not n_mc = 200" in text
    assert "cap_counts present" in text and "(m and the model input)" in text


def test_fisher_exact_matches_the_hypergeometric_tails():
    # 2x2 table [[3, 1], [1, 3]]: two-sided p = 17/35 (the textbook value, as scipy gives)
    assert fisher_exact_two_sided(3, 4, 1, 4) == pytest.approx(17 / 35)
    assert fisher_exact_two_sided(188, 200, 153, 256) < 1e-10


@pytest.mark.parametrize("key", ["reference", "norms"])
def test_an_edited_ood_reference_is_refused(copy, key):
    def shift(m):
        ood = m["variants"][0]["monitor"]["ood"]
        ood[key] = [r * 2.0 for r in ood[key]]  # every frame looks more in-distribution

    _edit(copy, shift)
    Bundle.load(copy)
    summary, problems = inspect_bundle(copy, verify=True)
    assert [r["status"] for r in summary["verification"]] == ["mismatch"]
    assert len(problems) == 1 and f"monitor.ood ({key}) does not follow from" in problems[0]


def test_the_spot_check_reproduces_with_its_seed(tiny_bundle):
    from rrise.count_check import SpotCheckOptions, spot_check_counts

    bundle = Bundle.load(tiny_bundle)
    counts, _, images = read_calibration_npz(tiny_bundle / "calibration.npz")
    first = spot_check_counts(bundle, counts, images)  # a fresh seed, reported
    again = spot_check_counts(bundle, counts, images, SpotCheckOptions(seed=first["seed"]))
    assert again["seed"] == first["seed"] and again["min_p"] == first["min_p"]
    assert again["worst"] == first["worst"]


def test_a_base_model_with_a_fixed_batch_runs_in_padded_chunks(tmp_path):
    import onnx

    from rrise.count_check import _base_runner
    from rrise.onnx_session import open_session
    from tests.tiny_bundle import linear_onnx

    dynamic = linear_onnx(tmp_path / "dynamic.onnx", seed=1)
    model = onnx.load(str(dynamic))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    x = np.random.default_rng(0).random((10, 1, 4, 4), dtype=np.float32)
    want = _base_runner(open_session(dynamic, "onnxruntime-cpu"))(x)
    got = _base_runner(open_session(tmp_path / "fixed.onnx", "onnxruntime-cpu"))(x)
    assert got.shape == (10, 3) and np.allclose(got, want, atol=1e-5)
