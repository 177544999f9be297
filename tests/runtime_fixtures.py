"""Helpers for the runtime tests: a tiny ONNX surrogate (exported with torch) in a real bundle."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from rrise.bundle import GUARANTEE, write_manifest
from rrise.certificate import Certificate
from rrise.options import make_options
from rrise.records import Record, Verdict
from rrise.runtime.options import RunOptions

NUM_CLASSES = 10
LABELS = [f"class{i}" for i in range(NUM_CLASSES)]
TOP_LEVEL_QUANTILE = 0.3  # the manifest's calibration.quantile
FP32_QUANTILE = 0.2  # the fp32 variant's own quantile: the one the runtime must use
INT8_QUANTILE = 0.9
FP32_MAX_BATCH = 4  # the fp32 variant's outputs were checked equal at micro-batches up to 4


def export_tiny_onnx(path: Path, channels: int = 1, size: int = 28, seed: int = 0) -> None:
    """A linear classifier on the pixels with weights big enough that some inputs certify."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, NUM_CLASSES))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(model[1].weight.shape, generator=gen) * 0.15)
        model[1].bias.zero_()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is what we want
        torch.onnx.export(
            model,
            (torch.zeros(1, channels, size, size),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )


def _manifest(channels: int, size: int, color: str, variants: list[dict]) -> dict:
    return {
        "schema_version": 1,
        "rrise_version": "0.1.0",
        "created": "2025-01-01T00:00:00Z",
        "model": {
            "file": "surrogate.onnx",
            "input": {
                "name": "input",
                "shape": [None, channels, size, size],
                "dtype": "float32",
                "range": [0, 1],
            },
            "output": {"name": "logits", "kind": "logits"},
            "num_classes": NUM_CLASSES,
            "labels": LABELS,
        },
        "preprocess": {"color": color, "resize": [size, size], "interpolation": "area", "layout": "NCHW"},
        "smoothing": {"sigma": 0.25},
        "calibration": {
            "score": "probit",
            "alpha": 0.01,
            "beta": 0.001,
            "m": 3000,
            "n_mc": 10000,
            "quantile": TOP_LEVEL_QUANTILE,
            "p_cap": 0.001 ** (1 / 10000),
            "dataset": "test",
        },
        "base_model": {"file": "base.onnx"},
        "variants": variants,
        "guarantee": GUARANTEE,
    }


def make_bundle(folder: Path, *, color: str = "gray", size: int = 28, engine: bool = False) -> Path:
    """A bundle folder with an fp32 and an int8 onnxruntime variant (and a fake TensorRT engine)."""
    folder.mkdir(parents=True, exist_ok=True)
    channels = 1 if color == "gray" else 3
    export_tiny_onnx(folder / "surrogate.onnx", channels, size)
    shutil.copy(folder / "surrogate.onnx", folder / "surrogate.int8.onnx")
    shutil.copy(folder / "surrogate.onnx", folder / "base.onnx")
    variants = [
        {
            "precision": "int8",
            "backend": "onnxruntime",
            "file": "surrogate.int8.onnx",
            "quantile": INT8_QUANTILE,
            "calibrated_with": "onnxruntime-cpu",
            "max_batch": 1,
        },
        {
            "precision": "fp32",
            "backend": "onnxruntime",
            "file": "surrogate.onnx",
            "quantile": FP32_QUANTILE,
            "calibrated_with": "onnxruntime-cpu",
            "max_batch": FP32_MAX_BATCH,
        },
    ]
    if engine:
        (folder / "surrogate.fp16.engine").write_bytes(b"not a real engine")
        variants.append(
            {
                "precision": "fp16",
                "backend": "tensorrt",
                "file": "surrogate.fp16.engine",
                "quantile": 0.5,
                "trt_version": "10.3.0",
                "compute_capability": "8.7",
                "calibrated_with": "tensorrt",
                "max_batch": 8,  # more than the engine's profile takes: the backend chunks
            }
        )
    write_manifest(folder, _manifest(channels, size, color, variants))
    return folder


def sample_frames(n: int, size: int = 28, seed: int = 1) -> list[np.ndarray]:
    """uint8 grey frames with varied contrast, so some certify and some abstain."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        contrast = (i % 5 + 1) / 5
        frames.append((rng.random((size, size)) * 255 * contrast).astype(np.uint8))
    return frames


def record_of(
    seq: int,
    certificate: Certificate | None = None,
    *,
    labels: list[str] | None = None,
    error: str | None = None,
    source: str = "s",
    bundle: str = "b",
) -> dict[str, Any]:
    """A frame record as a stream builds it (:meth:`rrise.records.Record.of`), stamped now."""
    label = (
        None
        if certificate is None or labels is None or certificate.pred is None
        else labels[certificate.pred]
    )
    verdict = Verdict(seq, seq, certificate, label, error, None, None)
    return Record.of(verdict, stamp_ns=time.time_ns(), latency_ms=0.0, source=source, bundle=bundle).to_dict()


def run_options(**values: Any) -> RunOptions:
    """:class:`RunOptions` by leaf name (``batch=4, jsonl="-"``), as :func:`rrise.options.make_options`."""
    return make_options(RunOptions, **values)
