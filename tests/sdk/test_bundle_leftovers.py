"""What a bundle says about how it was made and what it refuses: the profile in ``rrise inspect``,
``monitor`` entries validated at ``Bundle.load``, the README's int8 command on a work folder's
``selection.npz``, and ``rrise-export add-variant`` errors without a stray exit code."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rrise.bundle import Bundle, BundleError, write_manifest
from rrise.cli import app as rrise_app
from rrise.export.cli import app as export_app

README = Path(__file__).resolve().parents[2] / "README.md"
runner = CliRunner()


def _linear_onnx(path: Path, shape: tuple[int, int, int], classes: int, seed: int) -> Path:
    """input [batch, C, H, W] → Flatten → MatMul + Add → logits [batch, classes]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    w = numpy_helper.from_array((0.6 * rng.standard_normal((d, classes))).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny digits work folder with what the bundle stage leaves: ``bundle/`` (calibrated on the
    folder's calibration split, synthetic MC counts), ``made_with`` recorded, ``selection.npz``."""
    from rrise import CalibrationSpec, conformalize
    from rrise.bundle import sha256_file
    from rrise.calibrate.bundling import record_profile, write_selection_npz
    from rrise.calibrate.workdir import RunConfig, Workdir
    from rrise.export.bundler import BundleSources, pack_bundle
    from rrise.export.onnx_export import onnx_logits
    from rrise.numerics import softmax

    w = Workdir.open(tmp_path_factory.mktemp("fm") / "fm", RunConfig(dataset="digits"), show_progress=False)
    ds, cal_index = w.data("train"), w.splits()["calibration"]
    surrogate = _linear_onnx(w.path("surrogate.onnx"), ds.shape, len(ds.classes), seed=0)
    base = _linear_onnx(w.path("base.onnx"), ds.shape, len(ds.classes), seed=1)
    images = ds.images[cal_index]
    probs = softmax(onnx_logits(surrogate, images))
    rng = np.random.default_rng(3)
    counts = np.stack([rng.multinomial(200, p) for p in probs]).astype(np.int64)
    np.savez(w.path("calibration.npz"), images=images, counts=counts, probs=probs)
    spec = CalibrationSpec(sigma=0.25, n_mc=200, alpha=0.1, beta=0.01)
    cal = conformalize(
        spec, probs, counts, base_sha256=sha256_file(base), surrogate_sha256=sha256_file(surrogate)
    )
    pack_bundle(
        w.path("bundle"),
        BundleSources(
            surrogate_onnx=surrogate,
            base_onnx=base,
            calibration=cal,
            calibration_npz=w.path("calibration.npz"),
            labels=ds.classes,
            preprocess={"color": "gray", "resize": [8, 8], "interpolation": "area", "layout": "NCHW"},
            dataset="digits",
            input_shape=ds.shape,
            parity_max_abs_diff=0.0,
        ),
    )
    record_profile(w.path("bundle"), w.prof.name, w.prof.note)
    write_selection_npz(w)
    return w


def test_selection_npz_holds_the_selection_split_and_no_calibration_image(workdir) -> None:
    with np.load(workdir.path("selection.npz"), allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    ds, sp = workdir.data("train"), workdir.splits()
    assert images.dtype == np.float32 and images.shape == (workdir.prof.n_selection, *ds.shape)
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, ds.images[sp["selection"]])
    np.testing.assert_array_equal(labels, ds.labels[sp["selection"]])
    assert not set(sp["selection"]) & set(sp["calibration"])


def test_the_readme_int8_command_runs_on_the_work_folder(workdir, tmp_path: Path) -> None:
    lines = re.findall(
        r"^rrise-export --bundle runs/fm/bundle --precision int8 .*$", README.read_text(), re.M
    )
    assert lines, "the README has no int8 rrise-export command"
    root = shutil.copytree(workdir.root, tmp_path / "fm")
    args = shlex.split(lines[0].split("#")[0].replace("runs/fm", str(root)))[1:]
    result = runner.invoke(export_app, args)
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(root / "bundle")
    int8 = next(v for v in bundle.manifest["variants"] if v["precision"] == "int8")
    assert np.isfinite(int8["quantile"]) and "int8/onnxruntime" in result.output
    assert bundle.manifest["made_with"]["profile"] == "quick"  # kept when the manifest is rewritten


def test_inspect_shows_the_profile_beside_each_variants_largest_radius(workdir) -> None:
    result = runner.invoke(rrise_app, ["inspect", str(workdir.path("bundle"))])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Profile      quick" in text and "8×8 images" in text  # the digits profile's note
    assert text.index("Profile") < text.index("largest radius")
    out = json.loads(runner.invoke(rrise_app, ["inspect", str(workdir.path("bundle")), "--json"]).output)
    assert out["summary"]["made_with"] == {"profile": "quick", "profile_note": workdir.prof.note}


def _rewritten(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    change(manifest)
    write_manifest(dst, manifest)
    return dst


def test_a_bundle_without_a_profile_says_not_recorded(workdir, tmp_path: Path) -> None:
    old = _rewritten(workdir.path("bundle"), tmp_path / "old", lambda m: m.pop("made_with"))
    result = runner.invoke(rrise_app, ["inspect", str(old)])
    assert result.exit_code == 0 and "Profile      not recorded" in result.output


def test_a_bad_made_with_is_refused_by_key(workdir, tmp_path: Path) -> None:
    def change(m):
        m["made_with"] = {"profile": 3}

    bad = _rewritten(workdir.path("bundle"), tmp_path / "bad", change)
    with pytest.raises(BundleError, match="made_with.profile"):
        Bundle.load(bad)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (
            lambda mon: mon["ood"]["scale"][0].__setitem__(1, -1.0),
            r"variants\[0\]\.monitor\.ood\.scale\[0\]\[1\]",
        ),
        (lambda mon: mon["ood"].__setitem__("features", ["mean"]), r"variants\[0\]\.monitor\.ood\.features"),
        (lambda mon: mon["ood"].__setitem__("version", 9), r"variants\[0\]\.monitor\.ood\.version"),
        (lambda mon: mon.__setitem__("ood", "oops"), r"variants\[0\]\.monitor\.ood must be an object"),
        (lambda mon: mon.__setitem__("counts", [1, 2]), r"variants\[0\]\.monitor: .*counts"),
        (lambda mon: mon.__setitem__("window", 3), r"variants\[0\]\.monitor: monitor window"),
        (lambda mon: mon.__setitem__("false_alarm", 2), r"variants\[0\]\.monitor: .*false_alarm"),
        (lambda mon: mon.pop("edges"), r"variants\[0\]\.monitor"),
        (lambda mon: mon.__setitem__("score_threshold", -1.0), r"variants\[0\]\.monitor: .*thresholds"),
    ],
)
def test_a_bad_monitor_value_is_refused_at_load_naming_the_key(workdir, tmp_path: Path, change, key) -> None:
    bad = _rewritten(workdir.path("bundle"), tmp_path / "bad", lambda m: change(m["variants"][0]["monitor"]))
    with pytest.raises(BundleError, match=key):
        Bundle.load(bad)
    result = runner.invoke(rrise_app, ["inspect", str(bad)])
    assert result.exit_code == 1 and "Integrity: FAILED" in result.output
    assert re.search(key, result.output.replace("\n    ", " "))


def test_add_variant_errors_are_one_line_without_a_stray_exit_code(workdir, tmp_path: Path) -> None:
    root = shutil.copytree(workdir.root, tmp_path / "fm")
    cal = root / "bundle" / "calibration.npz"
    for args in (
        ["add-variant", "--bundle", str(root / "bundle"), "--precision", "int8", "--quant-data", str(cal)],
        ["--bundle", str(root / "bundle"), "--precision", "int8", "--quant-data", str(cal)],
        ["add-variant", "--bundle", str(root / "nope"), "--precision", "fp16"],
    ):
        result = runner.invoke(export_app, args)
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0] != "error: 1", result.output
