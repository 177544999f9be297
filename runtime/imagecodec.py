"""Frames to and from image files and the image messages of recordings: compressed bytes (JPEG,
PNG…) and ROS ``sensor_msgs/Image`` pixel buffers. Frames are what sources give (BGR or grey uint8
arrays, OpenCV's convention).

A cut or damaged compressed image must not become a frame: libjpeg decodes a JPEG cut to 40 % of
its bytes with a warning and grey rows, and the runtime would certify that picture as if it were
the scene. :func:`image_defect` walks the file's own structure first (JPEG marker segments up to the
end-of-image marker, PNG chunks and their CRCs up to IEND, the sizes BMP and WebP headers state)
and :func:`decode_compressed` refuses anything it finds wrong.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

__all__ = ["RAW_ENCODINGS", "decode_compressed", "encode_jpeg", "image_defect", "raw_to_frame", "to_uint8"]

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
    """A compressed image (JPEG, PNG…) as a BGR or grey uint8 frame; None when it does not decode or
    :func:`image_defect` finds it cut short or damaged."""
    data = bytes(data)
    if not data or image_defect(data) is not None:
        return None
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_ANYCOLOR)


_JPEG_TRUNCATED = "truncated JPEG: it ends before its end-of-image marker (FFD9)"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_defect(data: bytes) -> str | None:
    """Why compressed image bytes are cut short or damaged, or None when their structure is whole.

    JPEG: every marker segment, and each scan's entropy-coded data, up to the end-of-image marker
    (bytes after it are allowed: some cameras append a trailer). PNG: every chunk's length and CRC,
    up to IEND. BMP and WebP: the file size the header states. Other formats are left to the decoder.

    Examples
    --------
    >>> jpeg = encode_jpeg(np.arange(64, dtype=np.uint8).reshape(8, 8))
    >>> image_defect(jpeg) is None
    True
    >>> image_defect(jpeg[: len(jpeg) * 4 // 10])
    'truncated JPEG: it ends before its end-of-image marker (FFD9)'
    """
    data = bytes(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_defect(data)
    if data[:8] == _PNG_SIGNATURE:
        return _png_defect(data)
    if data[:2] == b"BM" and len(data) >= 6:
        stated = int.from_bytes(data[2:6], "little")
        return (
            f"truncated BMP: {len(data)} bytes of the {stated} its header states"
            if stated > len(data)
            else None
        )
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        stated = int.from_bytes(data[4:8], "little") + 8
        return (
            f"truncated WebP: {len(data)} bytes of the {stated} its header states"
            if stated > len(data)
            else None
        )
    return None


def _jpeg_defect(data: bytes) -> str | None:
    """Walk a JPEG's marker segments from SOI to EOI (skipping each segment by its length, so an
    embedded thumbnail's EOI does not count)."""
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return f"corrupt JPEG: no marker where one must be (byte {i})"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if i + 4 > n:
            return _JPEG_TRUNCATED
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return f"corrupt JPEG: a marker segment of length {length} (byte {i})"
        i += 2 + length
        if marker == 0xDA and i <= n:  # start of scan: entropy-coded data up to the next marker
            i = _end_of_scan(data, i)
    return _JPEG_TRUNCATED


def _end_of_scan(data: bytes, i: int) -> int:
    """Where the entropy-coded data starting at ``i`` ends: the first 0xFF not followed by a stuffed
    0x00, a restart marker or another fill byte; ``len(data)`` when none is left."""
    n = len(data)
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= n:
            return n
        nxt = data[i + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
            i += 1 if nxt == 0xFF else 2
            continue
        return i


def _png_defect(data: bytes) -> str | None:
    """Walk a PNG's chunks, checking each CRC, up to IEND."""
    i, n = len(_PNG_SIGNATURE), len(data)
    while i + 8 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        end = i + 8 + length + 4
        if end > n:
            break
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[i + 4 : end - 4]) != crc:
            return f"corrupt PNG: the CRC of chunk {kind.decode('latin-1')!r} does not match (byte {i})"
        if kind == b"IEND":
            return None
        i = end
    return "truncated PNG: it ends before its IEND chunk"


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
