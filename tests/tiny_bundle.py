"""Small, real bundles for tests and the wheel check.

- :func:`make_tiny_bundle`: a digits CNN trained for a few seconds, with real MC calibration.
- :func:`linear_sources` / :func:`make_linear_bundle`: no torch at all, a hand-made linear ONNX
  graph on 1×4×4 inputs with synthetic calibration data, built by ``rrise.export.bundler.pack_bundle``
  (so every file of a real bundle is present and hashed) in well under a second.

``python -m tests.tiny_bundle BUNDLE_DIR [FRAMES_DIR]`` writes the digits bundle (and a folder of frames).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

LINEAR_SHAPE = (1, 4, 4)
LINEAR_K = 3
LINEAR_M, LINEAR_N_MC, LINEAR_ALPHA, LINEAR_BETA = 40, 1000, 0.1, 0.01


def linear_onnx(path: Path, seed: int, input_name: str = "input") -> Path:
    """input [batch, 1, 4, 4] → Flatten → MatMul + Add → logits [batch, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((3 * rng.standard_normal((16, LINEAR_K))).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(LINEAR_K).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [input_name], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *LINEAR_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", LINEAR_K])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def linear_sources(folder: Path) -> dict:
    """``surrogate.onnx``, ``base.onnx``, ``calibration.npz`` and the Calibration record for them,
    written to ``folder``: what :func:`make_linear_bundle` packs."""
    from rrise import CalibrationSpec, conformalize
    from rrise.bundle import sha256_file
    from rrise.export.onnx_export import onnx_logits
    from rrise.numerics import softmax

    surrogate = linear_onnx(folder / "surrogate.onnx", seed=0)
    base = linear_onnx(folder / "base.onnx", seed=1, input_name="x")
    rng = np.random.default_rng(2)
    images = rng.random((LINEAR_M, *LINEAR_SHAPE), dtype=np.float32)
    probs = softmax(onnx_logits(surrogate, images))
    counts = np.stack([rng.multinomial(LINEAR_N_MC, p) for p in probs]).astype(np.int64)
    np.savez(folder / "calibration.npz", images=images, counts=counts, probs=probs)
    spec = CalibrationSpec(sigma=0.25, n_mc=LINEAR_N_MC, alpha=LINEAR_ALPHA, beta=LINEAR_BETA)
    cal = conformalize(
        spec, probs, counts, base_sha256=sha256_file(base), surrogate_sha256=sha256_file(surrogate)
    )
    return {"surrogate": surrogate, "base": base, "npz": folder / "calibration.npz", "cal": cal}


def make_linear_bundle(sources: dict, out: Path, **changes):
    """Build (``overwrite``) the linear bundle at ``out`` from :func:`linear_sources`; ``changes``
    replace its ``surrogate``, ``base`` or ``cal``."""
    from rrise.export.bundler import BundleSources, pack_bundle

    return pack_bundle(
        out,
        BundleSources(
            surrogate_onnx=changes.get("surrogate", sources["surrogate"]),
            base_onnx=changes.get("base", sources["base"]),
            calibration=changes.get("cal", sources["cal"]),
            calibration_npz=sources["npz"],
            labels=["a", "b", "c"],
            preprocess={"color": "gray", "resize": [4, 4], "interpolation": "area", "layout": "NCHW"},
            dataset="synthetic",
            input_shape=LINEAR_SHAPE,
            parity_max_abs_diff=0.0,
        ),
    )


def make_tiny_bundle(bundle_dir: Path, frames_dir: Path | None = None, n_cal: int = 200) -> Path:
    import cv2
    import torch

    from rrise.bundle import sha256_file
    from rrise.calibrate.mc import sample_counts
    from rrise.calibrate.models import build_model
    from rrise.calibrate.train import train_base
    from rrise.calibration import CalibrationSpec, conformalize
    from rrise.datasets import load_dataset
    from rrise.export.bundler import BundleSources, pack_bundle
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
    pack_bundle(
        bundle_dir,
        BundleSources(
            surrogate_onnx=onnx_path,
            base_onnx=onnx_path,
            calibration=cal,
            calibration_npz=work / "calibration.npz",
            labels=train.classes,
            preprocess={"color": "gray", "resize": [8, 8], "interpolation": "area", "layout": "NCHW"},
            dataset="digits",
            input_shape=(1, 8, 8),
            parity_max_abs_diff=onnx_parity(model, onnx_path, cal_images[:32]),
        ),
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
