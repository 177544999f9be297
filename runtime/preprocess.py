"""Camera frame → model input, exactly as the manifest's ``preprocess`` section says.

The calibration pipeline feeds the model ``uint8 / 255`` as float32 at the model's resolution, so a
uint8 frame stays uint8 through colour conversion and resizing and is scaled last: a dataset image
shown to the runtime at its native size gives bit-identical model input, and the calibrated
quantile applies to exactly the numbers it was computed on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

__all__ = ["FrameError", "Preprocessor", "INTERPOLATIONS", "COLORS"]

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
}
COLORS = {"gray": 1, "rgb": 3}

# (manifest colour, frame channels) → cv2 conversion code; None = already in the right colour.
_CONVERSIONS = {
    ("gray", 1): None,
    ("gray", 3): cv2.COLOR_BGR2GRAY,
    ("gray", 4): cv2.COLOR_BGRA2GRAY,
    ("rgb", 1): cv2.COLOR_GRAY2RGB,
    ("rgb", 3): cv2.COLOR_BGR2RGB,
    ("rgb", 4): cv2.COLOR_BGRA2RGB,
}
_SCALE = np.float32(255.0)


class FrameError(ValueError):
    """A frame the runtime cannot turn into model input; the message says what is wrong with it."""


class Preprocessor:
    """Turns one frame into a ``[C, H, W]`` float32 array in [0, 1] for the model.

    Frames: uint8 ``H×W``, ``H×W×1``, ``H×W×3`` (BGR, as OpenCV gives) or ``H×W×4`` (BGRA); or
    float32/float64 frames of the same shapes with values in [0, 1].
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

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def __call__(self, frame: np.ndarray | None) -> np.ndarray:
        """``frame`` → ``[C, H, W]`` float32 in [0, 1]; raises :class:`FrameError` on a bad frame."""
        img = self._check(frame)
        code = _CONVERSIONS[(self.color, 1 if img.ndim == 2 else img.shape[2])]
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if code is not None:
            img = cv2.cvtColor(img, code)
        h, w = self.size
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=self._interp)
        # uint8 is scaled last, as the dataset loader does; resampled floats may overshoot by an ulp.
        out = img.astype(np.float32) / _SCALE if img.dtype == np.uint8 else np.clip(img, 0.0, 1.0)
        out = out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
        return np.ascontiguousarray(out, dtype=np.float32)

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
