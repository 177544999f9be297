"""Colour cameras: the runtime's preprocessing of a camera frame is bit for bit the calibration input.

A camera (and the runtime's image-folder source) gives OpenCV BGR uint8 frames. The calibration data
loader (rrise.calibrate.user_data) turns the user's images into model inputs through the runtime's
own Preprocessor, driven by the manifest ``preprocess`` dict the bundle carries. These tests check,
for gray, RGB and BGR models, frames larger, smaller and equal to the model input, with and without
a centre crop, that the two agree exactly, and that they are the intended numbers (independent
expectations for the no-resize cases).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rrise.calibrate.user_data import load_images
from rrise.runtime.preprocess import (
    FrameError,
    Preprocessor,
    center_crop_box,
    preprocess_spec,
    to_model_input,
)

MODEL_SIZE = (24, 32)  # H, W: not square, so the crop's aspect handling is exercised
FRAME_SIZES = [(24, 32), (60, 100), (17, 13), (48, 30)]  # equal, larger, smaller, other aspect
COLORS = ["gray", "rgb", "bgr"]


def _rgb_images(count: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth-ish random RGB uint8 images (structure, so interpolation matters)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, max(2, hw[0] // 4), max(2, hw[1] // 4), 3), dtype=np.uint8)
    out = np.stack([cv2.resize(s, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR) for s in small])
    out[:, ::3, ::5] = rng.integers(0, 256, out[:, ::3, ::5].shape, dtype=np.uint8)  # sharp detail
    return out


def _write_folder(root, rgb: np.ndarray) -> list[str]:
    """An ImageFolder with two classes; returns the relative paths in loader order."""
    names = []
    for i, img in enumerate(rgb):
        cls = "a" if i % 2 == 0 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / cls / f"{i:03d}.png"), np.ascontiguousarray(img[:, :, ::-1]))
        names.append(f"{cls}/{i:03d}.png")
    return names


@pytest.mark.parametrize("color", COLORS)
@pytest.mark.parametrize("frame_hw", FRAME_SIZES)
@pytest.mark.parametrize("crop", ["none", "center"])
def test_camera_frame_equals_calibration_input(tmp_path, color, frame_hw, crop) -> None:
    rgb = _rgb_images(6, frame_hw)
    names = _write_folder(tmp_path / "data", rgb)
    spec = preprocess_spec(color, MODEL_SIZE, crop=crop, crop_fraction=0.875 if crop == "center" else 1.0)
    data = load_images(tmp_path / "data", spec)
    assert data.images.shape == (6, 1 if color == "gray" else 3, *MODEL_SIZE)
    pre = Preprocessor(spec, [None, 1 if color == "gray" else 3, *MODEL_SIZE])  # what Runtime builds
    for i, name in enumerate(data.names):
        k = names.index(name)
        calib = data.images[i]
        assert calib.dtype == np.float32
        camera = np.ascontiguousarray(rgb[k][:, :, ::-1])  # an OpenCV camera frame: BGR uint8
        from_file = cv2.imread(str(tmp_path / "data" / name), cv2.IMREAD_ANYCOLOR)  # the folder source
        for frame in (camera, from_file, np.concatenate([camera, np.full((*frame_hw, 1), 255, np.uint8)], 2)):
            np.testing.assert_array_equal(pre(frame), calib)  # bit for bit
        if tuple(frame_hw) == MODEL_SIZE and crop == "none":  # no resampling: the exact numbers
            want = {
                "rgb": rgb[k].transpose(2, 0, 1),
                "bgr": rgb[k][:, :, ::-1].transpose(2, 0, 1),
                "gray": cv2.cvtColor(camera, cv2.COLOR_BGR2GRAY)[None],
            }[color]
            np.testing.assert_array_equal(calib, want.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("color", COLORS)
def test_npz_forms_equal_the_camera_path(tmp_path, color) -> None:
    """HWC uint8 RGB, HWC uint8 BGR (hwc_order) and CHW float arrays give the camera's model input."""
    rgb = _rgb_images(5, (40, 50), seed=3)
    labels = np.array([0, 1, 0, 1, 1])
    spec = preprocess_spec(color, MODEL_SIZE, crop="center")
    pre = Preprocessor(spec, [None, 1 if color == "gray" else 3, *MODEL_SIZE])
    camera = [pre(np.ascontiguousarray(img[:, :, ::-1])) for img in rgb]
    forms = {
        "hwc_rgb.npz": ({"images": rgb}, "rgb"),
        "hwc_bgr.npz": ({"images": np.ascontiguousarray(rgb[..., ::-1])}, "bgr"),
        "chw_float.npz": ({"images": rgb.transpose(0, 3, 1, 2).astype(np.float32) / 255}, "rgb"),
        "chw_float64.npz": ({"images": rgb.transpose(0, 3, 1, 2) / 255.0}, "rgb"),
    }
    for fname, (arrays, order) in forms.items():
        np.savez(tmp_path / fname, labels=labels, **arrays)
        data = load_images(tmp_path / fname, spec, hwc_order=order)
        assert data.pixels.dtype == np.uint8, fname  # quantized floats take the camera's uint8 path
        for i in range(len(rgb)):
            np.testing.assert_array_equal(data.images[i], camera[i], err_msg=fname)


def test_grey_frames_and_grey_files(tmp_path) -> None:
    """A grey camera frame, a grey PNG and its 3-channel copy give one model input for every model."""
    g = _rgb_images(1, (30, 44), seed=5)[0][:, :, 1]
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "d" / "a" / "grey.png"), g)
    cv2.imwrite(str(tmp_path / "d" / "b" / "grey3.png"), np.stack([g] * 3, axis=-1))
    for color in COLORS:
        spec = preprocess_spec(color, MODEL_SIZE)
        data = load_images(tmp_path / "d", spec)
        pre = Preprocessor(spec, [None, 1 if color == "gray" else 3, *MODEL_SIZE])
        np.testing.assert_array_equal(data.images[0], data.images[1])
        np.testing.assert_array_equal(pre(g), data.images[0])
        np.testing.assert_array_equal(pre(np.stack([g] * 3, axis=-1)), data.images[0])


def test_center_crop_window() -> None:
    assert center_crop_box((100, 100), (24, 32)) == (12, 0, 75, 100)  # wide model: full width
    assert center_crop_box((100, 200), (24, 32)) == (0, 33, 100, 133)  # wider frame: full height
    top, left, h, w = center_crop_box((256, 256), (224, 224), 0.875)  # torchvision's framing
    assert (h, w) == (224, 224) and (top, left) == (16, 16)
    assert center_crop_box((1, 1), (24, 32)) == (0, 0, 1, 1)


def test_pixels_then_scaling_is_the_call() -> None:
    frame = _rgb_images(1, (50, 70), seed=9)[0]
    for color in COLORS:
        pre = Preprocessor(preprocess_spec(color, MODEL_SIZE, crop="center"), [None, None, *MODEL_SIZE])
        px = pre.pixels(frame)
        assert px.dtype == np.uint8 and px.shape == pre.output_shape
        np.testing.assert_array_equal(to_model_input(px), pre(frame))
        f = frame.astype(np.float32) / 255
        np.testing.assert_array_equal(to_model_input(pre.pixels(f)), pre(f))


def test_new_preprocess_options_are_checked() -> None:
    spec = preprocess_spec("bgr", (8, 8), crop="center", crop_fraction=0.5, interpolation="cubic")
    assert spec == {
        "color": "bgr",
        "resize": [8, 8],
        "crop": "center",
        "crop_fraction": 0.5,
        "interpolation": "cubic",
        "layout": "NCHW",
    }
    assert Preprocessor(spec, [1, 3, 8, 8]).spec == spec
    old = {"color": "rgb", "resize": [8, 8], "interpolation": "area", "layout": "NCHW"}
    assert Preprocessor(old, [1, 3, 8, 8]).crop == "none"  # manifests without crop keep their meaning
    with pytest.raises(ValueError, match="crop must be"):
        preprocess_spec("rgb", (8, 8), crop="random")
    with pytest.raises(ValueError, match="crop_fraction"):
        preprocess_spec("rgb", (8, 8), crop="center", crop_fraction=1.5)
    with pytest.raises(ValueError, match="crop 'center'"):
        preprocess_spec("rgb", (8, 8), crop_fraction=0.5)
    with pytest.raises(ValueError, match="channel"):
        Preprocessor(spec, [1, 1, 8, 8])
    with pytest.raises(FrameError):
        Preprocessor(spec, [1, 3, 8, 8])(np.zeros((4, 4, 2), np.uint8))
