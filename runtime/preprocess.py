"""Camera frame → model input, exactly as the manifest's ``preprocess`` section says.

The calibration pipeline feeds the model ``uint8 / 255`` as float32 at the model's resolution, so a
uint8 frame stays uint8 through colour conversion, cropping and resizing and is scaled last: a
dataset image shown to the runtime at its native size gives bit-identical model input, and the
calibrated quantile applies to exactly the numbers it was computed on.

The user's own images (``rrise.calibrate.user_data``) go through this very class, as the BGR frames
a camera would give, so the calibration inputs and the runtime's inputs come from one code path:
:meth:`Preprocessor.pixels` (colour → crop → resize, still uint8) then :func:`to_model_input`.

Manifest ``preprocess`` keys: ``color`` (the model's channel order: ``gray``, ``rgb`` or ``bgr``),
``resize`` ``[H, W]`` (the model input size), ``crop`` (``none``: the whole frame is resized to
H×W, aspect ratio not kept; ``center``: the largest centred window of the frame with the model's
aspect ratio, times ``crop_fraction``, is resized to H×W), ``crop_fraction`` (in (0, 1], default 1;
0.875 is torchvision's ``Resize(256)`` + ``CenterCrop(224)`` framing), ``interpolation`` (``area``,
``linear``, ``nearest``, ``cubic``) and ``layout`` (``NCHW``). Absent keys keep the defaults, so older
manifests mean what they meant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

__all__ = [
    "COLORS",
    "CROPS",
    "FrameError",
    "INTERPOLATIONS",
    "Preprocessor",
    "center_crop_box",
    "preprocess_spec",
    "to_model_input",
]

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
}
COLORS = {"gray": 1, "rgb": 3, "bgr": 3}
CROPS = ("none", "center")

# (manifest colour, frame channels) → cv2 conversion code; None = already in the right colour.
_CONVERSIONS = {
    ("gray", 1): None,
    ("gray", 3): cv2.COLOR_BGR2GRAY,
    ("gray", 4): cv2.COLOR_BGRA2GRAY,
    ("rgb", 1): cv2.COLOR_GRAY2RGB,
    ("rgb", 3): cv2.COLOR_BGR2RGB,
    ("rgb", 4): cv2.COLOR_BGRA2RGB,
    ("bgr", 1): cv2.COLOR_GRAY2BGR,
    ("bgr", 3): None,
    ("bgr", 4): cv2.COLOR_BGRA2BGR,
}
_SCALE = np.float32(255.0)


class FrameError(ValueError):
    """A frame the runtime cannot turn into model input; the message says what is wrong with it."""


def preprocess_spec(
    color: str,
    size: Sequence[int],
    *,
    crop: str = "none",
    crop_fraction: float = 1.0,
    interpolation: str = "area",
) -> dict[str, Any]:
    """The manifest ``preprocess`` dict for a model taking ``color`` (``gray``/``rgb``/``bgr``) at
    ``size`` = (H, W), checked: every key the runtime reads, nothing else."""
    spec = {
        "color": str(color),
        "resize": [int(size[0]), int(size[1])],
        "crop": str(crop),
        "crop_fraction": float(crop_fraction),
        "interpolation": str(interpolation),
        "layout": "NCHW",
    }
    Preprocessor(spec, [COLORS.get(spec["color"]), *spec["resize"]])  # raises on a bad value
    return spec


def center_crop_box(
    frame_hw: tuple[int, int], size: tuple[int, int], fraction: float = 1.0
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the largest window of a ``frame_hw`` frame centred on it with
    the aspect ratio of ``size`` (H, W), both sides times ``fraction`` (rounded half up, at least 1)."""
    fh, fw = int(frame_hw[0]), int(frame_hw[1])
    h, w = int(size[0]), int(size[1])
    if fw * h > fh * w:  # the frame is wider than the model input: full height
        ch, cw = fh * fraction, fh * fraction * w / h
    else:
        ch, cw = fw * fraction * h / w, fw * fraction
    ch = min(fh, max(1, math.floor(ch + 0.5)))
    cw = min(fw, max(1, math.floor(cw + 0.5)))
    return (fh - ch) // 2, (fw - cw) // 2, ch, cw


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """:meth:`Preprocessor.pixels` output → float32 model input in [0, 1] (uint8 scaled by 1/255 last)."""
    out = pixels.astype(np.float32) / _SCALE if pixels.dtype == np.uint8 else pixels
    return np.ascontiguousarray(out, dtype=np.float32)


class Preprocessor:
    """Turns one frame into a ``[C, H, W]`` float32 array in [0, 1] for the model.

    Frames: uint8 ``H×W``, ``H×W×1``, ``H×W×3`` (BGR, as OpenCV gives) or ``H×W×4`` (BGRA); or
    float32/float64 frames of the same shapes with values in [0, 1]. Steps: colour conversion to
    ``color``, the ``crop`` window, resize to the model's H×W with ``interpolation``, then scaling.
    """

    def __init__(self, preprocess: Mapping[str, Any], input_shape: Sequence[int | None]) -> None:
        color = str(preprocess.get("color", "gray"))
        if color not in COLORS:
            raise ValueError(f"preprocess.color must be one of {sorted(COLORS)}, got {color!r}")
        interpolation = str(preprocess.get("interpolation", "area"))
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess.interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}"
            )
        crop = str(preprocess.get("crop") or "none")
        if crop not in CROPS:
            raise ValueError(f"preprocess.crop must be one of {list(CROPS)}, got {crop!r}")
        fraction = preprocess.get("crop_fraction")
        fraction = 1.0 if fraction is None else float(fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"preprocess.crop_fraction must be in (0, 1], got {fraction}")
        if crop == "none" and fraction != 1.0:
            raise ValueError(f"preprocess.crop_fraction {fraction} needs crop 'center', got crop 'none'")
        layout = str(preprocess.get("layout", "NCHW"))
        if layout != "NCHW":
            raise ValueError(f"preprocess.layout must be 'NCHW', got {layout!r}")
        shape = list(input_shape)
        if len(shape) == 4:
            shape = shape[1:]
        if len(shape) != 3:
            raise ValueError(f"model input shape must be [N, C, H, W] or [C, H, W], got {input_shape}")
        channels, height, width = shape
        resize = preprocess.get("resize")
        if resize is not None:
            if len(resize) != 2:
                raise ValueError(f"preprocess.resize must be [height, width], got {resize}")
            rh, rw = int(resize[0]), int(resize[1])
            if (height not in (None, rh)) or (width not in (None, rw)):
                raise ValueError(f"preprocess.resize {[rh, rw]} disagrees with the model input {input_shape}")
            height, width = rh, rw
        if height is None or width is None:
            raise ValueError(
                f"model input {input_shape} has no fixed height/width and preprocess has no resize"
            )
        if channels not in (None, COLORS[color]):
            raise ValueError(
                f"preprocess.color {color!r} gives {COLORS[color]} channel(s) but the model input "
                f"{input_shape} has {channels}"
            )
        self.color = color
        self.channels = COLORS[color]
        self.size = (int(height), int(width))
        self.interpolation = interpolation
        self._interp = INTERPOLATIONS[interpolation]
        self.crop = crop
        self.crop_fraction = fraction

    @property
    def spec(self) -> dict[str, Any]:
        """This preprocessing as a complete manifest ``preprocess`` dict (see :func:`preprocess_spec`)."""
        return {
            "color": self.color,
            "resize": list(self.size),
            "crop": self.crop,
            "crop_fraction": self.crop_fraction,
            "interpolation": self.interpolation,
            "layout": "NCHW",
        }

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def __call__(self, frame: np.ndarray | None) -> np.ndarray:
        """``frame`` → ``[C, H, W]`` float32 in [0, 1]; raises :class:`FrameError` on a bad frame."""
        return to_model_input(self.pixels(frame))

    def pixels(self, frame: np.ndarray | None) -> np.ndarray:
        """``frame`` → ``[C, H, W]`` at the model's size and channel order, before scaling: uint8 for a
        uint8 frame (exactly :meth:`__call__` × 255), float32 in [0, 1] for a float frame.
        :func:`to_model_input` of it is :meth:`__call__`'s result, bit for bit."""
        img = self._check(frame)
        code = _CONVERSIONS[(self.color, 1 if img.ndim == 2 else img.shape[2])]
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if code is not None:
            img = cv2.cvtColor(img, code)
        h, w = self.size
        if self.crop == "center":
            top, left, ch, cw = center_crop_box(img.shape[:2], self.size, self.crop_fraction)
            if (ch, cw) != img.shape[:2]:
                img = np.ascontiguousarray(img[top : top + ch, left : left + cw])
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=self._interp)
        # uint8 is scaled last, as the dataset loader does; resampled floats may overshoot by an ulp.
        if img.dtype != np.uint8:
            img = np.clip(img, 0.0, 1.0)
        out = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
        return np.ascontiguousarray(out)

    @staticmethod
    def _check(frame: Any) -> np.ndarray:
        if frame is None:
            raise FrameError("no frame (the source gave None: unreadable or missing image)")
        if not isinstance(frame, np.ndarray):
            raise FrameError(f"frame must be a numpy array, got {type(frame).__name__}")
        if frame.size == 0:
            raise FrameError(f"empty frame (shape {frame.shape})")
        if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)):
            raise FrameError(f"frame shape {frame.shape} is not H×W, H×W×1, H×W×3 (BGR) or H×W×4 (BGRA)")
        if frame.dtype == np.uint8:
            return np.ascontiguousarray(frame)  # OpenCV rejects negative strides
        if frame.dtype == np.float32 or frame.dtype == np.float64:
            if not np.all(np.isfinite(frame)):
                raise FrameError("frame contains NaN or inf")
            lo, hi = float(frame.min()), float(frame.max())
            if lo < 0.0 or hi > 1.0:
                raise FrameError(f"float frame values must be in [0, 1], got [{lo:g}, {hi:g}]")
            return np.ascontiguousarray(frame, dtype=np.float32)
        raise FrameError(f"frame dtype {frame.dtype} is not uint8, float32 or float64")
