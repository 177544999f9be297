"""The edge runtime: preprocessing, backends, Runtime records, sources, sinks and run_stream."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from rrise import Bundle, certify_from_probs
from rrise.bundle import write_manifest
from rrise.numerics import softmax
from rrise.records import RECORD_KEYS, STATUS_KEYS
from rrise.runtime import Runtime, open_source, run_stream
from rrise.runtime.backends import OnnxRuntimeBackend, make_backend
from rrise.runtime.options import StreamOptions
from rrise.runtime.preprocess import FrameError, Preprocessor
from rrise.runtime.sinks import JsonlSink
from rrise.runtime.sources import FrameSource, PushSource, SourceError
from rrise.subscriber import subscribe
from tests.runtime_fixtures import (
    FP32_MAX_BATCH,
    FP32_QUANTILE,
    INT8_QUANTILE,
    LABELS,
    TOP_LEVEL_QUANTILE,
    make_bundle,
    run_options,
    sample_frames,
)

GRAY = {"color": "gray", "resize": [28, 28], "interpolation": "area", "layout": "NCHW"}
RGB = {"color": "rgb", "resize": [28, 28], "interpolation": "area", "layout": "NCHW"}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def runtime(bundle_dir: Path) -> Runtime:
    return Runtime(bundle_dir, backend="onnxruntime")


def fashion_like(seed: int = 0) -> np.ndarray:
    """A 28×28 uint8 image with the full 0..255 range (Fashion-MNIST's format)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    img[0, 0], img[0, 1] = 0, 255
    return img


# --- preprocessing ----------------------------------------------------------------------------


def test_preprocess_is_pixel_identical_to_the_calibration_input() -> None:
    img = fashion_like()
    expected = img.astype(np.float32)[None] / 255.0  # what the dataset loader feeds the model
    big = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)  # ×4 nearest-neighbour upscale
    bgr = np.ascontiguousarray(np.stack([big] * 3, axis=-1))
    bgra = np.concatenate([bgr, np.full(big.shape + (1,), 255, np.uint8)], axis=-1)
    pre = Preprocessor(GRAY, [None, 1, 28, 28])
    for frame in (bgr, bgra, big, big[:, :, None], img, img[:, :, None]):
        out = pre(frame)
        assert out.shape == (1, 28, 28) and out.dtype == np.float32
        np.testing.assert_array_equal(out, expected)


def test_preprocess_rgb_converts_bgr_and_is_pixel_identical() -> None:
    rgb = np.stack([fashion_like(s) for s in (1, 2, 3)], axis=-1)
    expected = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
    bgr_big = np.repeat(np.repeat(rgb[:, :, ::-1], 4, axis=0), 4, axis=1)
    out = Preprocessor(RGB, [None, 3, 28, 28])(bgr_big)
    np.testing.assert_array_equal(out, expected)
    grey = Preprocessor(RGB, [None, 3, 28, 28])(fashion_like())  # grey → three equal planes
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])


def test_preprocess_resizes_with_the_manifest_interpolation() -> None:
    frame = fashion_like()
    big = cv2.resize(frame, (100, 60), interpolation=cv2.INTER_LINEAR)
    for name, flag in (("area", cv2.INTER_AREA), ("nearest", cv2.INTER_NEAREST)):
        pre = Preprocessor({**GRAY, "interpolation": name}, [None, 1, 28, 28])
        expected = cv2.resize(big, (28, 28), interpolation=flag).astype(np.float32) / 255
        np.testing.assert_array_equal(pre(big)[0], expected)


def test_preprocess_accepts_float_frames() -> None:
    frame = fashion_like().astype(np.float64) / 255.0
    out = Preprocessor(GRAY, [None, 1, 28, 28])(frame)
    np.testing.assert_allclose(out[0], frame, atol=1e-7)
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (None, "None"),
        (np.zeros((0, 28), np.uint8), "empty"),
        (np.zeros((28, 28, 2), np.uint8), "shape"),
        (np.zeros((2, 28, 28, 3), np.uint8), "shape"),
        (np.zeros((28, 28), np.int32), "dtype"),
        (np.full((28, 28), np.nan, np.float32), "NaN"),
        (np.full((28, 28), 2.0, np.float32), r"\[0, 1\]"),
        ([[0, 1], [1, 0]], "numpy array"),
    ],
)
def test_preprocess_rejects_bad_frames(frame: object, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        Preprocessor(GRAY, [None, 1, 28, 28])(frame)


def test_preprocess_rejects_inconsistent_manifests() -> None:
    with pytest.raises(ValueError, match="color"):
        Preprocessor({**GRAY, "color": "hsv"}, [None, 1, 28, 28])
    with pytest.raises(ValueError, match="channel"):
        Preprocessor(GRAY, [None, 3, 28, 28])
    with pytest.raises(ValueError, match="resize"):
        Preprocessor({**GRAY, "resize": [32, 32]}, [None, 1, 28, 28])
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessor({**GRAY, "interpolation": "lanczos9"}, [None, 1, 28, 28])


# --- backends and Runtime ---------------------------------------------------------------------


def test_softmax_is_stable() -> None:
    p = softmax(np.array([[1000.0, 0.0], [-1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])


def test_runtime_matches_certify_from_probs_on_direct_onnxruntime(bundle_dir: Path, runtime: Runtime) -> None:
    import onnxruntime as ort

    frames = sample_frames(20)
    records = runtime.certify_batch(frames)

    bundle = Bundle.load(bundle_dir)
    variant = bundle.variant("fp32", "onnxruntime")
    session = ort.InferenceSession(str(bundle.file(variant["file"])), providers=["CPUExecutionProvider"])
    x = np.stack([f.astype(np.float32)[None] / 255.0 for f in frames])
    logits = session.run(["logits"], {"input": x})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    certs = certify_from_probs(probs, bundle.calibration(variant))

    assert runtime.variant["precision"] == "fp32" and runtime.max_batch == FP32_MAX_BATCH  # 20 rows: 5 calls
    assert runtime.calibration.quantile == FP32_QUANTILE != TOP_LEVEL_QUANTILE
    assert {r["abstain"] for r in records} == {True, False}, "fixture should mix both outcomes"
    for i, (rec, cert) in enumerate(zip(records, certs, strict=True)):
        assert tuple(rec) == RECORD_KEYS
        assert rec["v"] == 1 and rec["error"] is None and rec["bundle"] == bundle.id
        assert rec["pred"] == cert.pred and rec["abstain"] == cert.abstain
        assert rec["label"] == (None if cert.pred is None else LABELS[cert.pred])
        assert rec["radius"] == pytest.approx(cert.radius, abs=1e-6)
        assert rec["score"] == pytest.approx(cert.score, abs=1e-6)
        assert rec["p_lower"] == pytest.approx(cert.p_lower, abs=1e-6)
        assert rec["seq"] == records[0]["seq"] + i and rec["frame"] == rec["seq"]
    # the top-level quantile would give other radii: the runtime really used the variant's own
    wrong = certify_from_probs(probs, bundle.calibration())
    assert any(abs(r["radius"] - w) > 1e-3 for r, w in zip(records, wrong.radius, strict=True))


def test_runtime_uses_the_calibration_of_the_variant_it_runs(bundle_dir: Path) -> None:
    rt = Runtime(bundle_dir, backend="onnxruntime", precision="int8")
    assert rt.variant["file"] == "surrogate.int8.onnx"
    assert rt.calibration.quantile == INT8_QUANTILE
    frame = sample_frames(5)[4]
    rec = rt.certify(frame)
    probs = rt._backend.run(rt.preprocessor(frame)[None])[0]
    cert = certify_from_probs(probs, Bundle.load(bundle_dir).calibration(rt.variant))
    assert rec["p_lower"] == pytest.approx(cert.p_lower, abs=1e-9)


def test_bad_frames_become_error_records_and_the_rest_are_certified(runtime: Runtime) -> None:
    good = sample_frames(5)
    frames = [good[4], None, np.zeros((28, 28, 2), np.uint8), np.full((28, 28), np.nan), good[3]]
    records = runtime.certify_batch(frames, frame_indices=[10, 11, 12, 13, 14])
    assert [r["frame"] for r in records] == [10, 11, 12, 13, 14]
    assert [r["seq"] for r in records] == list(range(records[0]["seq"], records[0]["seq"] + 5))
    for r in records[1:4]:
        assert r["error"] and r["pred"] is None and r["abstain"] is True and r["radius"] == 0.0
    assert "None" in records[1]["error"] and "NaN" in records[3]["error"]
    for r, f in ((records[0], good[4]), (records[4], good[3])):
        assert r["error"] is None
        assert r["p_lower"] == runtime.certify(f)["p_lower"]
    single = runtime.certify(None)
    assert single["error"] and single["abstain"]


def test_stamp_and_latency(runtime: Runtime) -> None:
    stamp = time.time_ns() - 50_000_000
    rec = runtime.certify(sample_frames(1)[0], stamp_ns=stamp, frame_index=7)
    assert rec["stamp_ns"] == stamp and rec["frame"] == 7
    assert 50.0 <= rec["latency_ms"] < 5000.0
    before = time.time_ns()
    rec = runtime.certify(sample_frames(1)[0])
    assert before <= rec["stamp_ns"] <= time.time_ns() and rec["latency_ms"] >= 0


def test_runtime_accepts_a_loaded_bundle(bundle_dir: Path) -> None:
    bundle = Bundle.load(bundle_dir)
    rt = Runtime(bundle, backend="auto", source_name="cam0")
    assert rt.bundle is bundle and rt.backend_name.startswith("onnxruntime")
    assert rt.certify(sample_frames(1)[0])["source"] == "cam0"


def test_onnxruntime_backend_returns_probabilities(bundle_dir: Path) -> None:
    backend = OnnxRuntimeBackend(bundle_dir / "surrogate.onnx", "onnxruntime-cpu")
    p = backend.run(np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32))
    assert p.shape == (3, 10)
    np.testing.assert_allclose(p.sum(1), 1.0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        backend.run(np.zeros((1, 28, 28), np.float32))


def test_tensorrt_request_without_tensorrt_explains_what_to_do(tmp_path: Path, bundle_dir: Path) -> None:
    bundle = Bundle.load(bundle_dir)
    with pytest.raises(RuntimeError, match=r"tensorrt extra.*rrise-export --engine tensorrt"):
        make_backend(bundle, "tensorrt")
    with_engine = make_bundle(tmp_path / "engine_bundle", engine=True)
    with pytest.raises(RuntimeError, match=r"tensorrt extra.*rrise-export --engine tensorrt"):
        Runtime(with_engine, backend="tensorrt")
    # auto falls back to onnxruntime (tensorrt does not import here), with that variant's quantile
    rt = Runtime(with_engine, backend="auto")
    assert rt.variant["backend"] == "onnxruntime" and rt.calibration.quantile == FP32_QUANTILE
    with pytest.raises(ValueError, match="backend"):
        make_backend(bundle, "openvino")


def test_missing_onnxruntime_variant_is_a_clear_error(tmp_path: Path, bundle_dir: Path) -> None:
    folder = tmp_path / "b"
    shutil.copytree(bundle_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["variants"] = [v for v in manifest["variants"] if v["precision"] == "int8"]
    write_manifest(folder, manifest)
    with pytest.raises(RuntimeError, match="no onnxruntime variant at fp32"):
        make_backend(Bundle.load(folder), "onnxruntime", precision="fp32")


# --- exact numerics per batch size --------------------------------------------------------------


class BatchDependentBackend:
    """A real backend whose outputs move with the batch size, as some kernels' do: class 0's logit
    gains 1e-3 × the batch size. Records every batch size it was handed."""

    def __init__(self, inner: object, nan_rows: tuple[int, ...] = ()) -> None:
        self.inner, self.batches, self.nan_rows, self.name = inner, [], nan_rows, "batch-dependent"

    def run(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        logits = np.log(self.inner.run(x))
        logits[:, 0] += 1e-3 * len(x)
        probs = softmax(logits)
        for row in self.nan_rows:
            probs[row] = np.nan
        return probs


def runtime_with_max_batch(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_batch: int, **fake: object
) -> Runtime:
    folder = Path(shutil.copytree(bundle_dir, tmp_path / f"max_batch_{max_batch}"))
    manifest = json.loads((folder / "manifest.json").read_text())
    for v in manifest["variants"]:
        v["max_batch"] = max_batch
    write_manifest(folder, manifest)
    import rrise.runtime.runtime as runtime_module

    real = runtime_module.make_backend

    def wrapped(bundle: Bundle, backend: str, precision: str | None = None):
        inner, variant = real(bundle, backend, precision=precision)
        return BatchDependentBackend(inner, **fake), variant

    monkeypatch.setattr(runtime_module, "make_backend", wrapped)
    return Runtime(folder, backend="onnxruntime")


def _outcome(record: dict) -> tuple:
    return tuple(
        record[k] for k in ("frame", "pred", "label", "abstain", "radius", "score", "p_lower", "error")
    )


def test_a_burst_with_max_batch_1_gives_exactly_the_per_frame_records(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime_with_max_batch(bundle_dir, tmp_path, monkeypatch, 1)
    assert rt.max_batch == 1
    frames = sample_frames(10)
    indices = list(range(10))
    burst = rt.certify_batch(frames, frame_indices=indices)
    single = [rt.certify(f, frame_index=i) for i, f in enumerate(frames)]
    src = PushSource("burst", live=False)
    for f in frames:
        src.push(f)
    src.end()
    streamed = [r for r in rt.stream(src, StreamOptions(batch=8, status_interval=0))]
    assert rt._backend.batches and max(rt._backend.batches) == 1
    assert [_outcome(r) for r in burst] == [_outcome(r) for r in single] == [_outcome(r) for r in streamed]
    # the test means something: one batch of 10 would have given other numbers
    x = np.stack([rt.preprocessor(f) for f in frames])
    assert not np.array_equal(rt._backend.run(x), np.concatenate([rt._backend.run(r[None]) for r in x]))


def test_the_backend_gets_micro_batches_of_at_most_max_batch(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime_with_max_batch(bundle_dir, tmp_path, monkeypatch, 4)
    frames = sample_frames(10)
    frames[5] = None  # a bad frame never reaches the backend
    records = rt.certify_batch(frames)
    assert rt._backend.batches == [4, 4, 1]
    assert records[5]["error"] and all(r["error"] is None for i, r in enumerate(records) if i != 5)
    assert [r["seq"] for r in records] == list(range(records[0]["seq"], records[0]["seq"] + 10))
    src = PushSource("burst", live=False)
    for f in sample_frames(12):
        src.push(f)
    src.end()
    summary = run_stream(None, src, run_options(batch=16, status_interval=0), runtime=rt)
    assert summary["frames"] == 12 and max(rt._backend.batches) == 4


def test_a_model_output_with_nan_is_an_error_record_and_the_batch_goes_on(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime_with_max_batch(bundle_dir, tmp_path, monkeypatch, 4, nan_rows=(1,))
    records = rt.certify_batch(sample_frames(4))
    assert "NaN" in records[1]["error"] and records[1]["pred"] is None and records[1]["abstain"]
    assert all(records[i]["error"] is None for i in (0, 2, 3))


@pytest.mark.parametrize("value", [0, 17, 2.0, True, "4"])
def test_a_variant_max_batch_out_of_range_is_refused(value: object) -> None:
    from rrise.runtime.backends import variant_max_batch

    with pytest.raises(ValueError, match="max_batch"):
        variant_max_batch({"precision": "fp32", "backend": "onnxruntime", "max_batch": value})
    assert variant_max_batch({"precision": "fp32"}) == 1 and variant_max_batch({"max_batch": 16}) == 16


def test_an_onnxruntime_variant_opens_exactly_the_numerics_it_was_calibrated_with(
    bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    import rrise.runtime.backends as backends

    asked = []
    real = backends.open_session
    monkeypatch.setattr(
        backends, "open_session", lambda path, cw, **kw: asked.append(cw) or real(path, cw, **kw)
    )
    rt = Runtime(bundle_dir, backend="onnxruntime")
    assert asked == ["onnxruntime-cpu"] and rt.backend_name == "onnxruntime[CPUExecutionProvider]"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    variant = {
        **Bundle.load(bundle_dir).variant("fp32", "onnxruntime"),
        "calibrated_with": "onnxruntime-cuda",
    }
    with pytest.raises(RuntimeError, match="onnxruntime-cuda"):
        backends._build(Bundle.load(bundle_dir), variant)


# --- Runtime.stream ---------------------------------------------------------------------------


def test_stream_is_a_generator_of_records_and_status_records(bundle_dir: Path, runtime: Runtime) -> None:
    src = PushSource("robot", live=False)
    frames = sample_frames(9)
    for f in frames:
        src.push(f)
    src.end()
    stream = runtime.stream(
        src, StreamOptions(batch=3, status_interval=1e-9)
    )  # a status record after every step
    records, statuses = [], []
    for r in stream:
        (statuses if r.get("kind") == "status" else records).append(r)
    assert [r["frame"] for r in records] == list(range(9)) and all(tuple(r) == RECORD_KEYS for r in records)
    assert all(r["source"] == "robot" for r in records)
    assert len(statuses) == 3 and all(set(STATUS_KEYS) <= set(s) for s in statuses)
    assert [s["frames"] for s in statuses] == [3, 6, 9]
    summary = stream.summary()
    assert summary["frames"] == 9 and summary["status_records"] == 3 and not summary["interrupted"]
    assert summary["drop_policy"] == "block" and summary["batch"] == 3 and summary["source"] == "robot"
    with pytest.raises(RuntimeError, match="once"):
        iter(stream)


def test_stopping_a_stream_ends_it_after_the_current_batch(bundle_dir: Path, runtime: Runtime) -> None:
    stream = runtime.stream(EndlessSource(), StreamOptions(status_interval=0))
    got = []
    for r in stream:
        got.append(r)
        if len(got) == 3:
            stream.stop()
    assert len(got) == 3 and stream.summary()["interrupted"] and stream.summary()["frames"] == 3


# --- sources ----------------------------------------------------------------------------------


def write_video(path: Path, n: int, size: int = 56) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    assert writer.isOpened()
    for frame in sample_frames(n, size):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()


def test_video_file_is_read_to_the_end(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 9)
    with open_source(str(video)) as src:
        assert not src.is_live and src.name == str(video)
        items = list(src)
    assert [i for i, _, _ in items] == list(range(9))
    assert all(f is not None and f.shape == (56, 56, 3) for _, f, _ in items)
    stamps = [s for _, _, s in items]
    assert stamps == sorted(stamps)


def test_run_stream_over_a_video_gives_one_record_per_frame(tmp_path: Path, bundle_dir: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 12)
    got: list[dict] = []
    summary = run_stream(
        bundle_dir,
        str(video),
        run_options(jsonl=str(tmp_path / "out" / "records.jsonl")),
        callback=got.append,
    )
    assert summary["frames"] == 12 and summary["errors"] == 0 and not summary["interrupted"]
    assert summary["abstained"] + summary["certified"] == 12
    assert summary["latency_p50_ms"] <= summary["latency_p99_ms"] and summary["fps"] > 0
    assert [r["frame"] for r in got] == list(range(12))
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == got


def test_image_folder_with_an_unreadable_file_goes_on(tmp_path: Path, bundle_dir: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    frames = sample_frames(4, 28)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"img{i:02d}.png"), f)
    (folder / "img01b.png").write_bytes(b"this is not a png")
    (folder / "notes.txt").write_text("ignored")
    got: list[dict] = []
    summary = run_stream(bundle_dir, str(folder), callback=got.append)
    assert summary["frames"] == 5 and summary["errors"] == 1
    assert got[2]["error"] and got[2]["pred"] is None
    rt = Runtime(bundle_dir)
    for rec, frame in zip([got[0], got[1], got[3], got[4]], frames, strict=True):
        assert rec["error"] is None and rec["p_lower"] == rt.certify(frame)["p_lower"]
    one = open_source(str(folder / "img00.png"))
    assert [i for i, _, _ in one] == [0]


@pytest.mark.parametrize("kind", ["missing", "text", "empty_dir", "pipeline", "truncated"])
def test_unopenable_sources_raise_source_error(tmp_path: Path, kind: str) -> None:
    spec = {
        "missing": str(tmp_path / "nope.mp4"),
        "text": str(tmp_path / "notes.avi"),
        "empty_dir": str(tmp_path / "empty"),
        "pipeline": "nosuchelement ! appsink",
        "truncated": str(tmp_path / "cut.avi"),
    }[kind]
    (tmp_path / "notes.avi").write_text("not a video at all\n" * 50)
    (tmp_path / "empty").mkdir()
    write_video(tmp_path / "full.avi", 3)
    (tmp_path / "cut.avi").write_bytes((tmp_path / "full.avi").read_bytes()[:300])
    with pytest.raises(SourceError, match=r"\S"):
        open_source(spec)


def test_source_kinds_are_recognised() -> None:
    with pytest.raises(SourceError, match="camera 97"):
        open_source("97")
    with pytest.raises(SourceError, match="empty source"):
        open_source("")
    with pytest.raises(SourceError, match="does not exist"):
        open_source("no/such/dir")


# --- sinks and run_stream ---------------------------------------------------------------------


def test_jsonl_sink_writes_parseable_lines(tmp_path: Path, runtime: Runtime) -> None:
    records = runtime.certify_batch(sample_frames(3) + [None])
    with JsonlSink(tmp_path / "r.jsonl") as sink:
        for r in records:
            sink.send(r)
    back = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert back == records


def test_run_stream_publishes_to_a_subscriber(tmp_path: Path, bundle_dir: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, f in enumerate(sample_frames(6, 28)):
        cv2.imwrite(str(folder / f"{i}.png"), f)
    port = _free_port()
    received: list[dict] = []

    def listen() -> None:
        with subscribe(f"tcp://127.0.0.1:{port}", timeout_s=5) as sub:
            for record in sub:
                received.append(record)
                if len(received) == 5:
                    break

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    summary = run_stream(
        bundle_dir,
        str(folder),
        run_options(publish=f"tcp://127.0.0.1:{port}", max_frames=5, wait_subscribers=1, wait_timeout=5),
    )
    thread.join(10)
    assert summary["frames"] == 5 and summary["drops"] == 0
    assert [r["frame"] for r in received] == [0, 1, 2, 3, 4]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EndlessSource(FrameSource):
    name = "endless"
    is_live = True

    def __iter__(self):
        frame, i = sample_frames(1)[0], 0
        while not self._stop.is_set() and i < 10_000:
            yield i, frame, time.time_ns()
            i += 1
            self._stop.wait(0.002)  # a 500 frames/s camera


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_stream_cleanly(tmp_path: Path, bundle_dir: Path, sig: int) -> None:
    before = signal.getsignal(sig)

    seen: list[int] = []

    def on_record(record: dict) -> None:
        seen.append(record["frame"])
        if len(seen) == 5:
            os.kill(os.getpid(), sig)

    summary = run_stream(
        bundle_dir, EndlessSource(), run_options(jsonl=str(tmp_path / "r.jsonl")), callback=on_record
    )
    assert summary["interrupted"] and 5 <= summary["frames"] <= 6
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == summary["frames"]
    assert signal.getsignal(sig) is before


def test_max_frames_is_respected(bundle_dir: Path) -> None:
    assert run_stream(bundle_dir, EndlessSource(), run_options(max_frames=7))["frames"] == 7
    assert run_stream(bundle_dir, EndlessSource(), run_options(max_frames=0))["frames"] == 0


# --- no torch on the edge ---------------------------------------------------------------------


def test_runtime_runs_where_torch_cannot_be_imported(bundle_dir: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "scipy"):
                    raise ImportError("blocked for this test: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import numpy as np
        import rrise.runtime
        import rrise.subscriber
        from rrise.runtime import Runtime
        rt = Runtime({str(bundle_dir)!r})
        rec = rt.certify(np.zeros((28, 28), np.uint8))
        assert rec["error"] is None, rec
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "scipy")]
        assert not bad, bad
        print("ok", rt.backend_name)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok onnxruntime")


# --- TensorRT backend against a stand-in for the TensorRT 10 / pycuda API ---------------------


class _FakeTensorRT:
    """Just enough of ``tensorrt`` (10.x, name-based I/O) to drive TensorRTBackend on the CPU.

    The "engine" computes logits[:, k] = (k + 1) · mean(x) over a dynamic batch of at most 4."""

    __version__ = "10.3.0"

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    @staticmethod
    def nptype(dtype: object) -> type:
        return np.float32

    class Runtime:
        def __init__(self, logger: object) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> object:
            return _FakeEngine() if data.startswith(b"not a real engine") else None


class _FakeEngine:
    num_io_tensors = 2
    memory: dict[int, np.ndarray] = {}

    def get_tensor_name(self, i: int) -> str:
        return ["input", "logits"][i]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if name == "input" else "out"

    def get_tensor_shape(self, name: str) -> tuple:
        return (-1, 1, 28, 28) if name == "input" else (-1, 10)

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        return ((1, 1, 28, 28), (2, 1, 28, 28), (4, 1, 28, 28))

    def get_tensor_dtype(self, name: str) -> str:
        return "float"

    def create_execution_context(self) -> object:
        return _FakeContext()


class _FakeContext:
    def __init__(self) -> None:
        self.shape: tuple = ()
        self.addr: dict[str, int] = {}
        self.calls: list[int] = []

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        assert shape[0] <= 4, "batch above the profile maximum"
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return self.shape if name == "input" else (self.shape[0], 10)

    def set_tensor_address(self, name: str, addr: int) -> bool:
        self.addr[name] = addr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        b = self.shape[0]
        x = _FakeEngine.memory[self.addr["input"]][: b * 28 * 28].reshape(b, -1)
        out = x.mean(axis=1, keepdims=True) * np.arange(1, 11, dtype=np.float32)
        _FakeEngine.memory[self.addr["logits"]][: out.size] = out.ravel()
        self.calls.append(b)
        return True


class _FakeCuda:
    """``pycuda.driver``: a device allocation is a numpy array keyed by a fake address."""

    contexts: list[str] = []

    class Device:
        def __init__(self, i: int) -> None:
            pass

        def compute_capability(self) -> tuple[int, int]:
            return (8, 7)

        def retain_primary_context(self) -> object:
            cuda = _FakeCuda

            class Ctx:
                def push(self) -> None:
                    cuda.contexts.append("push")

                def pop(self) -> None:
                    cuda.contexts.append("pop")

                def detach(self) -> None:
                    cuda.contexts.append("detach")

            return Ctx()

    class Stream:
        handle = 1234

        def synchronize(self) -> None:
            pass

    class _Alloc(int):
        def free(self) -> None:
            _FakeEngine.memory.pop(int(self), None)

    @staticmethod
    def init() -> None:
        pass

    @staticmethod
    def pagelocked_empty(n: int, dtype: np.dtype) -> np.ndarray:
        return np.empty(n, dtype)

    @staticmethod
    def mem_alloc(nbytes: int) -> int:
        addr = _FakeCuda._Alloc(len(_FakeEngine.memory) + 1)
        _FakeEngine.memory[int(addr)] = np.empty(nbytes // 4, np.float32)
        return addr

    @staticmethod
    def memcpy_htod_async(dev: int, host: np.ndarray, stream: object) -> None:
        _FakeEngine.memory[int(dev)][: host.size] = host

    @staticmethod
    def memcpy_dtoh_async(host: np.ndarray, dev: int, stream: object) -> None:
        host[:] = _FakeEngine.memory[int(dev)][: host.size]


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> type[_FakeCuda]:
    import types

    pycuda = types.ModuleType("pycuda")
    driver = types.ModuleType("pycuda.driver")
    for name in (
        "Device",
        "Stream",
        "init",
        "pagelocked_empty",
        "mem_alloc",
        "memcpy_htod_async",
        "memcpy_dtoh_async",
    ):
        setattr(driver, name, getattr(_FakeCuda, name))
    pycuda.driver = driver
    trt = types.ModuleType("tensorrt")
    for name in ("__version__", "TensorIOMode", "Logger", "nptype", "Runtime"):
        setattr(trt, name, getattr(_FakeTensorRT, name))
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    _FakeCuda.contexts.clear()
    return _FakeCuda


def test_auto_picks_the_tensorrt_engine_and_its_own_quantile(tmp_path: Path, fake_tensorrt) -> None:
    with_engine = make_bundle(tmp_path / "b", engine=True)
    rt = Runtime(with_engine, backend="auto")
    assert rt.backend_name == "tensorrt[10.3.0]" and rt.variant["precision"] == "fp16"
    assert rt.calibration.quantile == 0.5  # the engine's own quantile, not fp32's
    frames = sample_frames(6)  # 6 frames > max batch 4: two chunks, 4 then 2
    records = rt.certify_batch(frames)
    assert rt._backend.context.calls == [4, 2]
    means = np.array([f.astype(np.float32).mean() / 255.0 for f in frames])
    probs = softmax(means[:, None] * np.arange(1, 11))
    certs = certify_from_probs(probs, Bundle.load(with_engine).calibration(rt.variant))
    for rec, cert in zip(records, certs, strict=True):
        assert rec["pred"] == cert.pred and rec["p_lower"] == pytest.approx(cert.p_lower, abs=1e-5)
    with pytest.raises(ValueError, match="engine expects"):
        rt._backend.run(np.zeros((1, 1, 32, 32), np.float32))
    rt.close()
    assert fake_tensorrt.contexts[-1] == "detach"
    assert fake_tensorrt.contexts.count("push") == fake_tensorrt.contexts.count("pop")


def test_engine_for_another_gpu_is_not_used(tmp_path: Path, fake_tensorrt, monkeypatch) -> None:
    with_engine = make_bundle(tmp_path / "b", engine=True)
    monkeypatch.setattr(fake_tensorrt.Device, "compute_capability", lambda self: (9, 0))
    assert Runtime(with_engine, backend="auto").variant["backend"] == "onnxruntime"
    with pytest.raises(RuntimeError, match=r"compute capability 9\.0"):
        Runtime(with_engine, backend="tensorrt")
