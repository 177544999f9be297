"""A cut or damaged image file is an error record naming the file, never a certified frame.

libjpeg decodes a JPEG cut to 40 % of its bytes with a warning and grey rows; before this check the
runtime certified those pictures with ``error: None``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from rrise.runtime import run_stream
from rrise.runtime.imagecodec import decode_compressed, image_defect
from rrise.runtime.sources import ImageFolderSource
from tests.runtime_fixtures import make_bundle, run_options, sample_frames


def photo(size: int = 160, seed: int = 0) -> np.ndarray:
    """A colour picture with smooth regions and edges, like a camera frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([(x * 255 / size), (y * 255 / size), ((x + y) % 64) * 4], -1).astype(np.float32)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(frame: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def png(frame: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", frame)
    assert ok
    return buf.tobytes()


def test_a_jpeg_cut_to_40_percent_is_named_truncated_though_opencv_reads_it(tmp_path):
    data = jpeg(photo())
    cut = data[: len(data) * 4 // 10]
    (tmp_path / "cut.jpg").write_bytes(cut)
    assert cv2.imread(str(tmp_path / "cut.jpg"), cv2.IMREAD_ANYCOLOR) is not None  # what fooled it
    assert image_defect(data) is None
    assert image_defect(cut) == "truncated JPEG: it ends before its end-of-image marker (FFD9)"
    assert decode_compressed(cut) is None
    assert decode_compressed(data).shape == (160, 160, 3)


def test_a_whole_jpeg_with_a_trailer_or_zero_padding_is_accepted():
    data = jpeg(photo())
    assert image_defect(data + b"\x00" * 64) is None
    assert image_defect(data + b"SEFH trailer a phone appended") is None


def test_a_thumbnails_end_marker_does_not_make_a_cut_jpeg_whole():
    thumb = jpeg(photo(16, seed=3))
    app1 = b"Exif\x00\x00" + thumb
    main = jpeg(photo())
    data = main[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + main[2:]
    assert image_defect(data) is None
    assert image_defect(data[: len(thumb) + 200 + (len(data) - len(thumb)) // 3]) is not None
    assert image_defect(data[:-2]) is not None  # only the final FFD9 missing


def test_a_cut_or_damaged_png_is_refused():
    data = png(photo())
    assert image_defect(data) is None
    assert image_defect(data[: len(data) * 4 // 10]) == "truncated PNG: it ends before its IEND chunk"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    assert "corrupt PNG: the CRC of chunk 'IDAT'" in image_defect(bytes(flipped))
    assert zlib.crc32(b"IEND") == int.from_bytes(data[-4:], "big")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("integrity") / "bundle")


def test_truncated_jpegs_in_a_folder_become_error_records_naming_the_file(bundle_dir, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    cut = set()
    for i, frame in enumerate(sample_frames(10, size=96)):
        data = jpeg(frame)
        if i % 2:
            data, _ = data[: len(data) * 4 // 10], cut.add(i)
        (folder / f"{i:03d}.jpg").write_bytes(data)
    got: list[dict] = []
    summary = run_stream(
        bundle_dir, ImageFolderSource(folder), run_options(status_interval=0), callback=got.append
    )
    assert summary["frames"] == 10 and summary["errors"] == len(cut)
    for r in got:
        if r["frame"] in cut:
            assert r["error"] and f"{r['frame']:03d}.jpg" in r["error"] and "truncated JPEG" in r["error"]
            assert r["pred"] is None and r["abstain"] and r["radius"] == 0.0
        else:
            assert r["error"] is None
