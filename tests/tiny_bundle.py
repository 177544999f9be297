"""A small, real bundle for tests and the wheel check: a digits CNN trained for a few seconds.

``python -m tests.tiny_bundle BUNDLE_DIR [FRAMES_DIR]`` writes the bundle (and a folder of frames).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np


def make_tiny_bundle(bundle_dir: Path, frames_dir: Path | None = None, n_cal: int = 200) -> Path:
    import cv2
    import torch

    from rrise.bundle import sha256_file
    from rrise.calibrate.mc import sample_counts
    from rrise.calibrate.models import build_model
    from rrise.calibrate.train import train_base
    from rrise.calibration import CalibrationSpec, conformalize
    from rrise.datasets import load_dataset
    from rrise.export.bundler import build_bundle
    from rrise.export.onnx_export import export_onnx, onnx_parity

    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = build_model("cnn-small", 1, 10, 8, mean=0.3, std=0.4)
    train_base(model, train.images[:900], train.labels[:900], sigma=0.25, epochs=4, show_progress=False)
    work = Path(tempfile.mkdtemp())
    onnx_path = export_onnx(model, work / "model.onnx", (1, 8, 8))
    cal_images = train.images[900:1200]
    counts = sample_counts(str(onnx_path), cal_images, n=n_cal, sigma=0.25, seed=1)
    from rrise.runtime.backends import OnnxRuntimeBackend

    probs = OnnxRuntimeBackend(onnx_path).run(cal_images)
    spec = CalibrationSpec(n_mc=n_cal, sigma=0.25, alpha=0.05, beta=0.001)
    digest = sha256_file(onnx_path)  # the base model doubles as the surrogate here
    cal = conformalize(spec, probs, counts, base_sha256=digest, surrogate_sha256=digest)
    np.savez_compressed(work / "calibration.npz", images=cal_images, counts=counts, probs=probs)
    build_bundle(
        bundle_dir,
        surrogate_onnx=onnx_path,
        base_onnx=onnx_path,
        calibration=cal,
        calibration_npz=work / "calibration.npz",
        labels=train.classes,
        preprocess={"color": "gray", "resize": [8, 8], "interpolation": "area", "layout": "NCHW"},
        dataset="digits",
        input_shape=(1, 8, 8),
        parity_max_abs_diff=onnx_parity(model, onnx_path, cal_images[:32]),
        overwrite=True,
    )
    if frames_dir is not None:
        frames_dir.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(test.images[:8]):
            u8 = np.rint(img[0] * 255).astype(np.uint8)
            cv2.imwrite(
                str(frames_dir / f"frame_{i:03d}.png"),
                cv2.resize(u8, (32, 32), interpolation=cv2.INTER_NEAREST),
            )
        (frames_dir / "frame_999_corrupt.png").write_bytes(b"not a png")
    return bundle_dir


if __name__ == "__main__":
    make_tiny_bundle(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
