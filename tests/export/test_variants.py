"""Precision variants (int8, fp16) and TensorRT engines: each variant's own quantile, the selection-
split rule for int8 ranges, the runtime's choice of variant, and the engine paths with TensorRT faked."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from rrise import Bundle, BundleError
from rrise.bundle import sha256_file, write_manifest
from rrise.calibration import conformal_quantile
from rrise.datasets import load_dataset
from rrise.export import tensorrt_build, variants
from rrise.export.cli import app as export_app
from rrise.export.onnx_export import onnx_logits
from rrise.export.variants import add_precision_variant, check_disjoint, float32_intermediates
from rrise.inspect import format_inspection, inspect_bundle
from rrise.numerics import MICRO_BATCH_LIMIT, softmax
from rrise.runtime import Runtime
from rrise.runtime.backends import make_backend
from rrise.scores import conformal_scores, p_cap
from rrise.stats import clopper_pearson_lower

runner = CliRunner()


def flat(text: str) -> str:
    """CLI output with rich's box drawing and line wrapping removed."""
    return " ".join(text.replace("│", " ").split())


def own_quantile(bundle: Bundle, onnx_file: Path) -> float:
    """docs/CERTIFICATE.md calibration from scratch: the file's own CPU outputs on the calibration images."""
    c = bundle.manifest["calibration"]
    with np.load(bundle.file("calibration.npz")) as z:
        images, counts = z["images"], z["counts"]
    probs = softmax(onnx_logits(onnx_file, images))
    top = probs.argmax(1)
    rows = np.arange(len(probs))
    lower = clopper_pearson_lower(counts[rows, top], c["n_mc"], c["beta"])
    scores = conformal_scores(probs[rows, top], lower, p_cap(c["beta"], c["n_mc"]), c["score"])
    return conformal_quantile(scores, c["alpha"])


@pytest.fixture(scope="module")
def quant_npz(tmp_path_factory) -> Path:
    """Selection-split images of the tiny bundle's dataset (its calibration uses train[900:1200])."""
    path = tmp_path_factory.mktemp("q") / "selection.npz"
    np.savez(path, images=load_dataset("digits", "train").images[:300])
    return path


@pytest.fixture(scope="module")
def with_variants(tiny_bundle, quant_npz, tmp_path_factory) -> Bundle:
    folder = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("v") / "bundle"))
    with np.load(quant_npz) as z:
        add_precision_variant(folder, "int8", quant_images=z["images"], quant_source="selection.npz")
    return add_precision_variant(folder, "fp16")


@pytest.fixture
def copy(with_variants, tmp_path) -> Path:
    return Path(shutil.copytree(with_variants.path, tmp_path / "bundle"))


# --- int8 ------------------------------------------------------------------------------------------
def test_int8_variant_is_quantized_and_has_its_own_quantile(with_variants):
    b = with_variants
    v = b.variant("int8", "onnxruntime")
    path = b.file(v["file"])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert v["quantile"] == pytest.approx(own_quantile(b, path), abs=1e-12)
    assert v["calibrated_with"] == "onnxruntime-cpu" and v["sha256"] == sha256_file(path)
    assert v["max_batch"] in (1, MICRO_BATCH_LIMIT)
    assert v["quantization"]["format"] == "QDQ" and v["quantization"]["n_images"] == 300
    fp32 = b.variant("fp32", "onnxruntime")
    assert fp32["quantile"] == pytest.approx(own_quantile(b, b.file("surrogate.onnx")), abs=1e-12)
    # int8 numerics really differ from fp32's (so the fp32 quantile says nothing about them)
    with np.load(b.file("calibration.npz")) as z:
        x = z["images"]
    assert np.abs(onnx_logits(path, x) - onnx_logits(b.file("surrogate.onnx"), x)).max() > 1e-3
    assert 0.9 <= v["agreement_with_fp32"] <= 1.0
    assert Bundle.load(b.path).integrity_problems() == []


def test_int8_refuses_calibration_images(tiny_bundle, tmp_path):
    folder = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    before = (folder / "manifest.json").read_bytes()
    with np.load(folder / "calibration.npz") as z:
        cal = z["images"]
    mixed = np.concatenate([load_dataset("digits", "train").images[:50], cal[7:8]])
    with pytest.raises(
        ValueError, match=r"1 of the 51 quantization images \(first: row 50\) are calibration"
    ):
        add_precision_variant(folder, "int8", quant_images=mixed)
    with pytest.raises(ValueError, match="selection split"):
        add_precision_variant(folder, "int8")
    assert (folder / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_bundle.iterdir())
    check_disjoint(mixed[:50], cal)  # disjoint data passes


# --- fp16 ------------------------------------------------------------------------------------------
def test_fp16_is_strongly_typed_with_float32_io(with_variants, tmp_path):
    b = with_variants
    v = b.variant("fp16", "onnxruntime")
    model = onnx.load(str(b.file(v["file"])))
    onnx.checker.check_model(model, full_check=True)
    assert float32_intermediates(model) == []
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    io = [*model.graph.input, *model.graph.output]
    assert [t.type.tensor_type.elem_type for t in io] == [onnx.TensorProto.FLOAT] * 2
    assert [t.name for t in io] == ["input", "logits"]
    assert v["quantile"] == pytest.approx(own_quantile(b, b.file(v["file"])), abs=1e-12)
    assert v["calibrated_with"] == "onnxruntime-cpu"
    # the fp32 model itself is not strongly typed fp16
    assert float32_intermediates(onnx.load(str(b.file("surrogate.onnx"))))


def test_fp16_that_cpu_cannot_run_is_recorded_as_needing_recalibration(copy, monkeypatch):
    def no_kernel(path, images):
        raise RuntimeError("Could not find an implementation for Conv(11) node")

    monkeypatch.setattr(variants, "_cpu_outputs", no_kernel)
    b = add_precision_variant(copy, "fp16")
    v = b.variant("fp16", "onnxruntime")
    assert v["quantile"] is None and "Could not find an implementation" in v["needs_recalibration"]
    assert "calibrated_with" not in v and "max_batch" not in v
    with pytest.raises(RuntimeError, match="no quantile of its own"):
        make_backend(b, "onnxruntime", precision="fp16")
    with pytest.raises(BundleError, match="has no quantile"):
        b.calibration(v)
    assert make_backend(b, "auto")[1]["precision"] == "fp32"  # never picked by default
    text = format_inspection(*inspect_bundle(copy))
    assert "NO quantile" in text and "Integrity: OK" in text


@pytest.mark.parametrize(
    ("quantile", "extra", "match"),
    [
        (None, {}, "quantile: must be a number, or null with needs_recalibration saying why"),
        ("1.0", {}, "quantile: must be a number or null, got '1.0'"),
        (float("nan"), {}, "must be a finite number"),
    ],
)
def test_bad_variant_quantiles_are_refused(copy, quantile, extra, match):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["variants"][1].update({"quantile": quantile, **extra})
    manifest["variants"][1].pop("needs_recalibration", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))  # NaN is written as the token NaN
    with pytest.raises(BundleError, match=match):
        Bundle.load(copy)


# --- runtime ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_runtime_certifies_with_the_quantile_of_the_variant_it_runs(with_variants, precision):
    b = with_variants
    rt = Runtime(b, backend="onnxruntime", precision=precision)
    v = b.variant(precision, "onnxruntime")
    assert rt.variant["file"] == v["file"] and rt.calibration.quantile == v["quantile"]
    assert rt.backend_name == "onnxruntime[CPUExecutionProvider]"  # the numerics it was calibrated on
    frame = (load_dataset("digits", "test").images[0, 0] * 255).astype(np.uint8)
    rec = rt.certify(frame)
    probs = softmax(onnx_logits(b.file(v["file"]), rt.preprocessor(frame)[None]))[0]
    top = float(probs.max())
    from rrise.certificate import norm_ppf

    want = b.sigma * (norm_ppf(min(top, rt.calibration.p_cap)) - v["quantile"])
    assert rec["radius"] == pytest.approx(max(want, 0.0), abs=1e-6)


def test_rrise_run_takes_precision(with_variants, tmp_path):
    from rrise.cli import app

    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    for i, img in enumerate(load_dataset("digits", "test").images[:3]):
        cv2.imwrite(str(frames / f"{i}.png"), (img[0] * 255).astype(np.uint8))
    out = tmp_path / "out.jsonl"
    args = ["run", "--bundle", str(with_variants.path), "--source", str(frames), "--jsonl", str(out)]
    result = runner.invoke(app, [*args, "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert '"variant": "int8/onnxruntime"' in result.output
    assert len(out.read_text().splitlines()) == 3
    assert runner.invoke(app, [*args, "--precision", "int4"]).exit_code == 2


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_adds_int8_to_an_existing_bundle(tiny_bundle, quant_npz, tmp_path):
    folder = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    result = runner.invoke(
        export_app, ["--bundle", str(folder), "--precision", "int8", "--quant-data", str(quant_npz)]
    )
    assert result.exit_code == 0, result.output
    b = Bundle.load(folder)
    v = b.variant("int8", "onnxruntime")
    assert f"int8/onnxruntime surrogate.int8.onnx: quantile {v['quantile']:.6g}" in result.output
    assert v["quantization"]["data"] == "selection.npz"
    assert not [p for p in tmp_path.iterdir() if p.name != "bundle"]  # no temp folders left


def test_the_add_variant_options_add_int8_and_refuse_the_calibration_file(tiny_bundle, quant_npz, tmp_path):
    from rrise.export.options import VariantOptions
    from rrise.export.precision import Precision
    from rrise.export.variants import add_variant_options

    folder = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    refused = VariantOptions(precision=Precision.int8, quant_data=folder / "calibration.npz")
    with pytest.raises(ValueError, match="is the calibration file"):
        add_variant_options(folder, refused)
    with pytest.raises(ValueError, match="--precision int8 needs --quant-data"):
        add_variant_options(folder, VariantOptions(precision=Precision.int8))
    b = add_variant_options(folder, VariantOptions(precision="int8", quant_data=quant_npz, quant_samples=100))
    v = b.variant("int8", "onnxruntime")
    assert v["quantization"] == {**v["quantization"], "data": "selection.npz", "n_images": 100}


def test_cli_refuses_calibration_npz_and_bad_combinations(tiny_bundle, tmp_path):
    folder = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    before = (folder / "manifest.json").read_bytes()
    shutil.copy(folder / "calibration.npz", tmp_path / "renamed.npz")
    r = runner.invoke(
        export_app,
        ["--bundle", str(folder), "--precision", "int8", "--quant-data", str(tmp_path / "renamed.npz")],
    )
    assert r.exit_code == 1 and "is the calibration file" in flat(r.output)
    r = runner.invoke(export_app, ["--bundle", str(folder), "--precision", "int8"])
    assert r.exit_code == 2 and "--quant-data" in r.output
    r = runner.invoke(export_app, ["--bundle", str(folder), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not take --out" in flat(r.output)
    r = runner.invoke(export_app, ["--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--surrogate" in r.output
    assert "calibration.npz is refused" in flat(
        runner.invoke(export_app, ["--help"], env={"COLUMNS": "400"}).output
    )
    assert (folder / "manifest.json").read_bytes() == before


# --- TensorRT, faked ----------------------------------------------------------------------------------
class FakeEngineBackend:
    """Stands in for rrise.trt_session.TensorRTBackend: the "engine" is the ONNX it was built
    from, with slightly different numerics (as a real engine has), the same at every batch size."""

    scale_per_extra_row = 0.0

    def __init__(self, engine_path, **kwargs):
        from rrise.onnx_session import open_session

        self.session = open_session(Path(engine_path).read_text(), "onnxruntime-cpu")

    def run(self, x):
        logits = np.concatenate([self.session.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])
        return softmax((1.3 + self.scale_per_extra_row * (len(x) - 1)) * logits)

    def close(self):
        pass


class BatchDependentEngine(FakeEngineBackend):
    """An engine whose kernels change with the batch size (TensorRT picks tactics per shape): its
    outputs at batch 16 differ from batch 1's in the last digits."""

    scale_per_extra_row = 1e-6


def fake_engine_build(monkeypatch, backend=FakeEngineBackend) -> dict:
    """TensorRT faked: build_engine writes the ONNX path as the "engine"; returns its arguments."""
    calls = {}

    def fake_build(onnx_path, engine_path, **kw):
        calls.update(kw, onnx=Path(onnx_path).name)
        Path(engine_path).write_text(str(onnx_path))
        return Path(engine_path)

    def fake_base_build(onnx_path, engine_path, **kw):  # the base model's engine, built alongside
        calls["base"] = dict(kw, onnx=Path(onnx_path).name)
        Path(engine_path).write_text(str(onnx_path))
        return Path(engine_path)

    monkeypatch.setattr(tensorrt_build, "build_engine", fake_build)
    monkeypatch.setattr(tensorrt_build, "build_base_engine", fake_base_build)
    monkeypatch.setattr(
        tensorrt_build,
        "engine_info",
        lambda: {"trt_version": "10.3.0", "compute_capability": "8.7", "device": "Orin"},
    )
    import rrise.runtime.backends as backends
    import rrise.trt_session as trt_session

    monkeypatch.setattr(trt_session, "TensorRTBackend", backend)  # export's recalibration
    monkeypatch.setattr(backends, "TensorRTBackend", backend)  # the runtime
    return calls


def own_engine_quantile(bundle: Bundle, probs: np.ndarray) -> float:
    c = bundle.manifest["calibration"]
    with np.load(bundle.file("calibration.npz")) as z:
        counts = z["counts"]
    top = probs.argmax(1)
    lower = clopper_pearson_lower(counts[np.arange(len(probs)), top], c["n_mc"], c["beta"])
    scores = conformal_scores(probs.max(1), lower, p_cap(c["beta"], c["n_mc"]), "probit")
    return conformal_quantile(scores, c["alpha"])


def test_cli_engine_builds_recalibrates_and_records_the_device(with_variants, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(with_variants.path, tmp_path / "bundle"))
    calls = fake_engine_build(monkeypatch)
    args = ["--bundle", str(folder), "--precision", "fp16", "--engine", "tensorrt"]
    result = runner.invoke(
        export_app, [*args, "--timing-cache", str(tmp_path / "t.cache"), "--max-batch", "32"]
    )
    assert result.exit_code == 0, result.output
    assert calls["onnx"] == "surrogate.fp16.onnx" and calls["strongly_typed"] is True
    assert calls["max_batch"] == 32 and calls["timing_cache"] == tmp_path / "t.cache"
    b = Bundle.load(folder)
    v = b.variant("fp16", "tensorrt")
    assert (v["file"], v["trt_version"], v["compute_capability"]) == (
        "surrogate.fp16.engine",
        "10.3.0",
        "8.7",
    )
    assert v["calibrated_with"] == "tensorrt" and v["built_from"] == "surrogate.fp16.onnx"
    # the same outputs at every batch size: exact up to the runtime's micro-batch (the profile allows 32)
    assert v["max_batch"] == MICRO_BATCH_LIMIT and v["batch_range"] == [1, 32]
    with np.load(b.file("calibration.npz")) as z:
        x = z["images"]
    probs = softmax(1.3 * onnx_logits(b.file("surrogate.fp16.onnx"), x))
    assert v["quantile"] == pytest.approx(own_engine_quantile(b, probs), abs=1e-12)
    assert v["quantile"] != b.variant("fp16", "onnxruntime")["quantile"]
    assert v["parity"]["argmax_agreement"] == 1.0 and v["parity"]["max_abs_diff_probs"] > 0
    assert "fp16/tensorrt surrogate.fp16.engine" in result.output
    assert "error" not in result.output


def test_engine_whose_outputs_depend_on_the_batch_size_gets_max_batch_1(with_variants, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(with_variants.path, tmp_path / "bundle"))
    calls = fake_engine_build(monkeypatch, BatchDependentEngine)
    args = ["add-variant", "--bundle", str(folder), "--engine", "tensorrt"]  # an fp32 engine
    result = runner.invoke(export_app, args)
    assert result.exit_code == 0, result.output
    assert calls["onnx"] == "surrogate.onnx" and calls["strongly_typed"] is False
    assert calls["max_batch"] == MICRO_BATCH_LIMIT  # the profile covers what the runtime hands it
    b = Bundle.load(folder)
    v = b.variant("fp32", "tensorrt")
    assert v["max_batch"] == 1 and v["calibrated_with"] == "tensorrt"
    assert "max batch 1" in result.output
    # its quantile holds for the batch-1 outputs, the ones the runtime may use
    with np.load(b.file("calibration.npz")) as z:
        x = z["images"]
    probs = np.concatenate(
        [softmax(1.3 * onnx_logits(b.file("surrogate.onnx"), x[i : i + 1])) for i in range(len(x))]
    )
    assert v["quantile"] == pytest.approx(own_engine_quantile(b, probs), abs=1e-12)


def test_build_engine_strongly_typed_sets_the_network_flag(monkeypatch, tmp_path):
    from tests.export.test_export import fake_tensorrt

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    trt, calls = fake_tensorrt("10.3.0", has_fp16_flag=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    tensorrt_build.build_engine(onnx_path, tmp_path / "m.engine", strongly_typed=True)
    assert calls["network_flags"] == 1 << 1 and calls["flags"] == []  # STRONGLY_TYPED, no FP16 flag
    with pytest.raises(ValueError, match="exclude each other"):
        tensorrt_build.build_engine(onnx_path, tmp_path / "m.engine", strongly_typed=True, fp16=True)


def fake_device(monkeypatch, trt_version: str, cc: tuple[int, int]) -> None:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = trt_version
    pycuda, driver = types.ModuleType("pycuda"), types.ModuleType("pycuda.driver")
    driver.init = lambda: None
    driver.Device = lambda i: types.SimpleNamespace(compute_capability=lambda: cc)
    pycuda.driver = driver
    for name, mod in (("tensorrt", trt), ("pycuda", pycuda), ("pycuda.driver", driver)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_engine_from_another_tensorrt_version_says_to_rebuild_and_how(copy, monkeypatch):
    (copy / "surrogate.fp16.engine").write_bytes(b"engine")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["variants"].append(
        {
            "precision": "fp16",
            "backend": "tensorrt",
            "file": "surrogate.fp16.engine",
            "quantile": 0.9,
            "calibrated_with": "tensorrt",
            "max_batch": 1,
            "trt_version": "10.3.0",
            "compute_capability": "8.7",
        }
    )
    write_manifest(copy, manifest)
    b = Bundle.load(copy)
    fake_device(monkeypatch, "10.7.0", (8, 7))
    with pytest.raises(RuntimeError) as err:
        make_backend(b, "tensorrt")
    msg = " ".join(str(err.value).split())
    assert "built with TensorRT 10.3.0, this device has TensorRT 10.7.0" in msg
    assert f"rrise-export --engine tensorrt --precision fp16 --bundle {copy}" in msg
    fake_device(monkeypatch, "10.3.0", (9, 0))
    with pytest.raises(
        RuntimeError, match=r"built for compute capability 8\.7, this GPU is compute capability 9\.0"
    ):
        make_backend(b, "tensorrt", precision="fp16")
    backend, variant = make_backend(b, "auto")  # falls back to a variant that can run here
    assert variant["backend"] == "onnxruntime" and variant["precision"] == "fp32"


def test_variants_calibrated_on_the_cpu_are_pinned_to_the_cpu_provider(with_variants, monkeypatch):
    import rrise.runtime.backends as backends

    asked = {}

    class Recorder:
        def __init__(self, model, calibrated_with=None, *, where=None, **kw):
            assert isinstance(model, bytes)  # the checked bytes, never the path again
            asked[Path(where).name] = calibrated_with

    monkeypatch.setattr(backends, "OnnxRuntimeBackend", Recorder)
    for precision in ("fp32", "int8", "fp16"):
        make_backend(with_variants, "onnxruntime", precision=precision)
    assert asked == {
        "surrogate.onnx": "onnxruntime-cpu",
        "surrogate.int8.onnx": "onnxruntime-cpu",
        "surrogate.fp16.onnx": "onnxruntime-cpu",
    }


def _import_failing(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "onnxruntime":
            raise error
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake)


def test_onnxruntime_that_fails_to_load_is_not_called_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from rrise.onnx_session import providers_for

    _import_failing(monkeypatch, ImportError("libonnxruntime.so: cannot open shared object file"))
    with pytest.raises(RuntimeError, match="installed but does not load: libonnxruntime.so"):
        providers_for("onnxruntime-cpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match="onnxruntime is not installed"):
        providers_for("onnxruntime-cpu")


def test_a_ctrl_c_while_onnxruntime_loads_stays_a_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    from rrise.onnx_session import providers_for

    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as interrupt:
        try:
            raise ImportError("initialization failed") from interrupt
        except ImportError as error:
            failed = error
    _import_failing(monkeypatch, failed)
    with pytest.raises(KeyboardInterrupt):
        providers_for("onnxruntime-cpu")
