"""Frames to and from the image messages of recordings: JPEG bytes and ROS ``sensor_msgs/Image``
pixel buffers. Frames are what sources give (BGR or grey uint8 arrays, OpenCV's convention)."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["RAW_ENCODINGS", "decode_compressed", "encode_jpeg", "raw_to_frame", "to_uint8"]

# sensor_msgs/Image encodings a recording may hold -> (channels, dtype, conversion to BGR or None)
RAW_ENCODINGS = {
    "mono8": (1, np.uint8, None),
    "8UC1": (1, np.uint8, None),
    "mono16": (1, np.uint16, None),
    "bgr8": (3, np.uint8, None),
    "8UC3": (3, np.uint8, None),
    "rgb8": (3, np.uint8, cv2.COLOR_RGB2BGR),
    "bgra8": (4, np.uint8, cv2.COLOR_BGRA2BGR),
    "rgba8": (4, np.uint8, cv2.COLOR_RGBA2BGR),
}


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """A displayable uint8 copy of a frame: floats in [0, 1] are scaled by 255, others clipped."""
    a = np.asarray(frame)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    f = np.nan_to_num(a.astype(np.float32))
    if f.size and float(f.max()) <= 1.0:
        f = f * 255.0
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a BGR or grey frame (grey stays one channel)."""
    image = to_uint8(frame)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"cannot JPEG-encode a frame of shape {image.shape}")
    return buf.tobytes()


def decode_compressed(data: bytes) -> np.ndarray | None:
    """A compressed image (JPEG, PNG…) as a BGR or grey uint8 frame; None when it does not decode."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    if not buf.size:
        return None
    return cv2.imdecode(buf, cv2.IMREAD_ANYCOLOR)


def raw_to_frame(encoding: str, height: int, width: int, step: int, data: bytes) -> np.ndarray:
    """A ``sensor_msgs/Image`` pixel buffer as a BGR or grey frame; ValueError for an encoding or
    size it cannot take (the caller turns that into an error record)."""
    if encoding not in RAW_ENCODINGS:
        raise ValueError(f"image encoding {encoding!r} is not one of {', '.join(RAW_ENCODINGS)}")
    channels, dtype, conversion = RAW_ENCODINGS[encoding]
    itemsize = np.dtype(dtype).itemsize
    row = width * channels * itemsize
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    if step < row or buf.size < step * height:
        raise ValueError(f"{encoding} image {width}x{height} needs {step}x{height} bytes, got {buf.size}")
    rows = buf[: step * height].reshape(height, step)[:, :row]
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
    frame = pixels[:, :, 0] if channels == 1 else pixels
    return cv2.cvtColor(frame, conversion) if conversion is not None else frame.copy()
