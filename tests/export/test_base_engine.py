"""The base model's TensorRT engine, where TensorRT is absent: ``rrise-export --engine tensorrt``
builds it from the bundle's base ONNX with fp32 numerics and lists it under ``base_model.engines``
(validated), and adaptive certification runs its draws on it with ``--backend tensorrt`` (or auto),
refusing by name when the bundle has no engine for this GPU.

The fakes: a ``tensorrt`` module that records what the builder is asked (build path), and an
"engine" that is the ONNX it was built from, run by onnxruntime (runtime path): the draws on the
engine are then exactly the onnxruntime draws, which the tests compare against."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from rrise.bundle import Bundle, BundleError
from rrise.export import engine as engine_mod
from rrise.export import tensorrt_build
from rrise.manifest_schema import ManifestError, validate_manifest
from rrise.numerics import to_probs
from rrise.onnx_session import open_session
from rrise.runtime import Runtime
from rrise.runtime import adaptive as adaptive_mod
from rrise.runtime import backends as backends_mod
from rrise.runtime.adaptive import BaseClassifier, EngineClassifier, McCertifier, McOptions, McRefused
from rrise.sequential import SequentialOptions
from tests.export.fake_tensorrt import fake_module
from tests.tiny_bundle import LINEAR_SHAPE, linear_sources, make_linear_bundle

INFO = {"trt_version": "10.3.0", "compute_capability": "8.7", "device": "Orin"}
ENGINE_FILE = "base.sm87.trt10.3.0.engine"


# --- fakes ------------------------------------------------------------------------------------------
class OnnxEngine:
    """A stand-in for :class:`rrise.trt_session.TensorRTBackend` whose serialized "engine" is the
    ONNX it was built from, run by onnxruntime on the CPU."""

    def __init__(self, engine, *, output_kind="logits", where=None, **_):
        self.data = data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        self.rows = 0
        self.session = open_session(data, "onnxruntime-cpu")
        self.input_name = self.session.get_inputs()[0].name
        self.sample_shape = tuple(self.session.get_inputs()[0].shape[1:])
        self.output_kind, self.name, self.closed = output_kind, "tensorrt[10.3.0]", False

    def run(self, x: np.ndarray) -> np.ndarray:
        self.rows += len(x)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        return to_probs(out, self.output_kind)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def device(monkeypatch):
    """A machine with TensorRT 10.3.0 and a compute-capability 8.7 GPU (modules only)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    pycuda = types.ModuleType("pycuda")
    driver = types.ModuleType("pycuda.driver")
    gpu = types.SimpleNamespace(cc=(8, 7))
    driver.init = lambda: None
    driver.Device = lambda i: types.SimpleNamespace(compute_capability=lambda: gpu.cc)
    pycuda.driver = driver
    for name, module in (("tensorrt", trt), ("pycuda", pycuda), ("pycuda.driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)
    for module in (engine_mod.trt_session, adaptive_mod, backends_mod):
        monkeypatch.setattr(module, "TensorRTBackend", OnnxEngine)
    return gpu


@pytest.fixture
def builds(monkeypatch):
    """tensorrt_build's two builds, recording their arguments and writing the ONNX as the engine."""
    calls: list[tuple[str, bytes, dict]] = []

    def fake(kind):
        def build(onnx_path, engine_path, **kwargs):
            data = Path(onnx_path).read_bytes()
            calls.append((kind, data, kwargs))
            Path(engine_path).write_bytes(data)
            return Path(engine_path)

        return build

    monkeypatch.setattr(tensorrt_build, "build_engine", fake("surrogate"))
    monkeypatch.setattr(tensorrt_build, "build_base_engine", fake("base"))
    return calls


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return linear_sources(tmp_path_factory.mktemp("linear"))


@pytest.fixture
def linear(sources, tmp_path) -> Path:
    return make_linear_bundle(sources, tmp_path / "bundle").path


@pytest.fixture
def with_engines(linear, device, builds) -> Path:
    engine_mod.add_engine(linear, "fp32", info=INFO)
    return linear


# --- the build ----------------------------------------------------------------------------------------
def fake_builder(version: str, *, batch: int = -1, has_tf32: bool = True):
    """Just enough of the tensorrt module to drive build_base_engine, recording what it is asked."""
    calls: dict = {"set": [], "cleared": []}
    tensor = types.SimpleNamespace(name="pixels", shape=(batch, *LINEAR_SHAPE), dtype="float")
    network = types.SimpleNamespace(num_inputs=1, num_layers=0, get_input=lambda i: tensor)
    config = types.SimpleNamespace(
        add_optimization_profile=lambda p: None,
        create_timing_cache=lambda data: data,
        set_timing_cache=lambda c, ignore: True,
        get_timing_cache=lambda: types.SimpleNamespace(serialize=lambda: b"cache"),
        set_flag=calls["set"].append,
        clear_flag=calls["cleared"].append,
    )

    flags = types.SimpleNamespace(TF32="TF32") if has_tf32 else types.SimpleNamespace()
    trt = fake_module(
        version, network=network, config=config, calls=calls, flags=flags, engine=b"base engine"
    )
    return trt, calls


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_the_base_engine_is_built_from_the_base_onnx_with_fp32_numerics(
    monkeypatch, sources, tmp_path, version
):
    trt, calls = fake_builder(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = tensorrt_build.build_base_engine(sources["base"], tmp_path / "b.engine", max_batch=256)
    assert path.read_bytes() == b"base engine"
    assert calls["parsed"] == Path(sources["base"]).read_bytes()
    assert calls["network_flags"] == 0  # neither strongly typed nor anything else: an fp32 network
    assert calls["set"] == [] and calls["cleared"] == ["TF32"]  # no FP16/INT8; TF32 off
    # the base ONNX may name its input anything; a dynamic batch gets [1, max_batch]
    assert calls["shape"] == ("pixels", (1, *LINEAR_SHAPE), (256, *LINEAR_SHAPE), (256, *LINEAR_SHAPE))


def test_a_fixed_batch_base_onnx_keeps_its_batch(monkeypatch, sources, tmp_path):
    trt, calls = fake_builder("11.0.0", batch=8, has_tf32=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    tensorrt_build.build_base_engine(sources["base"], tmp_path / "b.engine", max_batch=256)
    assert calls["shape"][1:] == ((8, *LINEAR_SHAPE),) * 3 and calls["cleared"] == []


def test_export_engine_adds_the_base_models_engine_to_the_manifest(with_engines, builds, sources):
    kinds = [(kind, kwargs) for kind, _, kwargs in builds]
    assert [k for k, _ in kinds] == ["surrogate", "base"]
    assert builds[1][1] == Path(sources["base"]).read_bytes()  # built from the bundle's base ONNX
    assert kinds[1][1]["max_batch"] == 256 and "fp16" not in kinds[1][1]
    bundle = Bundle.load(with_engines)
    (entry,) = bundle.manifest["base_model"]["engines"]
    assert entry["file"] == ENGINE_FILE and entry["sha256"] == bundle.manifest["files"][ENGINE_FILE]
    assert (entry["trt_version"], entry["compute_capability"], entry["device"]) == ("10.3.0", "8.7", "Orin")
    assert entry["built_from"] == "base.onnx" and entry["parity"]["argmax_agreement"] == 1.0
    assert bundle.variant("fp32", "tensorrt")["trt_version"] == "10.3.0"  # the surrogate's engine too
    # rebuilt on the same device: replaced, not added; on another GPU: one entry each
    engine_mod.add_base_engine(with_engines, info=INFO)
    engine_mod.add_base_engine(with_engines, info={**INFO, "compute_capability": "9.0"})
    engines = Bundle.load(with_engines).manifest["base_model"]["engines"]
    assert [e["compute_capability"] for e in engines] == ["8.7", "9.0"]
    assert (with_engines / "base.sm90.trt10.3.0.engine").is_file()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda e: e.update(sha256="0" * 64), "base_model.engines[0].sha256"),
        (lambda e: e.update(file="../escape.engine"), "base_model.engines[0].file"),
        (lambda e: e.update(max_batch=0), "base_model.engines[0].max_batch"),
        (lambda e: e.pop("trt_version"), "trt_version"),
    ],
)
def test_a_bad_base_engine_entry_is_refused_by_key(with_engines, change, named):
    manifest = json.loads((with_engines / "manifest.json").read_text())
    change(manifest["base_model"]["engines"][0])
    with pytest.raises(ManifestError, match=re_escape(named)):
        validate_manifest(manifest)


def test_two_engines_for_one_gpu_are_refused(with_engines):
    manifest = json.loads((with_engines / "manifest.json").read_text())
    engines = manifest["base_model"]["engines"]
    engines.append(dict(engines[0]))
    with pytest.raises(ManifestError, match=r"base_model\.engines\[1\]: must be the only engine"):
        validate_manifest(manifest)


def test_a_changed_engine_file_is_refused(with_engines):
    (with_engines / ENGINE_FILE).write_bytes(b"tampered")
    with pytest.raises(BundleError, match=ENGINE_FILE):
        Bundle.load(with_engines)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# --- the runtime ----------------------------------------------------------------------------------------
def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(LINEAR_SHAPE, dtype=np.float32)


def test_draws_on_the_engine_are_the_onnxruntime_draws(with_engines):
    bundle = Bundle.load(with_engines)
    options = SequentialOptions(budget=2048, batch_size=256)
    on_engine = McCertifier.from_bundle(bundle, options, seed=3, backend="tensorrt")
    on_ort = McCertifier.from_bundle(bundle, options, seed=3, backend="onnxruntime")
    assert isinstance(on_engine.classify, EngineClassifier) and isinstance(on_ort.classify, BaseClassifier)
    assert on_engine.classify.backend.data == bundle.file("base.onnx").read_bytes()  # the base model's
    x = _x()
    top = int(BaseClassifier(bundle.file("base.onnx").read_bytes())(x[None])[0])
    a, b = on_engine.certify(x, top), on_ort.certify(x, top)
    assert (a.draws, a.successes, a.p_lower, a.stop) == (b.draws, b.successes, b.p_lower, b.stop)
    on_engine.close()
    assert on_engine.classify.backend.closed


def test_the_runtime_runs_its_draws_on_the_engine_and_frees_it(with_engines):
    rt = Runtime(with_engines, backend="tensorrt", mc_budget=1024, require_radius=0.3)
    mc = rt.adaptive.mc
    assert isinstance(mc.classify, EngineClassifier) and rt.backend_name == "tensorrt[10.3.0]"
    rng = np.random.default_rng(0)
    records = rt.certify_batch([rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(6)])
    draws = sum(r["mc_draws"] for r in records)
    assert draws > 0 and draws == mc.classify.backend.rows  # every draw ran on the base engine
    rt.close()
    assert mc.classify.backend.closed


def test_auto_uses_the_engine_where_one_fits_else_onnxruntime(with_engines, linear_no_engine, device):
    with Runtime(with_engines, backend="auto", mc_budget=1024, require_radius=0.05) as rt:
        assert isinstance(rt.adaptive.mc.classify, EngineClassifier)
    with Runtime(linear_no_engine, backend="auto", mc_budget=1024, require_radius=0.05) as rt:
        assert isinstance(rt.adaptive.mc.classify, BaseClassifier)
    device.cc = (9, 0)  # another GPU: its engine does not run here
    with Runtime(with_engines, backend="auto", mc_budget=1024, require_radius=0.05) as rt:
        assert isinstance(rt.adaptive.mc.classify, BaseClassifier)


@pytest.fixture
def linear_no_engine(sources, tmp_path) -> Path:
    return make_linear_bundle(sources, tmp_path / "plain").path


def test_tensorrt_without_an_engine_for_this_gpu_is_refused_by_name(
    with_engines, linear_no_engine, device, monkeypatch
):
    mc = McOptions(mc_budget=1024, require_radius=0.05)
    with pytest.raises(
        McRefused, match=r"has no engine of it \(base_model\.engines\).*--backend onnxruntime"
    ):
        McCertifier.from_options(Bundle.load(linear_no_engine), mc, backend="tensorrt")
    device.cc = (9, 0)
    with pytest.raises(McRefused, match=r"compute capability 8\.7, this GPU is compute capability 9\.0"):
        Runtime(with_engines, backend="tensorrt", mc=mc)
    device.cc = (8, 7)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails
    with pytest.raises(McRefused, match="tensorrt and pycuda do not import here"):
        McCertifier.from_options(Bundle.load(with_engines), mc, backend="tensorrt")


def test_the_engine_is_opened_from_the_checked_bytes(with_engines):
    bundle = Bundle.load(with_engines)
    shutil.copyfile(with_engines / "surrogate.onnx", with_engines / ENGINE_FILE)  # changed after load
    with pytest.raises(BundleError, match=f"changed file {ENGINE_FILE}"):
        McCertifier.from_bundle(bundle, SequentialOptions(budget=1024, batch_size=256), backend="tensorrt")


def test_rrise_export_engine_prints_the_base_models_engine(linear, device, builds, monkeypatch):
    from typer.testing import CliRunner

    from rrise.export.cli import app

    monkeypatch.setattr(tensorrt_build, "engine_info", lambda: dict(INFO))
    result = CliRunner().invoke(app, ["add-variant", "--bundle", str(linear), "--engine", "tensorrt"])
    assert result.exit_code == 0, result.output
    assert f"base      {ENGINE_FILE}: TensorRT 10.3.0, compute capability 8.7" in result.output
    assert [kind for kind, _, _ in builds] == ["surrogate", "base"]


def test_a_failed_base_engine_says_the_surrogates_engine_was_added(linear, device, builds, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("TensorRT could not parse base.onnx: unsupported operator Foo")

    monkeypatch.setattr(tensorrt_build, "build_base_engine", fails)
    with pytest.raises(RuntimeError, match=r"surrogate's fp32 engine was added.*unsupported operator Foo"):
        engine_mod.add_engine(linear, "fp32", info=INFO)
    bundle = Bundle.load(linear)
    assert bundle.variant("fp32", "tensorrt") and "engines" not in bundle.manifest["base_model"]
