"""The per-frame out-of-distribution p-value: validity, detection, the manifest entry, records, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rrise.bundle import Bundle, BundleError, write_manifest
from rrise.cli import app
from rrise.monitor import reference_from_probs
from rrise.ood import (
    FIT_EVERY,
    GEOMETRY,
    OodTest,
    _block_means,
    _templates,
    check_rate,
    feature_names,
    frame_features,
    geometry_features,
    ood_reference,
    p_values,
)
from tests.runtime_fixtures import make_bundle, sample_frames
from tests.sdk import ood_oracle

runner = CliRunner()
D = len(feature_names(1))  # features of a grey input


def clean_images(rng: np.random.Generator, n: int, size: int = 8) -> np.ndarray:
    """Smooth random blobs on a dark background: one 'in-distribution' family of model inputs."""
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1))
    width = rng.uniform(0.1, 0.3, (n, 1, 1))
    blob = rng.uniform(0.4, 0.9, (n, 1, 1)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    noise = 0.03 * rng.standard_normal((n, size, size))
    return np.clip(blob + noise, 0, 1).astype(np.float32)[:, None]


def clean_probs(rng: np.random.Generator, images: np.ndarray, k: int = 4) -> np.ndarray:
    """Probabilities that depend on the image (brighter: class 0), as a surrogate's would."""
    logits = rng.standard_normal((len(images), k))
    logits[:, 0] += 6 * images.mean(axis=(1, 2, 3))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = clean_images(rng, n)
    return x, clean_probs(rng, x)


# --- the p-value ------------------------------------------------------------------------------


def test_p_values_count_the_reference_at_or_above() -> None:
    ref = np.array([0.5, 1.0, 1.0, 2.0])
    assert list(p_values(ref, np.array([0.1, 1.0, 1.5, 2.0, 9.0]))) == [1.0, 0.8, 0.4, 0.4, 0.2]


def test_flag_rate_on_exchangeable_clean_frames_is_at_most_the_rate() -> None:
    # Marginal over the reference draw and the frame, as the guarantee is: a fresh reference
    # (and fit) each time, fresh clean frames scored against it.
    rng = np.random.default_rng(0)
    rates = (0.02, 0.05, 0.1)
    flagged, frames = np.zeros(len(rates)), 0
    for _ in range(40):
        entry = ood_reference(*draw(rng, 125))  # 25 fit the score, 100 are the reference
        test = OodTest(entry, num_classes=4, channels=1, rate=0.05)
        p = test.p_values(*draw(rng, 100))
        flagged += [(p <= a).sum() for a in rates]
        frames += len(p)
    observed = flagged / frames
    for a, seen in zip(rates, observed):
        assert seen <= a + 3 * np.sqrt(a / 400) + 0.005, (a, seen)  # 40 references: sd ~ sqrt(a/400)
    assert observed[-1] > 0.05  # and the rate is used, not wasted: p is not far from uniform


def test_an_obvious_out_of_distribution_frame_gets_the_smallest_p_value() -> None:
    rng = np.random.default_rng(1)
    test = OodTest(ood_reference(*draw(rng, 300)), num_classes=4, channels=1)
    white = np.ones((1, 1, 8, 8), np.float32)
    yy, xx = np.mgrid[:8, :8]
    checker = ((yy + xx) % 2).astype(np.float32)[None, None]
    confident = np.array([[0.97, 0.01, 0.01, 0.01]])
    for frame in (white, checker, np.zeros_like(white)):
        (p,) = test.p_values(frame, confident)
        assert p == test.min_p == 1 / (test.n_ref + 1)
        assert test.flagged(p)
    assert test.rate == pytest.approx(1 / 241)  # 240 references: the default is the smallest p
    assert not test.flagged(None)


def test_the_reference_is_the_calibration_inputs_the_fit_did_not_see() -> None:
    rng = np.random.default_rng(2)
    x, p = draw(rng, 103)
    entry = ood_reference(x, p)
    assert entry["n_fit"] == 21 and len(entry["reference"]) == 82  # positions 0, 5, …, 100 fit
    assert entry["reference"] == sorted(entry["reference"])
    assert entry["features"] == list(feature_names(1))
    # Changing an input of the fit part changes nothing but the fit; the reference scores are a
    # function of the reference inputs and the fitted centres and scales only.
    assert len(frame_features(x, p)[0]) + len(GEOMETRY) == len(entry["features"])
    assert len(entry["templates"]) == 4 and entry["template_shape"] == [1, 8, 8]
    moved = x.copy()
    moved[FIT_EVERY] = 1.0 - moved[FIT_EVERY]
    assert ood_reference(moved, p)["centre"] != entry["centre"]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 40, 40), (1, 8, 8), (3, 224, 224), (1, 1, 5), (2, 6, 9)])
def test_frame_features_equal_the_plain_numpy_definition(shape: tuple[int, int, int]) -> None:
    """The per-frame path (batched reductions, Python floats per input) computes the same features
    as whole-array numpy (tests/sdk/ood_oracle.py), on natural, saturated, blank and flat inputs,
    one frame and a batch alike."""
    rng = np.random.default_rng(11)
    x = rng.random((6, *shape), dtype=np.float32) ** 3
    x[1] = 0.0  # blank
    x[2] = 1.0  # saturated
    x[3, :, : shape[1] // 2] = 1.0  # half saturated
    p = rng.dirichlet(np.ones(5), size=6)
    p[4] = [1.0, 0, 0, 0, 0]
    want = ood_oracle.frame_features(x, p)
    np.testing.assert_allclose(frame_features(x, p), want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(frame_features(x[:1], p[:1]), want[:1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 40, 40), (1, 8, 12)])
def test_geometry_equals_moving_each_frame_explicitly(shape: tuple[int, int, int]) -> None:
    """The geometry features from the precomputed maps (sums, dot products and squares of every
    moved copy as products with the block sums) equal moving, standardizing and correlating each
    frame explicitly; a flat frame correlates 0 with every template."""
    rng = np.random.default_rng(5)
    x = rng.random((5, *shape), dtype=np.float32) ** 2
    x[1] = 0.25  # flat
    classes = np.array([0, 1, 2, 3, 0])
    templates = _templates(x, classes, 4)
    g = _block_means(x)
    want = ood_oracle.geometry(g, classes, templates)
    np.testing.assert_allclose(geometry_features(x, classes, templates), want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        geometry_features(x[:1], classes[:1], templates), want[:1], rtol=1e-9, atol=1e-9
    )


def test_frame_features_keep_numpy_answers_outside_the_domain() -> None:
    """A NaN frame gives NaN features (scored as infinitely unusual), never a Python math error."""
    x = np.full((1, 1, 8, 8), np.nan, dtype=np.float32)
    f = frame_features(x, np.full((1, 3), 1 / 3))
    assert np.isnan(f).any()
    neg = np.full((1, 1, 8, 8), -0.5, dtype=np.float32)  # outside [0, 1]: NaN, not a ValueError
    assert np.isnan(frame_features(neg, np.full((1, 3), 1 / 3))).any()


def test_colour_inputs_add_a_colour_cast_feature() -> None:
    rng = np.random.default_rng(3)
    x = np.repeat(clean_images(rng, 60), 3, axis=1)
    entry = ood_reference(x, clean_probs(rng, x))
    assert entry["features"][-3:] == ["chroma_0", "chroma_1", "chroma_2"]
    test = OodTest(entry, num_classes=4, channels=3)
    tinted = x[:1].copy()
    tinted[:, 2] = np.clip(tinted[:, 2] + 0.3, 0, 1)
    assert test.p_values(tinted, clean_probs(rng, tinted))[0] == test.min_p


def test_large_inputs_are_read_on_a_grid_and_still_see_pixel_level_patterns() -> None:
    rng = np.random.default_rng(9)
    small = clean_images(rng, 30, size=16)[:, 0]
    x = np.stack([cv2.resize(img, (224, 224), interpolation=cv2.INTER_LINEAR) for img in small])
    x = np.repeat(x[:, None], 3, axis=1)
    test = OodTest(ood_reference(x, clean_probs(rng, x)), num_classes=4, channels=3)
    yy, xx = np.mgrid[:224, :224]
    checker = np.repeat(((yy + xx) % 2).astype(np.float32)[None, None], 3, axis=1)  # 1-pixel squares
    assert test.p_values(checker, clean_probs(rng, checker))[0] == test.min_p
    assert test.p_values(x[:1], clean_probs(rng, x[:1]))[0] > test.min_p


def test_rates() -> None:
    assert check_rate(None, 5000) == 1e-3 and check_rate(None, 99) == 0.01 and check_rate(0, 99) == 0
    for bad in (-0.1, 1.0, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match="ood rate"):
            check_rate(bad, 100)


# --- the manifest entry -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def entry() -> dict:
    return ood_reference(*draw(np.random.default_rng(4), 150))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"version": 3}, "monitor.ood.version"),
        ({"features": ["mean"]}, "monitor.ood.features"),
        ({"centre": [[0.0] * D] * 3}, "monitor.ood.centre"),
        ({"centre": "zero"}, "monitor.ood.centre"),
        ({"scale": [[1.0] * D]}, "monitor.ood.centre and monitor.ood.scale"),
        ({"scale": [[1.0] * (D - 1) + [0.0]] * 4}, rf"monitor.ood.scale\[0\]\[{D - 1}\]"),
        ({"scale": [[1.0] * (D - 1) + ["x"]] * 4}, rf"monitor.ood.scale\[0\]\[{D - 1}\]"),
        ({"scale": [[1.0] * (D - 1) + [float("nan")]] * 4}, rf"monitor.ood.scale\[0\]\[{D - 1}\]"),
        ({"scale": [[1.0] * (D - 1)]}, r"monitor.ood.scale\[0\]"),
        ({"reference": [1.0] * 5}, "monitor.ood.reference"),
        ({"reference": list(range(30, 0, -1))}, "monitor.ood.reference must be sorted"),
        ({"reference": [float("inf")] * 30}, "monitor.ood.reference"),
        ({"reference": ["a"] * 30}, "monitor.ood.reference"),
    ],
)
def test_every_bad_value_of_the_entry_is_refused_by_name(entry: dict, change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        OodTest({**entry, **change}, num_classes=4, channels=1)


def test_the_entry_must_match_the_model(entry: dict) -> None:
    with pytest.raises(ValueError, match="monitor.ood.features"):
        OodTest(entry, num_classes=4, channels=3)
    with pytest.raises(ValueError, match="monitor.ood.centre"):
        OodTest(entry, num_classes=7, channels=1)
    with pytest.raises(ValueError, match="monitor.ood must be an object"):
        OodTest([1], num_classes=4, channels=1)
    assert OodTest.from_variant({"monitor": {"window": 10}}, num_classes=4, channels=1) is None


def test_too_few_calibration_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 19"):
        ood_reference(*draw(np.random.default_rng(5), 20))


# --- the runtime and the CLI ------------------------------------------------------------------


def frame_u8(x: np.ndarray, size: int = 28) -> np.ndarray:
    return cv2.resize(np.rint(x[0] * 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)


@pytest.fixture(scope="module")
def ood_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime fixtures' bundle with an fp32 ``monitor`` entry (``ood`` included) computed from
    that variant's own outputs on 200 blob images, as rrise-export makes it."""
    from rrise.runtime.backends import OnnxRuntimeBackend

    folder = make_bundle(tmp_path_factory.mktemp("ood") / "bundle")
    bundle = Bundle.load(folder)
    rng = np.random.default_rng(6)
    pre = np.stack([frame_u8(x) for x in clean_images(rng, 200)])[:, None].astype(np.float32) / 255
    manifest = dict(bundle.manifest)
    manifest.pop("files", None)
    for v in manifest["variants"]:
        if v["precision"] == "fp32":
            probs = OnnxRuntimeBackend(folder / v["file"]).run(pre)
            v["monitor"] = reference_from_probs(
                probs, bundle.calibration(v), images=pre, window=20, false_alarm=0.05
            )
    write_manifest(folder, manifest)
    return folder


def test_records_carry_ood_p_and_an_ood_frame_raises_the_alarm(ood_bundle: Path) -> None:
    from rrise.runtime import Runtime

    rt = Runtime(ood_bundle, precision="fp32")
    assert rt.ood is not None and rt.monitor is not None and rt.monitor.n_ref == rt.ood.n_ref
    clean = [frame_u8(x) for x in clean_images(np.random.default_rng(7), 30)]
    records = rt.certify_batch(clean)
    assert all(isinstance(r["ood_p"], float) and 0 < r["ood_p"] <= 1 for r in records)
    assert sum(r["alarm"] == "ood" for r in records) <= 3
    white = rt.certify(np.full((28, 28), 255, np.uint8))
    assert white["ood_p"] == rt.ood.min_p and white["alarm"].startswith("ood")
    bad = rt.certify(np.full((28, 28, 2), 3, np.uint8))  # an unusable frame: no p-value
    assert bad["error"] and bad["ood_p"] is None
    quiet = Runtime(ood_bundle, precision="fp32", watch={"ood_rate": 0})
    assert quiet.certify(np.full((28, 28), 255, np.uint8))["alarm"] is None
    assert Runtime(ood_bundle, precision="fp32", watch={"ood": False}).ood is None
    with pytest.raises(ValueError, match="unknown monitor option"):
        Runtime(ood_bundle, watch={"windw": 20})


def test_a_bundle_without_the_entry_works(ood_bundle: Path, tmp_path: Path) -> None:
    from rrise.runtime import Runtime

    bundle = Bundle.load(ood_bundle)
    manifest = dict(bundle.manifest)
    files = manifest.pop("files")
    for v in manifest["variants"]:
        if "monitor" in v:
            v["monitor"] = {k: x for k, x in v["monitor"].items() if k not in ("ood", "ood_threshold")}
    old = tmp_path / "old"
    old.mkdir()
    for name in files:
        (old / name).write_bytes((ood_bundle / name).read_bytes())
    write_manifest(old, manifest)
    rt = Runtime(old, precision="fp32")
    assert rt.ood is None and rt.monitor is not None and rt.monitor.n_ref is None
    records = rt.certify_batch([*sample_frames(3), np.full((28, 28), 255, np.uint8)])
    assert {r["ood_p"] for r in records} == {None} and {r["alarm"] for r in records} == {None}


def test_a_bad_entry_stops_the_runtime_with_its_name(ood_bundle: Path, tmp_path: Path) -> None:
    from rrise.runtime import Runtime

    bundle = Bundle.load(ood_bundle)
    manifest = dict(bundle.manifest)
    files = manifest.pop("files")
    fp32 = next(v for v in manifest["variants"] if v["precision"] == "fp32")
    fp32["monitor"]["ood"]["reference"] = fp32["monitor"]["ood"]["reference"][::-1]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in files:
        (bad / name).write_bytes((ood_bundle / name).read_bytes())
    write_manifest(bad, manifest)
    # refused at the door (Bundle.load's manifest schema), naming the variant's key
    with pytest.raises(BundleError, match=r"variants\[\d\]\.monitor.ood.reference must be sorted"):
        Runtime(bad, precision="fp32")


@pytest.fixture
def frames_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, x in enumerate(clean_images(np.random.default_rng(8), 6)):
        cv2.imwrite(str(folder / f"f{i}.png"), frame_u8(x))
    cv2.imwrite(str(folder / "f9_white.png"), np.full((28, 28), 255, np.uint8))
    return folder


def test_run_options_reach_the_monitor(
    ood_bundle: Path, frames_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import rrise.runtime.runtime as runtime_module

    seen: list[dict] = []
    real = runtime_module.load_monitors

    def spy(variant, **kw):
        seen.append(dict(kw["options"] or {}))
        return real(variant, **kw)

    monkeypatch.setattr(runtime_module, "load_monitors", spy)
    out = tmp_path / "records.jsonl"
    args = ["run", "--bundle", str(ood_bundle), "--source", str(frames_dir), "--precision", "fp32"]
    flags = [
        "--monitor-window",
        "12",
        "--monitor-step",
        "4",
        "--monitor-false-alarm",
        "0.05",
        "--ood-rate",
        "0.2",
    ]
    result = runner.invoke(app, [*args, "--jsonl", str(out), *flags])
    assert result.exit_code == 0, result.output
    assert seen[-1] == {"window": 12, "step": 4, "false_alarm": 0.05, "ood_rate": 0.2}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 7 and all(isinstance(r["ood_p"], float) for r in records)
    assert records[-1]["alarm"].startswith("ood")
    result = runner.invoke(app, [*args, "--jsonl", str(out), "--no-ood"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == {"ood": False}
    assert {json.loads(line)["ood_p"] for line in out.read_text().splitlines()} == {None}


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--monitor-false-alarm", "1.5", "false_alarm"),
        ("--monitor-window", "3", "window"),
        ("--monitor-step", "0", "step"),
        ("--ood-rate", "1", "ood rate"),
    ],
)
def test_bad_monitor_options_are_one_clear_message(
    ood_bundle: Path, frames_dir: Path, tmp_path: Path, flag: str, value: str, message: str
) -> None:
    out = tmp_path / "records.jsonl"
    args = ["run", "--bundle", str(ood_bundle), "--source", str(frames_dir), "--jsonl", str(out)]
    result = runner.invoke(app, [*args, flag, value])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() or out.read_text() == ""


# --- geometry (version 2) on sklearn's digits -------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as [n, 1, 8, 8] inputs in [0, 1], and the probabilities of a nearest-class-
    mean classifier fitted on the first 300 (which the returned 1,497, shuffled, exclude)."""
    from sklearn.datasets import load_digits

    x = (load_digits().images[300:] / 16.0).astype(np.float32)[:, None]
    x = x[np.random.default_rng(12).permutation(len(x))]  # sklearn's order is by writer, not random
    return x, _probs_of(x)


def _probs_of(x: np.ndarray) -> np.ndarray:
    from sklearn.datasets import load_digits

    data = load_digits()
    ref = (data.images[:300] / 16.0).reshape(300, -1)
    means = np.stack([ref[data.target[:300] == k].mean(axis=0) for k in range(10)])
    logits = -np.square(x.reshape(len(x), 1, -1) - means[None]).sum(axis=2) / 2.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_clean_digits_are_flagged_at_most_at_the_rate_over_exchangeable_splits(digits) -> None:
    # The guarantee is marginal over the reference draw: a fresh random split of exchangeable
    # digits into calibration (fit + reference) and deployment each time, version 2's score.
    x, p = digits
    rng = np.random.default_rng(11)
    rates = (0.02, 0.05, 0.1)
    flagged, frames = np.zeros(len(rates)), 0
    for _ in range(25):
        order = rng.permutation(len(x))
        cal, rest = order[:400], order[400:]
        test = OodTest(ood_reference(x[cal], p[cal]), num_classes=10, channels=1, rate=0.05)
        pv = test.p_values(x[rest], p[rest])
        flagged += [(pv <= a).sum() for a in rates]
        frames += len(rest)
    observed = flagged / frames
    for a, seen in zip(rates, observed):
        assert seen <= a + 3 * np.sqrt(a / (25 * 320)) + 0.005, (a, seen)
    assert observed[-1] > 0.05  # the rate is used, not wasted


def test_rotated_and_flipped_digits_are_flagged_far_more_often_than_clean(digits) -> None:
    x, p = digits
    cal, rest = x[:500], x[500:]
    test = OodTest(ood_reference(cal, p[:500]), num_classes=10, channels=1, rate=0.02)
    old = OodTest(ood_reference(cal, p[:500], version=1), num_classes=10, channels=1, rate=0.02)
    clean = (test.p_values(rest, p[500:]) <= test.rate).mean()
    assert clean <= 0.05
    moves = (
        np.rot90(rest, 1, axes=(2, 3)),
        np.rot90(rest, 2, axes=(2, 3)),
        rest[:, :, ::-1],
        rest[..., ::-1],
    )
    for moved in moves:  # rotated by 90° and 180°, flipped upside down and left to right
        moved = np.ascontiguousarray(moved)
        probs = _probs_of(moved)
        new_rate = (test.p_values(moved, probs) <= test.rate).mean()
        assert new_rate >= max(10 * clean, 0.2), new_rate  # measured: 1.0, 0.25, 0.30, 0.31; clean 0.014
        assert new_rate >= (old.p_values(moved, probs) <= old.rate).mean()


def test_the_entry_round_trips_through_json_and_the_monitor_validation(digits) -> None:
    from rrise import Calibration
    from rrise.monitor import validate_monitor

    x, p = digits
    cal = Calibration(sigma=0.25, quantile=0.5, alpha=0.05, beta=0.001, n_mc=1000, m=500)
    monitor = json.loads(json.dumps(reference_from_probs(p[:500], cal, images=x[:500], window=50)))
    validate_monitor(monitor, num_classes=10, channels=1)
    entry = monitor["ood"]
    assert entry["version"] == 2 and entry["template_shape"] == [1, 8, 8] and len(entry["norms"]) == 2
    direct = OodTest(ood_reference(x[:500], p[:500]), num_classes=10, channels=1)
    loaded = OodTest(entry, num_classes=10, channels=1)
    assert np.allclose(direct.p_values(x[500:], p[500:]), loaded.p_values(x[500:], p[500:]))
    with pytest.raises(ValueError, match="monitor.ood.template_shape"):
        loaded.p_values(np.zeros((1, 1, 28, 28), np.float32), p[:1])


def test_a_version_1_entry_without_templates_still_loads_and_scores(digits) -> None:
    x, p = digits
    old = json.loads(json.dumps(ood_reference(x[:500], p[:500], version=1)))
    assert "templates" not in old and len(old["features"]) == len(feature_names(1, 1))
    test = OodTest(old, num_classes=10, channels=1)
    assert test.version == 1 and test.templates is None
    pv = test.p_values(x[500:], p[500:])
    assert pv.shape == (len(x) - 500,) and np.all((pv > 0) & (pv <= 1))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"templates": None}, "monitor.ood.templates"),
        ({"templates": [[0.0] * 64] * 3}, "monitor.ood.templates"),
        ({"templates": [[2.0] * 64] * 4}, "monitor.ood.templates"),
        ({"template_shape": [1, 8]}, "monitor.ood.template_shape"),
        ({"template_shape": [3, 8, 8]}, "monitor.ood.template_shape"),
        ({"template_shape": [1, 40, 40]}, "monitor.ood.template_shape"),
        ({"norms": [1.0]}, "monitor.ood.norms"),
        ({"norms": [1.0, 0.0]}, "monitor.ood.norms"),
        ({"norms": None}, "monitor.ood.norms"),
    ],
)
def test_every_bad_geometry_value_is_refused_by_name(entry: dict, change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        OodTest({**entry, **change}, num_classes=4, channels=1)
