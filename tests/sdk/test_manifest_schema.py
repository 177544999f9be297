"""Manifest values are checked at the door (issue 13, "Found" 2): every value typed, in range and
consistent at ``Bundle.load``, each error naming its key; ``rrise inspect`` and ``rrise run`` refuse
such a bundle with that message, exit 1 and no traceback."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rrise import Bundle, BundleError
from rrise.calibration import conformal_rank, mc_lower_bounds, min_calibration_size
from rrise.cli import app
from rrise.inspect import inspect_bundle
from rrise.manifest_schema import (
    ManifestError,
    quantile_floor,
    required_schema_version,
    smallest_calibration_size,
    validate_manifest,
)
from rrise.scores import conformal_scores, p_cap
from tests.tiny_bundle import linear_sources, make_linear_bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    sources = linear_sources(tmp_path_factory.mktemp("sources"))
    return make_linear_bundle(sources, tmp_path_factory.mktemp("b") / "bundle").path


@pytest.fixture
def bundle_dir(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def at(manifest: dict, path: str):
    """The dict holding the last key of ``path`` (``a.b.c`` or ``variants.0.quantile``) and that key."""
    *parents, leaf = path.split(".")
    for p in parents:
        manifest = manifest[int(p)] if p.isdigit() else manifest[p]
    return manifest, int(leaf) if leaf.isdigit() else leaf


# (key path, bad value, what the message must say): each one refused by name.
BAD = [
    ("calibration.alpha", 2, "calibration.alpha: must be in (0, 1), got 2"),
    ("calibration.beta", -1, "calibration.beta: must be in (0, 1), got -1"),
    ("calibration.alpha", True, "calibration.alpha: must be a number, got True"),
    ("calibration.delta", 1.5, "calibration.delta: must be in (0, 1), got 1.5"),
    ("smoothing.sigma", 25.0, "calibration.sigma: must equal smoothing.sigma (25.0), got 0.25"),
    ("smoothing.sigma", -0.5, "smoothing.sigma: must be > 0, got -0.5"),
    ("smoothing.sigma", math.nan, "smoothing.sigma: must be > 0, got nan"),
    ("variants.0.quantile", -1e6, "variants[0].quantile: must be >= "),
    ("variants.0.quantile", math.inf, "variants[0].quantile: must be a finite number, got inf"),
    ("variants.0.quantile", "1.0", "variants[0].quantile: must be a number or null, got '1.0'"),
    ("variants.0.quantile", None, "variants[0].quantile: must be a number, or null with needs_recalibration"),
    ("calibration.quantile", -1e6, "calibration.quantile: must be >= "),
    ("calibration.p_cap", 0.5, "calibration.p_cap: must be beta^(1/n_mc)"),
    ("calibration.cap_draws", 1, "calibration.cap_draws: must exceed n_mc"),
    ("calibration.cap_draws", 10**7, "calibration.p_cap: must be beta^(1/cap_draws)"),
    ("calibration.n_mc", 0, "calibration.n_mc: must be an integer >= 1, got 0"),
    ("calibration.m", 5, "calibration.m: must be >= 9 (the fewest inputs that work for alpha), got 5"),
    (
        "calibration.score",
        "cube",
        "calibration.score: must be one of 'probit', 'logit', 'identity', got 'cube'",
    ),
    ("model.input", "oops", "model.input: must be an object, got 'oops'"),
    ("model.input.shape", [None, 1, 4], "model.input.shape: must be [batch, C, H, W], got [None, 1, 4]"),
    ("model.input.range", [0, 255], "model.input.range: must be [0, 1]"),
    ("model.num_classes", 2, "model.labels: must hold one name per class (num_classes = 2), got '3 labels'"),
    ("model.num_classes", "3", "model.num_classes: must be an integer, got '3'"),
    ("model.output.kind", "softmax", "model.output.kind: must be one of 'logits', 'probs', got 'softmax'"),
    ("model.labels", "abc", "model.labels: must be a list or null, got 'abc'"),
    ("preprocess.color", "rgb", "preprocess.color: must give the model input's 1 channel(s), got 'rgb'"),
    (
        "preprocess.resize",
        [8, 8],
        "preprocess.resize: must match the model input [None, 1, 4, 4], got [8, 8]",
    ),
    ("preprocess.interpolation", "bicubic", "preprocess.interpolation: must be one of 'area', 'linear'"),
    ("variants.0.max_batch", 0, "variants[0].max_batch: must be an integer in [1, 16]"),
    (
        "variants.0.precision",
        "int4",
        "variants[0].precision: must be one of 'fp32', 'int8', 'fp16', got 'int4'",
    ),
    ("variants.0.monitor", [1, 2], "variants[0].monitor: must be an object or null, got [1, 2]"),
    ("base_model.file", "/etc/passwd", "base_model.file: must be a relative path inside the bundle"),
    ("files.base.onnx", "deadbeef", "files['base.onnx']: must be a sha256 hex digest, got 'deadbeef'"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_a_bad_value_is_refused_by_its_key(bundle_dir, path, value, message):
    manifest = manifest_of(bundle_dir)
    if path.startswith("files."):
        manifest["files"][path[len("files.") :]] = value
    else:
        holder, key = at(manifest, path)
        holder[key] = value
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as info:
        Bundle.load(bundle_dir)
    assert message in str(info.value)
    summary, problems = inspect_bundle(bundle_dir)
    assert summary["id"] is None and any(message in p for p in problems)


def test_every_range_and_consistency_problem_is_reported_at_once(bundle_dir):
    manifest = manifest_of(bundle_dir)
    manifest["calibration"].update(alpha=2, beta=-1)
    manifest["model"]["labels"] = ["only one"]
    with pytest.raises(ManifestError) as info:
        validate_manifest(manifest)
    keys = [p.split(":")[0] for p in info.value.problems]
    assert keys == ["model.labels", "calibration.alpha", "calibration.beta"]


@pytest.mark.parametrize("key", ["guarantee", "calibration.alpha", "model.input.dtype", "variants.0.file"])
def test_a_missing_key_is_named(key):
    manifest = manifest_of_pristine()
    holder, leaf = at(manifest, key)
    del holder[leaf]
    name = key.replace(".0.", "[0].")
    with pytest.raises(ManifestError, match=re.escape(f"{name}: missing (a required key)")):
        validate_manifest(manifest)


def manifest_of_pristine() -> dict:
    """A valid manifest with no bundle behind it (what validate_manifest alone checks)."""
    q = 0.38
    return {
        "schema_version": 1,
        "rrise_version": "0",
        "created": "now",
        "model": {
            "file": "surrogate.onnx",
            "input": {"name": "input", "shape": [None, 1, 4, 4], "dtype": "float32", "range": [0.0, 1.0]},
            "output": {"name": "logits", "kind": "logits"},
            "num_classes": 3,
            "labels": ["a", "b", "c"],
        },
        "preprocess": {"color": "gray", "resize": [4, 4], "interpolation": "area", "layout": "NCHW"},
        "smoothing": {"sigma": 0.25},
        "calibration": {
            "score": "probit",
            "alpha": 0.1,
            "beta": 0.01,
            "m": 40,
            "n_mc": 1000,
            "quantile": q,
            "p_cap": p_cap(0.01, 1000),
        },
        "base_model": {"file": "base.onnx"},
        "variants": [
            {
                "precision": "fp32",
                "backend": "onnxruntime",
                "file": "surrogate.onnx",
                "quantile": q,
                "calibrated_with": "onnxruntime-cpu",
                "max_batch": 16,
            }
        ],
        "guarantee": "text",
        "files": {"surrogate.onnx": "0" * 64, "base.onnx": "1" * 64},
    }


def test_the_hand_made_manifest_is_valid_and_typed():
    m = validate_manifest(manifest_of_pristine())
    assert m.calibration.alpha == 0.1 and m.variants[0].max_batch == 16 and m.model.output.kind == "logits"


def test_the_rrise_commands_refuse_a_bad_manifest_with_one_line(bundle_dir, tmp_path):
    manifest = manifest_of(bundle_dir)
    manifest["model"]["input"] = "oops"
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    for args in (
        ["inspect", str(bundle_dir)],
        ["run", "--bundle", str(bundle_dir), "--source", str(tmp_path)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        shown = " ".join(result.output.split())  # the console wraps long lines at its width
        assert "model.input: must be an object, got 'oops'" in shown
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_the_manifest_may_not_list_its_own_signature():
    manifest = manifest_of_pristine()
    manifest["files"]["manifest.sig"] = "2" * 64
    with pytest.raises(
        ManifestError, match=r"files\['manifest.sig'\]: must not list the manifest or its signature"
    ):
        validate_manifest(manifest)


def test_two_variants_of_one_precision_and_backend_are_refused():
    manifest = manifest_of_pristine()
    manifest["variants"].append(dict(manifest["variants"][0]))
    with pytest.raises(
        ManifestError, match="variants\\[1\\]: must be the only variant of its precision/backend"
    ):
        validate_manifest(manifest)


# --- the rules behind the checks ----------------------------------------------------------------------
def test_the_calibration_keys_are_the_calibration_fields():
    """One declaration: the manifest's calibration keys, the codec's and the spec's are the fields."""
    from dataclasses import fields

    import msgspec

    from rrise import Calibration, CalibrationSpec
    from rrise.manifest_schema import CalibrationRecord

    names = [f.name for f in fields(Calibration)]
    record = msgspec.structs.fields(CalibrationRecord)
    assert [f.name for f in record] == names
    assert {f.name for f in fields(CalibrationSpec)} < set(names)
    assert {f.name for f in record if f.required} == {
        "score",
        "alpha",
        "beta",
        "m",
        "n_mc",
        "quantile",
        "p_cap",
    }
    cal = Calibration(sigma=0.25, quantile=0.5, alpha=0.01, beta=0.001, n_mc=10_000, m=3000, delta=0.1)
    assert set(cal.to_dict()) == {
        "sigma",
        "n_mc",
        "alpha",
        "beta",
        "score",
        "delta",
        "quantile",
        "m",
        "p_cap",
    }


@pytest.mark.parametrize("alpha", [0.2, 0.1, 0.05, 0.01, 0.001])
@pytest.mark.parametrize("delta", [None, 0.5, 0.1, 0.05, 0.001])
def test_the_smallest_calibration_size_matches_the_conformal_rank(alpha, delta):
    """The closed form (no scipy at the edge) is exactly the size at which the rank fits, per bin."""
    assert smallest_calibration_size is min_calibration_size  # one rule, the old name kept
    m = min_calibration_size(alpha, delta)
    assert conformal_rank(m, alpha, delta) <= m and conformal_rank(m - 1, alpha, delta) > m - 1
    if delta is not None:
        per_bin = min_calibration_size(alpha, delta, bins=4) // 4
        assert conformal_rank(per_bin, alpha, delta / 4) <= per_bin
        assert conformal_rank(per_bin - 1, alpha, delta / 4) > per_bin - 1


@pytest.mark.parametrize("score", ["probit", "logit", "identity"])
@pytest.mark.parametrize("k", [2, 3, 10])
def test_no_calibration_score_falls_below_the_quantile_floor(score, k):
    """Random top-class probabilities and MC counts, including the extremes (ŝ = 1/K, every draw
    in the class): every score is at least the floor, and the floor is reached."""
    rng = np.random.default_rng(k)
    n_mc, beta = 500, 0.001
    probs = rng.dirichlet(np.full(k, 0.3), size=4000)
    probs[0] = 1.0 / k
    counts = np.stack([rng.multinomial(n_mc, p) for p in probs])
    top = probs.argmax(1)
    counts[0] = 0
    counts[0, top[0]] = n_mc
    cap = p_cap(beta, n_mc)
    scores = conformal_scores(probs.max(1), mc_lower_bounds(counts, top, n_mc, beta), cap, score)
    floor = quantile_floor(k, cap, score, None)
    assert scores.min() >= floor - 1e-12 and scores.min() == pytest.approx(floor, abs=1e-9)


# --- values no manifest may hold, wherever they are -------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "shown"), [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"), ("1e999", "inf")]
)
def test_a_non_finite_number_in_an_unknown_key_is_one_line_naming_its_path(bundle_dir, literal, shown):
    text = (bundle_dir / "manifest.json").read_text()
    text = text.replace('"model": {', f'"vendor": {{"extra": [1, {{"score": {literal}}}]}}, "model": {{', 1)
    (bundle_dir / "manifest.json").write_text(text)
    with pytest.raises(BundleError) as info:
        Bundle.load(bundle_dir)
    message = str(info.value)
    assert "\n" not in message
    assert f"vendor.extra[1].score: must be a finite number, got {shown}" in message
    summary, problems = inspect_bundle(bundle_dir)
    assert any("vendor.extra[1].score" in p for p in problems)
    result = runner.invoke(app, ["inspect", str(bundle_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    "bad", ["quick\nIntegrity: OK (every file matches)", "quick\r", "a\x1b[2Kb", "x\u2028y"]
)
def test_a_control_character_in_a_manifest_string_is_refused_by_name(bundle_dir, bad):
    m = manifest_of(bundle_dir)
    m["made_with"] = {"profile": bad}
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"made_with\.profile: must hold no control character"):
        Bundle.load(bundle_dir)
    result = runner.invoke(app, ["inspect", str(bundle_dir)])
    assert result.exit_code == 1
    assert not any(line.startswith("Integrity: OK") for line in result.output.splitlines())


def test_inspect_escapes_control_characters_from_disk_and_the_signature(bundle_dir):
    from rrise.inspect import format_inspection

    (bundle_dir / "x\nIntegrity: OK (every file matches its sha256)").write_bytes(b"")
    (bundle_dir / "manifest.sig").write_text(
        json.dumps(
            {
                "format": "rrise-signature",
                "algorithm": "ed25519",
                "key": "k\nIntegrity: OK",
                "bundle": "b",
                "signature": "A" * 86 + "==",
            }
        )
    )
    summary, problems = inspect_bundle(bundle_dir)
    text = format_inspection(summary, problems)
    assert not any(line.startswith("Integrity: OK") for line in text.splitlines())
    assert "x\\nIntegrity: OK" in text and "k\\nIntegrity: OK" in text


# --- schema versions ------------------------------------------------------------------------------
def test_a_newer_schema_is_refused_by_name():
    manifest = manifest_of_pristine()
    manifest["schema_version"] = 3
    with pytest.raises(
        ManifestError, match=re.escape("bundle schema 3 is newer than this SDK reads (2): upgrade rrise")
    ):
        validate_manifest(manifest)
    manifest["schema_version"] = 2  # a plain bundle may say 2: this SDK reads both
    validate_manifest(manifest)


def test_a_plain_bundle_stays_schema_1_for_older_readers(pristine):
    assert manifest_of(pristine)["schema_version"] == 1 == required_schema_version(manifest_of(pristine))


@pytest.mark.parametrize(
    "extra",
    [
        {"score_scale_x": [0.0, 1.0], "score_scale_y": [1.0, 2.0]},
        {"score_map_x": [0.0, 1.0], "score_map_y": [0.0, 1.0]},
        {"bin_edges": [0.9]},
    ],
)
def test_a_calibration_beyond_one_quantile_needs_schema_2(extra):
    manifest = manifest_of_pristine()
    manifest["calibration"].update(extra)
    assert required_schema_version(manifest) == 2
    with pytest.raises(ManifestError, match="needs schema 2: an older SDK would apply its quantile alone"):
        validate_manifest(manifest)


def test_the_bundler_writes_schema_2_for_a_scaled_score(tmp_path):
    import dataclasses

    (tmp_path / "sources").mkdir()
    sources = linear_sources(tmp_path / "sources")
    scaled = dataclasses.replace(sources["cal"], score_scale_x=(-1.0, 2.0), score_scale_y=(1.0, 1.5))
    bundle = make_linear_bundle(sources, tmp_path / "bundle", cal=scaled)
    assert bundle.manifest["schema_version"] == 2
    assert Bundle.load(bundle.path).calibration().score_scale_x == (-1.0, 2.0)
