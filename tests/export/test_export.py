"""Export stage: ONNX export and parity, bundle assembly per the public interface, engine-aware recalibration,
TensorRT gating, and the ``rrise-export`` CLI end to end on a tiny model."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rrise import Bundle, BundleError, Calibration
from rrise.bundle import GUARANTEE, required_schema_version, sha256_file
from rrise.calibration import conformal_quantile
from rrise.export import tensorrt_build
from rrise.export.bundler import BundleSources, add_variant, build_bundle, pack_bundle, recalibrate_variant
from rrise.export.cli import app
from rrise.export.onnx_export import export_onnx, onnx_logits, onnx_parity
from rrise.numerics import MICRO_BATCH_LIMIT, softmax
from rrise.scores import conformal_scores
from rrise.stats import clopper_pearson_lower
from tests.export.fake_tensorrt import fake_module

SHAPE = (1, 8, 8)
K = 3
M = 60
N_MC = 1000
ALPHA, BETA = 0.1, 0.01
LABELS = ["cat", "dog", "eel"]
PREPROCESS = {"color": "gray", "resize": [8, 8], "interpolation": "area", "layout": "NCHW"}

# the public interface, the manifest: every key, nested ones under their parent.
DESIGN_KEYS = {
    "": [
        "schema_version",
        "rrise_version",
        "created",
        "model",
        "preprocess",
        "smoothing",
        "calibration",
        "base_model",
        "variants",
        "guarantee",
    ],
    "model": ["file", "sha256", "input", "output", "num_classes", "labels"],
    "model.input": ["name", "shape", "dtype", "range"],
    "model.output": ["name", "kind"],
    "preprocess": ["color", "resize", "interpolation", "layout"],
    "smoothing": ["sigma"],
    "calibration": ["score", "alpha", "beta", "m", "n_mc", "quantile", "p_cap", "dataset"],
    "base_model": ["file", "sha256"],
    "variants[]": ["precision", "backend", "file", "sha256", "quantile"],
}


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(16, K)
    )
    with torch.no_grad():
        model[-1].weight.mul_(8.0)  # spread the probabilities out
    return model.eval()


def quantile_from_scratch(probs: np.ndarray, counts: np.ndarray) -> float:
    """docs/CERTIFICATE.md calibration, written out with the rrise.certificate functions."""
    rows = np.arange(len(probs))
    top = probs.argmax(1)
    p_lower = clopper_pearson_lower(counts[rows, top], N_MC, BETA)
    p_cap = BETA ** (1 / N_MC)
    return conformal_quantile(conformal_scores(probs[rows, top], p_lower, p_cap, "probit"), ALPHA)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("src")
    model = tiny_model(0)
    rng = np.random.default_rng(0)
    images = rng.random((M, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(images)).double(), 1).numpy()
    counts = np.stack([rng.multinomial(N_MC, p) for p in probs]).astype(np.int64)
    np.savez(d / "calibration.npz", images=images, counts=counts, probs=probs)
    surrogate = export_onnx(model, d / "surrogate.onnx", SHAPE)
    base = export_onnx(tiny_model(1), d / "base.onnx", SHAPE)
    cal = Calibration(
        sigma=0.25,
        quantile=quantile_from_scratch(probs, counts),
        alpha=ALPHA,
        beta=BETA,
        n_mc=N_MC,
        m=M,
        base_sha256=sha256_file(base),
        surrogate_sha256=sha256_file(surrogate),
    )
    return {
        "dir": d,
        "model": model,
        "images": images,
        "counts": counts,
        "probs": probs,
        "cal": cal,
        "surrogate": surrogate,
        "base": base,
        "npz": d / "calibration.npz",
    }


def bundle_kwargs(src: dict, **overrides) -> dict:
    kw = dict(
        surrogate_onnx=src["surrogate"],
        base_onnx=src["base"],
        calibration=src["cal"],
        calibration_npz=src["npz"],
        labels=LABELS,
        preprocess=PREPROCESS,
        dataset="synthetic",
        input_shape=SHAPE,
        parity_max_abs_diff=1e-7,
    )
    kw.update(overrides)
    return kw


@pytest.fixture(scope="module")
def bundle(src, tmp_path_factory) -> Bundle:
    return pack_bundle(tmp_path_factory.mktemp("b") / "bundle", BundleSources(**bundle_kwargs(src)))


# --- ONNX export --------------------------------------------------------------------------------
def test_export_is_faithful_self_contained_and_batch_dynamic(tmp_path):
    model = tiny_model(3).train()  # export must use eval mode and leave the mode alone
    path = export_onnx(model, tmp_path / "m.onnx", SHAPE)
    assert model.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp or external-data files
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == [
        "logits"
    ]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(SHAPE)

    x = np.random.default_rng(1).random((7, *SHAPE), dtype=np.float32)
    assert onnx_parity(model, path, x) < 1e-5
    assert model.training
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    for batch in (1, 7):
        got = session.run(None, {"input": x[:batch]})[0]
        assert got.shape == (batch, K)
        np.testing.assert_allclose(got, want[:batch], atol=1e-5)


def test_parity_detects_a_different_model(src):
    assert onnx_parity(tiny_model(9), src["surrogate"], src["images"][:8]) > 1e-2


def test_export_refuses_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(tiny_model(0), tmp_path / "a.onnx", (8, 8))
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(ValueError, match=r"logits \[B, K\]"):
        export_onnx(conv, tmp_path / "b.onnx", SHAPE)
    assert list(tmp_path.iterdir()) == []


# --- bundle --------------------------------------------------------------------------------------
def test_bundle_has_every_design_key(bundle):
    m = json.loads((bundle.path / "manifest.json").read_text())
    for where, keys in DESIGN_KEYS.items():
        if where == "variants[]":
            objs = m["variants"]
            assert objs, "no variants"
        else:
            obj = m
            for part in filter(None, where.split(".")):
                obj = obj[part]
            objs = [obj]
        for obj in objs:
            missing = [k for k in keys if k not in obj]
            assert not missing, f"manifest {where or 'top level'} lacks {missing}"
    assert m["schema_version"] == required_schema_version(m) and m["guarantee"] == GUARANTEE
    assert datetime.fromisoformat(m["created"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert m["model"]["input"] == {
        "name": "input",
        "shape": [None, *SHAPE],
        "dtype": "float32",
        "range": [0, 1],
    }
    assert m["model"]["output"] == {"name": "logits", "kind": "logits"}
    assert m["model"]["num_classes"] == K and m["model"]["labels"] == LABELS
    assert m["preprocess"] == PREPROCESS and m["smoothing"] == {"sigma": 0.25}
    cal = m["calibration"]
    assert (cal["score"], cal["alpha"], cal["beta"], cal["m"], cal["n_mc"], cal["dataset"]) == (
        "probit",
        ALPHA,
        BETA,
        M,
        N_MC,
        "synthetic",
    )
    assert (
        cal["p_cap"] == pytest.approx(BETA ** (1 / N_MC)) and cal["quantile"] == bundle.calibration().quantile
    )
    assert m["base_model"]["file"] == "base.onnx"
    (v,) = m["variants"]
    assert (v["precision"], v["backend"], v["file"]) == ("fp32", "onnxruntime", "surrogate.onnx")
    assert m["export"]["parity_max_abs_diff"] == 1e-7
    for entry in (m["model"], m["base_model"], v):
        assert entry["sha256"] == sha256_file(bundle.path / entry["file"]) == m["files"][entry["file"]]
    assert sorted(m["files"]) == ["base.onnx", "calibration.npz", "surrogate.onnx"]
    Bundle.load(bundle.path)


def test_bundle_files_are_byte_copies(src, bundle):
    for name, source in (("surrogate.onnx", "surrogate"), ("base.onnx", "base"), ("calibration.npz", "npz")):
        assert sha256_file(bundle.path / name) == sha256_file(src[source])


def test_fp32_variant_quantile_comes_from_onnxruntime_outputs(src, bundle, tmp_path):
    ort_probs = softmax(onnx_logits(src["surrogate"], src["images"]))
    want = quantile_from_scratch(ort_probs, src["counts"])
    assert np.isfinite(want) and want != 0.0
    assert bundle.variant("fp32", "onnxruntime")["quantile"] == pytest.approx(want, abs=1e-12)
    assert bundle.calibration(bundle.variant()).quantile == pytest.approx(want, abs=1e-12)
    # The record's own quantile is kept as given; the variant's is recomputed whatever it says.
    record = replace(src["cal"], quantile=0.777)
    other = pack_bundle(tmp_path / "b", BundleSources(**bundle_kwargs(src, calibration=record)))
    assert other.manifest["calibration"]["quantile"] == 0.777 == other.calibration().quantile
    assert other.variant()["quantile"] == pytest.approx(want, abs=1e-12)


def test_recalibrate_variant_matches_calibration_from_scratch(src, bundle):
    probs, counts = src["probs"], src["counts"]
    assert recalibrate_variant(bundle.path, probs) == pytest.approx(src["cal"].quantile, abs=1e-12)
    assert recalibrate_variant(bundle.path, probs) == quantile_from_scratch(probs, counts)

    sharper = softmax(3.0 * np.log(probs))  # a variant with other numerics: more confident
    q_sharp = recalibrate_variant(bundle.path, sharper)
    assert q_sharp == pytest.approx(quantile_from_scratch(sharper, counts), abs=1e-12)
    assert q_sharp > src["cal"].quantile + 1e-3

    # A variant that picks another class on some inputs is scored with that class's MC count.
    flipped = probs.copy()
    order = np.argsort(probs, 1)
    rows = np.arange(0, M, 3)
    top, second = order[rows, -1], order[rows, -2]
    flipped[rows, top], flipped[rows, second] = probs[rows, second], probs[rows, top]
    q_flip = recalibrate_variant(bundle.path, flipped)
    assert q_flip == quantile_from_scratch(flipped, counts) != src["cal"].quantile


def test_recalibrate_variant_refuses_bad_probs(bundle, src):
    with pytest.raises(ValueError, match=r"\[m, K\]"):
        recalibrate_variant(bundle.path, src["probs"][:10])
    with pytest.raises(ValueError, match="not logits"):
        recalibrate_variant(bundle.path, np.log(src["probs"]))


def test_refuses_to_overwrite_unless_asked(src, bundle, tmp_path):
    out = tmp_path / "bundle"
    first = pack_bundle(out, BundleSources(**bundle_kwargs(src)))
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        pack_bundle(out, BundleSources(**bundle_kwargs(src, labels=["x", "y", "z"])))
    assert (out / "manifest.json").read_bytes() == before
    second = pack_bundle(out, BundleSources(**bundle_kwargs(src, labels=["x", "y", "z"])), overwrite=True)
    assert second.labels == ["x", "y", "z"] and first.labels == LABELS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp folders left behind

    stranger = tmp_path / "not-a-bundle"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an rrise bundle"):
        pack_bundle(stranger, BundleSources(**bundle_kwargs(src)), overwrite=True)
    assert (stranger / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"labels": ["a", "b"]}, "2 labels"),
        ({"input_shape": (1, 4, 4)}, r"\[m, C, H, W\]"),
        ({"preprocess": {"color": "gray"}}, "preprocess lacks"),
        ({"calibration": {"m": M + 1}}, "m=61"),
        ({"calibration": {"n_mc": N_MC + 1, "p_cap": float("nan")}}, "n_mc=1001"),
    ],
)
def test_pack_bundle_refuses_inconsistent_inputs(src, tmp_path, override, match):
    if "calibration" in override:  # changes to the fixture's record
        override = {"calibration": replace(src["cal"], quantile=0.1, **override["calibration"])}
    with pytest.raises(ValueError, match=match):
        pack_bundle(tmp_path / "bundle", BundleSources(**bundle_kwargs(src, **override)))
    assert list(tmp_path.iterdir()) == []


def test_build_bundle_is_a_deprecated_alias_of_pack_bundle(src, bundle, tmp_path):
    with pytest.warns(DeprecationWarning, match="pack_bundle"):
        old = build_bundle(tmp_path / "old", **bundle_kwargs(src))
    assert old.manifest["variants"] == bundle.manifest["variants"]
    assert old.manifest["calibration"] == bundle.manifest["calibration"]


def test_add_variant_gets_its_own_quantile(src, bundle, tmp_path):
    import shutil

    folder = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine bytes")
    sharper = softmax(3.0 * np.log(src["probs"]))
    b = add_variant(
        folder,
        engine,
        precision="fp32",
        backend="tensorrt",
        probs=sharper,
        calibrated_with="tensorrt",
        name="surrogate.fp32.engine",
        trt_version="10.3.0",
        compute_capability="8.7",
    )
    v = b.variant("fp32", "tensorrt")
    assert v["quantile"] == pytest.approx(quantile_from_scratch(sharper, src["counts"]), abs=1e-12)
    assert (v["trt_version"], v["compute_capability"], v["file"]) == (
        "10.3.0",
        "8.7",
        "surrogate.fp32.engine",
    )
    assert v["sha256"] == sha256_file(folder / "surrogate.fp32.engine")
    assert (
        b.calibration(v).quantile == v["quantile"] != b.calibration(b.variant("fp32", "onnxruntime")).quantile
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "model.engine"]
    # Rebuilding the same variant replaces it.
    b2 = add_variant(
        folder,
        engine,
        precision="fp32",
        backend="tensorrt",
        probs=src["probs"],
        calibrated_with="tensorrt",
        name="surrogate.fp32.engine",
        trt_version="10.3.0",
        compute_capability="8.7",
    )
    assert len(b2.manifest["variants"]) == 2
    assert b2.variant("fp32", "tensorrt")["quantile"] == pytest.approx(src["cal"].quantile, abs=1e-12)


# --- TensorRT ----------------------------------------------------------------------------------------
def test_tensorrt_absent_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    hint = re.escape("pip install 'rrise[tensorrt]'")
    with pytest.raises(RuntimeError, match=hint):
        tensorrt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    with pytest.raises(RuntimeError, match=hint):
        tensorrt_build.engine_info()
    assert not (tmp_path / "m.engine").exists()


def fake_tensorrt(version: str, *, has_fp16_flag: bool, half_tensor: bool = False, parses: bool = True):
    """Just enough of the tensorrt module to drive build_engine, recording what it is asked."""
    calls: dict = {"flags": []}
    flags = (
        types.SimpleNamespace(FP16="FP16", TF32="TF32")
        if has_fp16_flag
        else types.SimpleNamespace(TF32="TF32")
    )
    tensor = types.SimpleNamespace(name="input", shape=(-1, *SHAPE), dtype="float")
    out = types.SimpleNamespace(dtype="half" if half_tensor else "float")
    layer = types.SimpleNamespace(num_outputs=1, get_output=lambda j: out)
    network = types.SimpleNamespace(
        num_inputs=1, num_layers=1, get_input=lambda i: tensor, get_layer=lambda i: layer
    )
    cache = types.SimpleNamespace(serialize=lambda: b"timing cache")
    config = types.SimpleNamespace(
        add_optimization_profile=lambda p: calls.setdefault("profile", p),
        create_timing_cache=lambda data: calls.setdefault("cache_in", data),
        set_timing_cache=lambda c, ignore: True,
        get_timing_cache=lambda: cache,
        set_flag=lambda f: calls["flags"].append(f),
    )

    trt = fake_module(version, network=network, config=config, calls=calls, flags=flags, parses=parses)
    return trt, calls


def test_build_engine_on_tensorrt_10(monkeypatch, src, tmp_path):
    trt, calls = fake_tensorrt("10.3.0", has_fp16_flag=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    path = tensorrt_build.build_engine(
        src["surrogate"],
        tmp_path / "m.engine",
        timing_cache=cache,
        fp16=True,
        min_batch=1,
        opt_batch=4,
        max_batch=16,
    )
    assert path.read_bytes() == b"engine" and cache.read_bytes() == b"timing cache"
    assert calls["network_flags"] == 0  # explicit batch is the default since TensorRT 10
    assert calls["shape"] == ("input", (1, *SHAPE), (4, *SHAPE), (16, *SHAPE))
    assert calls["flags"] == ["FP16"] and calls["cache_in"] == b""


def test_build_engine_on_tensorrt_11_takes_precision_from_the_onnx(monkeypatch, src, tmp_path):
    trt, calls = fake_tensorrt("11.0.0", has_fp16_flag=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(RuntimeError, match="precision is the ONNX's own tensor types"):
        tensorrt_build.build_engine(src["surrogate"], tmp_path / "m.engine", fp16=True)
    assert not (tmp_path / "m.engine").exists()
    tensorrt_build.build_engine(src["surrogate"], tmp_path / "m.engine", fp16=False)
    assert calls["flags"] == [] and (tmp_path / "m.engine").read_bytes() == b"engine"

    trt, calls = fake_tensorrt("11.0.0", has_fp16_flag=False, half_tensor=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    tensorrt_build.build_engine(src["surrogate"], tmp_path / "h.engine", fp16=True)
    assert calls["flags"] == []


def test_build_engine_reports_parser_errors(monkeypatch, src, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0", has_fp16_flag=True, parses=False)[0])
    with pytest.raises(RuntimeError, match="unsupported operator Foo"):
        tensorrt_build.build_engine(src["surrogate"], tmp_path / "m.engine")


# --- CLI -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_inputs(src, tmp_path_factory) -> dict:
    from rrise.calibrate.model_files import save_model
    from rrise.calibrate.models import build_model

    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = build_model("cnn-small", in_channels=1, num_classes=K, image_size=8, mean=0.5, std=0.25).eval()
    save_model(
        model,
        d / "surrogate.pt",
        arch="cnn-small",
        in_channels=1,
        num_classes=K,
        image_size=8,
        mean=0.5,
        std=0.25,
        labels=LABELS,
        dataset="synthetic",
        sigma=0.25,
    )
    images = src["images"]
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(images)).double(), 1).numpy()
    counts = np.stack([np.random.default_rng(i).multinomial(N_MC, p) for i, p in enumerate(probs)])
    np.savez(d / "calibration.npz", images=images, counts=counts.astype(np.int64), probs=probs)
    cal = Calibration(
        sigma=0.25,
        quantile=quantile_from_scratch(probs, counts),
        alpha=ALPHA,
        beta=BETA,
        n_mc=N_MC,
        m=M,
        dataset="synthetic",
        base_sha256=sha256_file(src["base"]),
        # the ONNX export of a model is byte-for-byte reproducible: rrise-export makes this same file
        surrogate_sha256=sha256_file(export_onnx(model, d / "surrogate.onnx", SHAPE)),
    )
    (d / "calibration.json").write_text(json.dumps(cal.to_dict()))
    args = [
        "--surrogate",
        str(d / "surrogate.pt"),
        "--base",
        str(src["base"]),
        "--calibration",
        str(d / "calibration.npz"),
        "--calibration-record",
        str(d / "calibration.json"),
    ]
    return {"dir": d, "args": args, "cal": cal}


def test_bundle_from_surrogate_takes_the_export_options(cli_inputs, tmp_path):
    from rrise.export.from_surrogate import bundle_from_surrogate, export_bundle
    from rrise.export.options import BundleInputs

    d = cli_inputs["dir"]
    inputs = BundleInputs(
        surrogate=d / "surrogate.pt",
        base=Path(cli_inputs["args"][3]),
        calibration=d / "calibration.npz",
        calibration_record=d / "calibration.json",
        out=tmp_path / "bundle",
        labels="x, y ,z",
    )
    result = bundle_from_surrogate(inputs)
    assert result.bundle.labels == ["x", "y", "z"] and result.calibration == cli_inputs["cal"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        bundle_from_surrogate(inputs)
    with pytest.raises(ValueError, match="needs --calibration-record"):
        bundle_from_surrogate(replace(inputs, calibration_record=None))
    with pytest.warns(DeprecationWarning, match="bundle_from_surrogate"):
        old = export_bundle(
            d / "surrogate.pt",
            base=inputs.base,
            calibration_npz=inputs.calibration,
            calibration=cli_inputs["cal"],
            out=tmp_path / "old",
        )
    assert old.bundle.manifest["variants"][0]["quantile"] == result.bundle.variant()["quantile"]


def test_cli_exports_a_bundle_end_to_end(cli_inputs, tmp_path):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, [*cli_inputs["args"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    b = Bundle.load(out)
    assert str(out) in result.output and b.id in result.output
    assert "quantile" in result.output
    # the bundle ships the very ONNX the calibration was computed from: nothing is re-exported
    assert (b.file("surrogate.onnx")).read_bytes() == (cli_inputs["dir"] / "surrogate.onnx").read_bytes()
    assert b.labels == LABELS and b.manifest["calibration"]["dataset"] == "synthetic"
    assert b.manifest["calibration"]["quantile"] == cli_inputs["cal"].quantile
    assert b.manifest["preprocess"] == PREPROCESS
    with np.load(cli_inputs["dir"] / "calibration.npz") as z:
        ort_probs = softmax(onnx_logits(b.file("surrogate.onnx"), z["images"]))
        want = quantile_from_scratch(ort_probs, z["counts"])
    assert b.variant()["quantile"] == pytest.approx(want, abs=1e-12)
    assert f"{b.variant()['quantile']:.6g}" in result.output

    again = CliRunner().invoke(app, [*cli_inputs["args"], "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    relabelled = CliRunner().invoke(
        app,
        [*cli_inputs["args"], "--out", str(out), "--overwrite", "--labels", "x, y ,z", "--dataset", "other"],
    )
    assert relabelled.exit_code == 0, relabelled.output
    b2 = Bundle.load(out)
    assert b2.labels == ["x", "y", "z"] and b2.manifest["calibration"]["dataset"] == "other"


def test_cli_help_has_an_example_and_precision_choices(cli_inputs, tmp_path):
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "Example" in help_text and "rrise-export --surrogate" in help_text
    assert "fp32|int8|fp16" in help_text
    for bad in (
        ["--precision", "int4"],
        ["--precision", "int8"],
        ["--quant-data", str(cli_inputs["args"][5])],
    ):
        result = CliRunner().invoke(app, [*cli_inputs["args"], "--out", str(tmp_path / "b"), *bad])
        assert result.exit_code == 2, bad
        assert not (tmp_path / "b").exists()


def test_cli_builds_a_bundle_with_an_fp16_variant(cli_inputs, tmp_path):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, [*cli_inputs["args"], "--out", str(out), "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    b = Bundle.load(out)
    assert [(v["precision"], v["backend"]) for v in b.manifest["variants"]] == [
        ("fp32", "onnxruntime"),
        ("fp16", "onnxruntime"),
    ]
    v = b.variant("fp16")
    with np.load(cli_inputs["dir"] / "calibration.npz") as z:
        want = quantile_from_scratch(softmax(onnx_logits(b.file(v["file"]), z["images"])), z["counts"])
    assert v["quantile"] == pytest.approx(want, abs=1e-12) and v["calibrated_with"] == "onnxruntime-cpu"


def test_cli_engine_without_tensorrt_exits_1_with_the_hint(cli_inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(
        app, [*cli_inputs["args"], "--out", str(tmp_path / "b"), "--engine", "tensorrt"]
    )
    assert result.exit_code == 1
    assert "pip install 'rrise[tensorrt]'" in " ".join(result.output.split())
    assert not (tmp_path / "b").exists()


def test_cli_rejects_a_bad_calibration_record(cli_inputs, tmp_path):
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"sigma": 0.25}))
    args = [*cli_inputs["args"][:-1], str(bad), "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "calibration record" in result.output


def test_cli_module_does_not_import_torch():
    import subprocess

    code = "import sys, rrise.export.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bundle_error_is_raised_for_a_damaged_bundle_during_recalibration(bundle, tmp_path):
    import shutil

    folder = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    (folder / "calibration.npz").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="calibration.npz"):
        recalibrate_variant(folder, np.full((M, K), 1 / K))


def test_cli_refuses_a_sigma_mismatch_by_name(cli_inputs, tmp_path):
    record = json.loads((cli_inputs["dir"] / "calibration.json").read_text())
    other = tmp_path / "calibration-sigma05.json"
    other.write_text(json.dumps({**record, "sigma": 0.5}))
    args = [*cli_inputs["args"][:-1], str(other)]
    for cmd, extra in (([], ["--precision", "fp16"]), (["build"], [])):
        out = tmp_path / ("built" if cmd else "flat")
        result = CliRunner().invoke(app, [*cmd, *args, "--out", str(out), *extra])
        assert result.exit_code == 1, result.output
        text = " ".join(result.output.split())
        assert "sigma mismatch" in text and "sigma=0.5" in text and "sigma=0.25" in text
        assert str(other.name) in text and "surrogate.pt" in text
        assert "Traceback" not in result.output
        assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
            result.output.splitlines()[0]
        ]
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]  # nothing written


def test_check_sigma_without_a_recorded_sigma_says_so():
    from rrise.export.from_surrogate import SigmaMismatchError, check_sigma

    cal = Calibration(sigma=0.25, quantile=0.1, alpha=ALPHA, beta=BETA, n_mc=N_MC, m=M)
    assert check_sigma(cal, {"sigma": 0.25}, record="r", surrogate="s") is True
    assert check_sigma(cal, {}, record="r", surrogate="s") is False
    with pytest.raises(SigmaMismatchError, match="record r has sigma=0.25, but the surrogate s"):
        check_sigma(cal, {"sigma": 0.12}, record="r", surrogate="s")


def test_cli_build_and_add_variant_verbs(cli_inputs, tmp_path):
    from rrise.cli import app as rrise_app

    out = tmp_path / "bundle"
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "build" in help_text and "add-variant" in help_text
    for cmd in (["build"], ["add-variant"]):
        sub = CliRunner().invoke(app, [*cmd, "--help"])
        assert sub.exit_code == 0 and "Example" in sub.output
    built = CliRunner().invoke(app, ["build", *cli_inputs["args"], "--out", str(out)])
    assert built.exit_code == 0, built.output
    b = Bundle.load(out)
    assert [(v["precision"], v["backend"]) for v in b.manifest["variants"]] == [("fp32", "onnxruntime")]
    assert b.id in built.output
    fp32 = b.variant("fp32")
    assert fp32["calibrated_with"] == "onnxruntime-cpu" and fp32["max_batch"] in (1, MICRO_BATCH_LIMIT)

    # `rrise export add-variant` is the same command
    added = CliRunner().invoke(
        rrise_app, ["export", "add-variant", "--bundle", str(out), "--precision", "fp16"]
    )
    assert added.exit_code == 0, added.output
    assert "error" not in added.output
    v = Bundle.load(out).variant("fp16", "onnxruntime")
    assert v["calibrated_with"] == "onnxruntime-cpu" and v["max_batch"] in (1, MICRO_BATCH_LIMIT)
    assert f"fp16/onnxruntime surrogate.fp16.onnx: quantile {v['quantile']:.6g}" in added.output

    # usage errors exit 2 and change nothing
    before = (out / "manifest.json").read_bytes()
    for bad in (
        ["add-variant", "--bundle", str(out)],  # fp32 is there already
        ["add-variant", "--bundle", str(out), "--precision", "int8"],  # needs --quant-data
        ["--bundle", str(out), "add-variant", "--precision", "fp16"],  # options before the command
        ["build", "--out", str(tmp_path / "x")],  # missing inputs
    ):
        result = CliRunner().invoke(app, bad)
        assert result.exit_code == 2, (bad, result.output)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_cli_errors_are_one_line_without_a_stray_exit_code(cli_inputs, tmp_path):
    bogus = tmp_path / "surrogate.pt"
    bogus.write_bytes(b"not a checkpoint")
    shutil.copyfile(cli_inputs["dir"] / "surrogate.onnx", tmp_path / "surrogate.onnx")
    args = ["--surrogate", str(bogus), *cli_inputs["args"][2:], "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith("error: cannot read the surrogate checkpoint")
    assert [line for line in lines if line.startswith("error:")] == lines[:1]  # no stray "error: 1"
    assert not (tmp_path / "b").exists()


# --- the typed options of rrise-export ------------------------------------------------------------------
def test_export_options_name_the_flag_and_say_what_is_asked():
    import doctest

    from rrise.export import options
    from rrise.export.options import BundleInputs, ExportOptions, VariantOptions
    from rrise.export.precision import Precision

    assert doctest.testmod(options, optionflags=doctest.ELLIPSIS).failed == 0
    full = BundleInputs(
        surrogate=Path("s.pt"), base=Path("b.onnx"), calibration=Path("c.npz"),
        calibration_record=Path("c.json"), out=Path("bundle"),
    )  # fmt: skip
    assert ExportOptions(inputs=full).action == "bundle"
    with pytest.raises(
        ValueError, match="^--bundle adds to an existing bundle; it does not take --surrogate"
    ):
        ExportOptions(inputs=full, bundle=Path("b"))
    with pytest.raises(ValueError, match="^--precision: every bundle has its fp32 variant already"):
        ExportOptions(bundle=Path("b"))
    with pytest.raises(ValueError, match="^--precision int8 needs --quant-data"):
        ExportOptions(inputs=full, variant=VariantOptions(precision=Precision.int8))
    for bad, flag in [({"max_batch": 0}, "--max-batch"), ({"quant_samples": 0}, "--quant-samples")]:
        with pytest.raises(ValueError, match=f"^{flag} must be >= 1"):
            VariantOptions(**bad)
    with pytest.raises(ValueError, match="^--labels must be comma-separated names"):
        BundleInputs(labels="a,,b")
    engine = ExportOptions(bundle=Path("b"), variant=VariantOptions(precision="int8", engine="tensorrt"))
    assert engine.action == "add-variant" and engine.variant.engine.value == "tensorrt"
