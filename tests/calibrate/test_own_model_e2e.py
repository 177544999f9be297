"""Your own classifier on your own colour images, end to end, on real Fashion-MNIST.

Fashion-MNIST is written as 3-channel 32×32 PNGs in an ImageFolder (examples/make_colour_folder.py);
a small residual network is trained and exported by a plain PyTorch script that does not use rrise
(examples/train_own_classifier.py); `rrise build` certifies it from its ONNX file, its `.pt2`
archive and a factory string with its weights, on the folder and on an `.npz`; `rrise run`
certifies an MJPG video of further images with each bundle. Smoke sizes: this checks that the path
works, it measures nothing (``python -m benchmarks own_model`` does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FASHION_AVAILABLE

pytest.importorskip("torch")
pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not FASHION_AVAILABLE, reason="needs Fashion-MNIST (apt install dataset-fashion-mnist)"
    ),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# smoke sizes and a narrow network keep each build short; the ONNX base gets the small built-in
# surrogate (a torch base's surrogate is a copy of it)
BUILD = ["--sigma", "0.25", "--profile", "smoke", "--no-progress"]
NORMALIZATION = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25,0.25,0.25"]  # both forms users type
FACTORY = """
import importlib.util

spec = importlib.util.spec_from_file_location("train_own_classifier", {example!r})
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def narrow():
    return example.build_model(10, width=4)

"""


def _python(*args: str) -> None:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict:
    """Colour images (train / deploy / video) and a classifier trained on the train folder only."""
    root = tmp_path_factory.mktemp("own")
    data, model = root / "data", root / "model"
    _python(str(EXAMPLES / "make_colour_folder.py"), "--out", str(data), "--train", "3000",
            "--deploy", "800", "--video", "12", "--npz")  # fmt: skip
    _python(str(EXAMPLES / "train_own_classifier.py"), "--data", str(data / "train"), "--out", str(model),
            "--epochs", "3", "--width", "4", "--pt2", "--state-dict")  # fmt: skip
    (root / "factory.py").write_text(FACTORY.format(example=str(EXAMPLES / "train_own_classifier.py")))
    info = json.loads((data / "info.json").read_text())
    return {"root": root, "data": data, "model": model, "info": info}


def _build(model: str, data: Path, workdir: Path, *extra: str) -> Path:
    """`rrise build` as a user types it (through the console entry's argument handling)."""
    from typer.testing import CliRunner

    from rrise.cli import app, spread_vector_options

    args = ["build", "--model", model, "--data", str(data), "--workdir", str(workdir), *NORMALIZATION, *BUILD]
    result = CliRunner().invoke(app, spread_vector_options([*args, *extra]))
    assert result.exit_code == 0, result.output
    bundle = workdir / "bundle"
    assert result.output.strip().splitlines()[-1] == str(bundle)
    return bundle


def _run_video(bundle: Path, own: dict, out: Path) -> list[dict]:
    """`rrise run` on the MJPG (BGR) video: one record per frame, labels from the folder names, and
    each certified class the smoothed base classifier's own on that frame (fresh Monte Carlo)."""
    _python("-m", "rrise", "run", "--bundle", str(bundle), "--source", str(own["data"] / "video.avi"),
            "--jsonl", str(out))  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(12))
    assert all(r["error"] is None for r in records)
    classes = own["info"]["classes"]
    for r in records:
        assert r["abstain"] == (r["pred"] is None)
        if not r["abstain"]:
            assert r["label"] == classes[r["pred"]] and r["radius"] > 0
    smoothed = _smoothed_classes(bundle, own["data"] / "video.avi")
    certified = [r for r in records if not r["abstain"]]
    # the guarantee (probability ≥ 1 − α − β per record, α = 0.05 here): at most a rare miss
    assert sum(r["pred"] != smoothed[r["frame"]] for r in certified) <= max(1, len(certified) // 6)
    return records


def _smoothed_classes(bundle: Path, video: Path) -> list[int]:
    """The smoothed base classifier's class on each video frame: the bundle's own base model, the
    frames decoded and preprocessed as the manifest says, 400 noisy draws each."""
    import cv2

    from rrise import Bundle
    from rrise.calibrate.mc import sample_counts
    from rrise.runtime.preprocess import Preprocessor, to_model_input

    b = Bundle.load(bundle)
    pre = Preprocessor(b.manifest["preprocess"], b.manifest["model"]["input"]["shape"])
    cap = cv2.VideoCapture(str(video))
    frames = []
    while (got := cap.read())[0]:
        frames.append(pre.pixels(got[1]))
    cap.release()
    base = b.file(b.manifest["base_model"]["file"])
    counts = sample_counts(str(base), to_model_input(np.stack(frames)), 400, b.sigma, 400, seed=0)
    return [int(c) for c in counts.argmax(1)]


def test_onnx_on_a_colour_folder_then_run_on_an_rgb_video(own) -> None:
    from rrise import Bundle

    root = own["root"]
    surrogate = ["--surrogate-arch", "cnn-small"]
    bundle = _build(str(own["model"] / "model.onnx"), own["data"] / "deploy", root / "onnx", *surrogate)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocess"]["color"] == "rgb"
    assert manifest["preprocess"]["resize"] == [32, 32]
    assert manifest["model"]["input"]["shape"][1:] == [3, 32, 32]
    assert Bundle.load(bundle).labels == own["info"]["classes"]
    _run_video(bundle, own, own["root"] / "onnx.jsonl")


def test_pt2_archive_on_the_folder(own) -> None:
    bundle = _build(str(own["model"] / "model.pt2"), own["data"] / "deploy", own["root"] / "pt2")
    _run_video(bundle, own, own["root"] / "pt2.jsonl")


def test_factory_with_weights_on_an_npz_with_training_images(own) -> None:
    import shutil

    root = own["root"]
    workdir = root / "factory"
    few = root / "train_few"  # a few of the images the model trained on: extra surrogate targets only
    for cls in sorted((own["data"] / "train").iterdir()):
        (few / cls.name).mkdir(parents=True)
        for png in sorted(cls.iterdir())[:15]:
            shutil.copy(png, few / cls.name / png.name)
    # cnn-small: a copy of this 4-channel, 35%-accurate base fine-tuned at smoke sizes left 6 of 112
    # calibration inputs with no Monte Carlo vote for its class (one more than α = 0.05 allows: q̂ = ∞)
    bundle = _build(f"{root / 'factory.py'}:narrow", own["data"] / "deploy.npz", workdir,
                    "--weights", str(own["model"] / "model_state.pt"), "--input-size", "32", "32",
                    "--train-data", str(few), "--surrogate-arch", "cnn-small")  # fmt: skip
    config = json.loads((workdir / "run.json").read_text())["config"]["user"]
    assert config["data"].endswith("deploy.npz") and config["train_data"].endswith("train_few")
    _run_video(bundle, own, root / "factory.jsonl")
