"""A bundle's models run from the very bytes whose sha256 was checked, and a bundle holds plain files.

The attack these tests replay: ``Bundle.load`` hashes ``surrogate.onnx``, then the runtime opens the
path again; a file swapped in between would run a model no signature covers. And a symbolic link in
the bundle points at a file that can change without the bundle changing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from rrise import Bundle, BundleError
from rrise.inspect import format_inspection, inspect_bundle
from rrise.runtime import backends
from rrise.runtime.adaptive import read_base_model
from tests.tiny_bundle import linear_onnx, linear_sources, make_linear_bundle


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    sources = linear_sources(tmp_path_factory.mktemp("sources"))
    return make_linear_bundle(sources, tmp_path_factory.mktemp("good") / "bundle").path


@pytest.fixture
def bundle_dir(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "bundle"))


def test_the_session_opens_the_checked_bytes_not_the_path(bundle_dir, monkeypatch):
    bundle = Bundle.load(bundle_dir)
    opened: list = []
    real = backends.open_session
    monkeypatch.setattr(backends, "open_session", lambda m, *a, **k: opened.append(m) or real(m, *a, **k))
    backends.make_backend(bundle, "onnxruntime")
    assert len(opened) == 1 and isinstance(opened[0], bytes)
    assert hashlib.sha256(opened[0]).hexdigest() == bundle.manifest["files"]["surrogate.onnx"]


def test_a_model_swapped_after_load_is_never_run(bundle_dir, tmp_path):
    bundle = Bundle.load(bundle_dir)  # checked here ...
    linear_onnx(tmp_path / "other.onnx", seed=7)
    os.replace(tmp_path / "other.onnx", bundle_dir / "surrogate.onnx")  # ... swapped here
    with pytest.raises(BundleError, match="changed file surrogate.onnx"):
        backends.make_backend(bundle, "onnxruntime")


def test_read_verified_refuses_a_file_changed_after_load(bundle_dir):
    bundle = Bundle.load(bundle_dir)
    assert (
        hashlib.sha256(bundle.read_verified("base.onnx")).hexdigest() == bundle.manifest["files"]["base.onnx"]
    )
    (bundle_dir / "base.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="changed file base.onnx"):
        read_base_model(bundle)
    with pytest.raises(BundleError, match="no single sha256"):
        bundle.read_verified("not-listed.onnx")


def _refused(folder: Path, name: str) -> str:
    with pytest.raises(BundleError) as info:
        Bundle.load(folder)
    summary, problems = inspect_bundle(folder)
    text = format_inspection(summary, problems)
    assert "Integrity: OK" not in text and name in text
    assert name in str(info.value)
    return str(info.value)


def test_a_model_that_is_a_symlink_outside_the_bundle_is_refused(bundle_dir, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(bundle_dir / "surrogate.onnx", outside)  # identical bytes: the hash matches
    (bundle_dir / "surrogate.onnx").unlink()
    (bundle_dir / "surrogate.onnx").symlink_to(outside)
    assert "symbolic link" in _refused(bundle_dir, "surrogate.onnx")
    bundle = Bundle.load(bundle_dir, verify=False)
    with pytest.raises(BundleError, match="surrogate.onnx is a symbolic link"):
        backends.make_backend(bundle, "onnxruntime")


def test_a_symlink_inside_the_bundle_and_a_linked_folder_are_refused(bundle_dir, tmp_path):
    (bundle_dir / "calibration.npz").rename(bundle_dir / "real.npz")
    (bundle_dir / "calibration.npz").symlink_to("real.npz")
    message = _refused(bundle_dir, "calibration.npz")
    assert "symbolic link" in message and "extra file real.npz" in message
    fresh = tmp_path / "fresh"
    shutil.copytree(bundle_dir.parent / "bundle", fresh, symlinks=True)
    (fresh / "calibration.npz").unlink()
    (fresh / "real.npz").rename(fresh / "calibration.npz")
    Bundle.load(fresh)  # the repaired copy loads
    (fresh / "linked").symlink_to(tmp_path, target_is_directory=True)
    assert "symbolic link" in _refused(fresh, "linked")


def test_the_runtime_still_certifies_from_checked_bytes(bundle_dir):
    backend, variant = backends.make_backend(Bundle.load(bundle_dir), "onnxruntime")
    probs = backend.run(np.zeros((2, 1, 4, 4), np.float32))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1.0)
    assert variant["file"] == "surrogate.onnx"


def test_a_tensorrt_engine_is_deserialized_from_the_checked_bytes(tmp_path, monkeypatch):
    from tests.runtime_fixtures import make_bundle

    folder = make_bundle(tmp_path / "engine_bundle", engine=True)
    bundle = Bundle.load(folder)
    got: dict = {}

    class Recorder:
        def __init__(self, engine, **kw):
            got.update(engine=engine, **kw)

    monkeypatch.setattr(backends, "tensorrt_available", lambda: True)
    monkeypatch.setattr(backends, "TensorRTBackend", Recorder)
    _, variant = backends.make_backend(bundle, "tensorrt")
    assert variant["file"] == "surrogate.fp16.engine"
    assert got["engine"] == b"not a real engine" and got["where"].endswith("surrogate.fp16.engine")
    (folder / "surrogate.fp16.engine").write_bytes(b"another engine")
    with pytest.raises(BundleError, match="changed file surrogate.fp16.engine"):
        backends.make_backend(bundle, "tensorrt")
