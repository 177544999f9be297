"""The user's own images, as model inputs made exactly as the runtime makes them from camera frames.

Forms (``rrise build --data`` / ``--train-data``; :func:`load_images` in Python):

- a folder in the ImageFolder layout, ``root/<class>/<image>`` (nested folders inside a class are
  walked too): class index = position of the folder name in sorted order (torchvision's
  convention). Files are decoded with OpenCV as the runtime's image-folder source decodes them
  (``IMREAD_ANYCOLOR``: colour files as BGR, grey files as grey, always 8-bit).
- an ``.npz`` (read without unpickling): ``images`` as ``[N, H, W]`` uint8 (grey), ``[N, H, W, C]``
  uint8 with C = 1, 3 or 4 (channel order RGB/RGBA, the numpy/PIL convention, unless
  ``hwc_order="bgr"``), or ``[N, C, H, W]`` float in [0, 1] with C = 1 or 3 (RGB, the PyTorch
  convention); ``labels`` ``[N]`` integers; optional ``classes`` ``[K]`` strings.
- a built-in name (``fashion-mnist``, ``mnist``, ``digits``), optionally ``name:split``; the
  default split is ``test`` for ``--data`` (images the base model did not train on) and ``train``
  for ``--train-data``.

Every image becomes the frame a camera would give (BGR uint8 ``H×W×3``, or grey ``H×W``; RGB input
is reordered to BGR, float images whose values are all multiples of 1/255 become uint8) and goes
through the runtime's :class:`rrise.runtime.preprocess.Preprocessor` for the manifest
``preprocess`` dict: so a calibration input is bit for bit what the runtime feeds the model for
the same picture, and the conformal quantile applies to the numbers it was computed on. The
result keeps the pre-scaling pixels (uint8 for uint8 frames: 4× less memory than float32) and
converts to float32 in [0, 1] on access with the runtime's own :func:`to_model_input`.

Image identity is the SHA-256 of its model-input pixels: identical inputs (a file copied under two
names, or an image also in ``--train-data``) can never straddle two splits. :func:`split_images`
assigns each image to surrogate targets, selection, calibration or test by a seeded hash of that
identity (see its docstring for sizes and stability).

Bad data raises :class:`UserDataError` (a ``ValueError``) naming the file, folder or option: a
folder with fewer than two classes or an empty class, malformed arrays, out-of-range labels, too
few images for the chosen α. An image file that does not decode is *skipped and counted* by
default (``bad_images="skip"``; listed in :attr:`ImageSet.skipped`, and said in the notes): the
runtime gives such a frame an error record, never a certificate, so leaving it out of calibration
keeps calibration and deployment alike. ``bad_images="refuse"`` raises on the first one instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from rrise.calibration import min_calibration_size
from rrise.datasets import DATASETS, Dataset, DatasetNotFoundError, load_dataset
from rrise.fileio import load_npz, sha256_file
from rrise.runtime.preprocess import COLORS, FrameError, Preprocessor, to_model_input

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DataSplits",
    "ImageSet",
    "ModelInputs",
    "Reading",
    "SplitPlan",
    "UserDataError",
    "desired_sizes",
    "load_images",
    "minimum_sizes",
    "plan_sizes",
    "split_images",
]

# What the runtime's image-folder source reads (rrise.runtime.sources.IMAGE_EXTENSIONS).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")
SPLITS = ("targets", "selection", "calibration", "test")
BAD_IMAGES = ("skip", "refuse")
_NOTE_LIMIT = 5


class UserDataError(ValueError):
    """The user's images cannot be used; the message names the file, folder or option."""


# --------------------------------------------------------------------------------------------------
# Loaded images


class ModelInputs:
    """A read-only ``[N, C, H, W]`` float32 array-like over stored pixels, converted on access with
    the runtime's :func:`~rrise.runtime.preprocess.to_model_input` (``x[i]``, ``x[a:b]``,
    ``x[index_array]``, ``np.asarray(x)``, ``len(x)``, ``x.shape``)."""

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    def __getitem__(self, index) -> np.ndarray:
        return to_model_input(self.pixels[index])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass(eq=False)
class ImageSet:
    """Images as model inputs, with labels and where they came from.

    ``pixels``: ``[N, C, H, W]`` at the model's size and channel order before scaling (uint8, or
    float32 in [0, 1] for float sources); :attr:`images` is the float32 model input. ``labels``
    int64 ``[N]``; ``classes`` the K class names; ``digests`` ``[N, 32]`` uint8, the SHA-256 of
    each image's pixels (its identity); ``names`` a human name per image (relative path, or
    ``images[i]``); ``preprocess`` the manifest ``preprocess`` dict used; ``skipped`` ``(path,
    reason)`` of image files that did not decode; ``ignored`` non-image files found in the folder;
    ``source`` provenance (kind, path, file sha256 for an ``.npz``, count).
    """

    name: str
    kind: str
    pixels: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    digests: np.ndarray
    names: tuple[str, ...]
    preprocess: dict[str, Any]
    skipped: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> ModelInputs:
        return ModelInputs(self.pixels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.pixels.shape[1:])  # type: ignore[return-value]

    @property
    def sha256(self) -> str:
        """A digest of the whole set: its images' identities and labels, in order."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.digests).tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()

    def subset(self, index) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(
            name=self.name,
            kind=self.kind,
            pixels=self.pixels[index],
            labels=self.labels[index],
            classes=self.classes,
            digests=self.digests[index],
            names=tuple(self.names[i] for i in index),
            preprocess=self.preprocess,
            source=self.source,
        )

    def to_dataset(self, split: str = "data"):
        """As an :class:`rrise.datasets.Dataset` (float32 images materialized)."""
        return Dataset(self.name, split, np.asarray(self.images), self.labels.copy(), list(self.classes))

    def notes(self) -> list[str]:
        """What was skipped or ignored while loading, in words."""
        out = []
        if self.skipped:
            shown = "; ".join(f"{p} ({why})" for p, why in self.skipped[:_NOTE_LIMIT])
            more = f"; … {len(self.skipped) - _NOTE_LIMIT} more" if len(self.skipped) > _NOTE_LIMIT else ""
            out.append(
                f"{self.name}: skipped {len(self.skipped)} image file(s) that do not decode: {shown}{more}"
            )
        if self.ignored:
            out.append(
                f"{self.name}: ignored {len(self.ignored)} file(s) that are not images in a class folder "
                f"(e.g. {self.ignored[0]})"
            )
        return out


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True, kw_only=True)
class Reading:
    """How :func:`load_images` reads DATA: ``what`` names the option in messages (``DATA``,
    ``TRAIN_DATA``); ``builtin_split``: the split of a built-in dataset named without ``:split``;
    ``data_dir``: where a built-in dataset's files are; ``hwc_order``: channel order of
    ``[N, H, W, 3|4]`` uint8 arrays in an ``.npz`` (``rgb``, the numpy/PIL convention, or ``bgr``);
    ``bad_images``: ``skip`` (default) or ``refuse`` an image file that does not decode;
    ``workers``: decoding threads (default: up to 8)."""

    what: str = "DATA"
    builtin_split: str = "test"
    data_dir: str | os.PathLike | None = None
    hwc_order: str = "rgb"
    bad_images: str = "skip"
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.bad_images not in BAD_IMAGES:
            raise UserDataError(f"bad_images must be one of {BAD_IMAGES}, got {self.bad_images!r}")
        if self.hwc_order not in ("rgb", "bgr"):
            raise UserDataError(f"hwc_order must be 'rgb' or 'bgr', got {self.hwc_order!r}")


def load_images(
    data: str | os.PathLike,
    preprocess: Mapping[str, Any],
    *,
    input_shape: Sequence[int | None] | None = None,
    reading: Reading | None = None,
    **given: Any,
) -> ImageSet:
    """The images of ``data`` (folder, ``.npz`` or built-in name) as model inputs.

    ``preprocess``: the manifest ``preprocess`` dict (e.g. from
    :func:`rrise.runtime.preprocess.preprocess_spec`), the one the bundle will carry;
    ``input_shape``: the model's ``(C, H, W)`` (default: from ``preprocess``). ``reading``
    (:class:`Reading`), or its fields as keywords (``what``, ``builtin_split``, ``data_dir``,
    ``hwc_order``, ``bad_images``, ``workers``): how. Raises :class:`UserDataError`.
    """
    r = Reading(**given) if reading is None else replace(reading, **given)
    what, workers = r.what, r.workers
    if input_shape is None:
        color = str(preprocess.get("color", "gray"))
        input_shape = [COLORS.get(color), *(preprocess.get("resize") or [None, None])]
    try:
        pre = Preprocessor(preprocess, list(input_shape))
    except ValueError as exc:
        raise UserDataError(f"preprocess {dict(preprocess)}: {exc}") from None
    text = os.fspath(data)
    path = Path(text)
    if path.is_dir():
        return _load_folder(path, pre, what, r.bad_images, workers)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise UserDataError(
                f"{what} {text} is a file but not an .npz; give an ImageFolder (root/<class>/<image>), "
                f"an .npz or a built-in dataset name"
            )
        return _load_npz(path, pre, what, r.hwc_order, workers)
    name, _, split = text.partition(":")
    if name in DATASETS:
        return _load_builtin(name, split or r.builtin_split, pre, what, r.data_dir, workers)
    raise UserDataError(
        f"{what} {text} is neither a folder, an .npz file nor a built-in dataset ({', '.join(DATASETS)})"
    )


def _pixels_of(pre, frames, workers: int | None) -> list:
    """``pre.pixels`` of each frame (in threads: OpenCV releases the GIL); a FrameError is returned
    in place of the pixels."""

    def one(frame):
        try:
            return pre.pixels(frame)
        except FrameError as exc:
            return exc

    if len(frames) < 256:
        return [one(f) for f in frames]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, frames, chunksize=64))


def _digests(pixels: np.ndarray) -> np.ndarray:
    out = np.empty((len(pixels), 32), dtype=np.uint8)
    for i, p in enumerate(pixels):
        h = hashlib.sha256(f"{p.dtype.str}{p.shape}".encode())
        h.update(np.ascontiguousarray(p).tobytes())
        out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return out


@dataclass
class _Found:
    """What a loader found: the images' model-input pixels with their labels and names, the classes,
    the files it skipped (undecodable) or ignored, and where they came from."""

    name: str
    kind: str
    pixels: list[np.ndarray]
    labels: np.ndarray
    classes: Sequence[str]
    names: Sequence[str]
    skipped: Sequence = ()
    ignored: Sequence = ()
    source: dict[str, Any] | None = None


def _finish(found: _Found, pre, what: str) -> ImageSet:
    """The found images as an :class:`ImageSet`; refused when none is usable, there are fewer than
    two classes, or a class has no image."""
    name, kind, pixels, classes = found.name, found.kind, found.pixels, found.classes
    if not pixels:
        raise UserDataError(f"{what} {name} holds no usable images")
    stack = np.stack(pixels)
    labels = np.asarray(found.labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    empty = [c for c, k in zip(classes, counts) if k == 0]
    if len(classes) < 2:
        raise UserDataError(
            f"{what} {name} has {len(classes)} class ({', '.join(classes)}); a classifier needs >= 2"
        )
    if empty:
        raise UserDataError(
            f"{what} {name}: class {empty[0]!r} has no usable images ({len(empty)} empty class(es)); every "
            f"class the model outputs needs images"
        )
    return ImageSet(
        name=name,
        kind=kind,
        pixels=stack,
        labels=labels,
        classes=tuple(str(c) for c in classes),
        digests=_digests(stack),
        names=tuple(found.names),
        preprocess=pre.spec,
        skipped=tuple(found.skipped),
        ignored=tuple(found.ignored),
        source={**(found.source or {}), "kind": kind, "path": name, "count": len(labels)},
    )


def _load_folder(root: Path, pre, what: str, bad_images: str, workers: int | None) -> ImageSet:
    classes = _class_folders(root, what)
    files: list[tuple[Path, int]] = []
    ignored: list[str] = []
    for index, cls in enumerate(classes):
        found = _images_under(root, cls, ignored)
        if not found:
            raise UserDataError(
                f"{what} folder {root}: class folder {cls!r} has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        files += [(p, index) for p in found]

    def decode(item):
        return _decode_image(item[0], pre)

    if len(files) < 64:
        results = [decode(f) for f in files]
    else:
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(decode, files, chunksize=16))
    pixels, labels, names, skipped = [], [], [], []
    for (p, label), res in zip(files, results, strict=True):
        rel = p.relative_to(root).as_posix()
        if isinstance(res, str):
            if bad_images == "refuse":
                raise UserDataError(f"{what}: image {p} does not decode ({res})")
            skipped.append((rel, res))
            continue
        pixels.append(res)
        labels.append(label)
        names.append(rel)
    found = _Found(str(root), "folder", pixels, np.asarray(labels), classes, names, skipped, ignored)
    return _finish(found, pre, what)


def _class_folders(root: Path, what: str) -> list[str]:
    """The ImageFolder's class folder names, sorted (class index = position); at least two."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) >= 2:
        return classes
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    hint = f"; {len(loose)} image(s) lie directly in it: put each class's images in its own subfolder"
    found = f" ({', '.join(classes)})" if classes else ""
    raise UserDataError(
        f"{what} folder {root} has {len(classes)} class folder(s){found}; the ImageFolder layout "
        f"root/<class>/<image> needs at least 2 classes{hint if loose else ''}"
    )


def _images_under(root: Path, cls: str, ignored: list[str]) -> list[Path]:
    """Image files under ``root/cls`` in sorted order (hidden files skipped; others added to ``ignored``)."""
    found = []
    base = (root / cls).resolve()
    seen: set[tuple[int, int]] = set()  # folders already walked: a linked folder is read once
    for folder, dirs, names in os.walk(root / cls, followlinks=True):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        # A linked folder is followed only inside its class folder: a link to `..` or to another
        # class would loop or give that class's images this class's label.
        inside = [d for d in dirs if (Path(folder) / d).resolve().is_relative_to(base)]
        ignored += [str((Path(folder) / d).relative_to(root)) for d in dirs if d not in inside]
        dirs[:] = sorted(d for d in inside if not d.startswith("."))
        for fname in sorted(names):
            p = Path(folder) / fname
            if fname.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(p)
            else:
                ignored.append(str(p.relative_to(root)))
    return found


def _decode_image(path: Path, pre) -> np.ndarray | str:
    """The model input of one image file, or why it could not be had (a string)."""
    import cv2

    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    frame = cv2.imdecode(buf, cv2.IMREAD_ANYCOLOR) if buf.size else None
    if frame is None:
        return "OpenCV cannot decode it"
    try:
        return pre.pixels(frame)
    except ValueError as exc:  # FrameError
        return str(exc)


def _is_255ths(x: np.ndarray) -> bool:
    """Whether float values are all exactly k/255 for integers k in [0, 255], as float32 computes them."""
    q = np.rint(x.astype(np.float64) * 255.0)
    if not np.all((q >= 0) & (q <= 255)):
        return False
    return bool(
        np.array_equal(q.astype(np.uint8).astype(np.float32) / np.float32(255.0), x.astype(np.float32))
    )


def _frames_from_array(images: np.ndarray, what: str, hwc_order: str) -> tuple[list[np.ndarray], str]:
    """Camera-like frames from an image array (see the module docstring), and the form's description."""
    forms = "[N, H, W] uint8, [N, H, W, C] uint8 (C = 1, 3 or 4) or [N, C, H, W] float in [0, 1] (C = 1 or 3)"
    a = images
    if a.dtype == np.uint8 and a.ndim == 3:
        return list(a), "[N, H, W] uint8 grey"
    if a.dtype == np.uint8 and a.ndim == 4 and a.shape[3] in (1, 3, 4):
        if a.shape[3] == 1 or hwc_order == "bgr":
            return list(a), f"[N, H, W, {a.shape[3]}] uint8" + (" BGR" if a.shape[3] > 1 else "")
        order = [2, 1, 0] if a.shape[3] == 3 else [2, 1, 0, 3]
        return [np.ascontiguousarray(f[:, :, order]) for f in a], f"[N, H, W, {a.shape[3]}] uint8 RGB"
    if a.dtype.kind == "f" and a.ndim == 4 and a.shape[1] in (1, 3):
        flat = a.reshape(len(a), -1)
        bad = np.flatnonzero(~np.isfinite(flat).all(axis=1) | (flat < 0).any(axis=1) | (flat > 1).any(axis=1))
        if bad.size:
            raise UserDataError(f"{what}: images[{int(bad[0])}] has values outside [0, 1] (or NaN/inf)")
        # quantized images (k/255) become the uint8 frames a camera would give
        a = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8) if _is_255ths(a) else a.astype(np.float32)
        hwc = a.transpose(0, 2, 3, 1)
        if a.shape[1] == 1:
            return [np.ascontiguousarray(f[:, :, 0]) for f in hwc], "[N, 1, H, W] float grey"
        return [np.ascontiguousarray(f[:, :, ::-1]) for f in hwc], "[N, 3, H, W] float RGB"
    raise UserDataError(f"{what}: images has shape {list(a.shape)} and dtype {a.dtype}; expected {forms}")


def _labels_and_classes(labels, classes, n: int, what: str) -> tuple[np.ndarray, list[str]]:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise UserDataError(f"{what}: labels has shape {list(labels.shape)}; expected [{n}], one per image")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.rint(labels)):
            raise UserDataError(f"{what}: labels must be integers, got non-integral floats")
    elif labels.dtype.kind not in "iub":
        raise UserDataError(f"{what}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if n and labels.min() < 0:
        raise UserDataError(f"{what}: labels[{int(np.argmin(labels))}] = {int(labels.min())} is negative")
    if classes is None:
        names = [str(i) for i in range(int(labels.max()) + 1 if n else 0)]
    else:
        classes = np.asarray(classes)
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise UserDataError(
                f"{what}: classes must be a 1-D array of strings, got {classes.dtype} {classes.shape}"
            )
        names = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
        if len(set(names)) != len(names):
            raise UserDataError(f"{what}: classes has duplicate names")
        if n and labels.max() >= len(names):
            i = int(np.argmax(labels))
            raise UserDataError(
                f"{what}: labels[{i}] = {int(labels[i])} but classes has only {len(names)} names"
            )
    return labels, names


def _load_npz(path: Path, pre, what: str, hwc_order: str, workers: int | None) -> ImageSet:
    try:
        arrays = load_npz(path, keys=("images", "labels"), what=what)
    except ValueError as exc:
        raise UserDataError(str(exc)) from None
    images = arrays["images"]
    frames, form = _frames_from_array(images, f"{what} {path}", hwc_order)
    labels, classes = _labels_and_classes(
        arrays["labels"], arrays.get("classes"), len(images), f"{what} {path}"
    )
    results = _pixels_of(pre, frames, workers)
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            raise UserDataError(f"{what} {path}: images[{i}]: {r}")
    names = [f"images[{i}]" for i in range(len(images))]
    source = {"sha256": sha256_file(path), "form": form}
    return _finish(_Found(str(path), "npz", results, labels, classes, names, source=source), pre, what)


def _load_builtin(name: str, split: str, pre, what: str, data_dir, workers: int | None) -> ImageSet:
    try:
        ds = load_dataset(name, split, data_dir)
    except DatasetNotFoundError as exc:
        raise UserDataError(f"{what} {name}: {exc}") from None
    except ValueError as exc:
        raise UserDataError(f"{what} {name}:{split}: {exc}") from None
    frames, _ = _frames_from_array(ds.images, f"{what} {name}", "rgb")
    results = _pixels_of(pre, frames, workers)
    names = [f"{name}:{split}[{i}]" for i in range(len(ds))]
    found = _Found(f"{name}:{split}", "builtin", results, ds.labels, ds.classes, names)
    return _finish(found, pre, what)


# --------------------------------------------------------------------------------------------------
# Splits


def desired_sizes(profile) -> dict[str, int]:
    """The split sizes a profile asks for: ``targets`` (``n_targets``), ``selection``
    (``n_selection``), ``calibration`` (``m``) and ``test`` (``n_test``). A mapping passes through."""
    if isinstance(profile, Mapping):
        sizes = {s: int(profile.get(s, 0)) for s in SPLITS}
    else:
        sizes = {
            "targets": int(profile.n_targets),
            "selection": int(profile.n_selection),
            "calibration": int(profile.m),
            "test": int(profile.n_test),
        }
    if any(v < 0 for v in sizes.values()):
        raise UserDataError(f"split sizes must be >= 0, got {sizes}")
    return sizes


def minimum_sizes(alpha: float, num_classes: int) -> dict[str, int]:
    """The fewest images per split that give a working build at calibration level ``alpha``:
    calibration ≥ :func:`rrise.calibration.min_calibration_size` (α) (the conformal rank
    ⌈(m+1)(1−α)⌉ must be ≤ m), surrogate targets ≥ 10 per class, selection and test ≥ max(20, 2K)."""
    k = int(num_classes)
    return {
        "targets": 10 * k,
        "selection": max(20, 2 * k),
        "calibration": int(min_calibration_size(float(alpha))),
        "test": max(20, 2 * k),
    }


@dataclass(frozen=True)
class SplitPlan:
    """Sizes per split. ``regime``: ``profile`` (the data holds at least what the profile asks: each
    image's split depends only on its identity and the seed, so adding images never moves one) or
    ``scaled`` (scarcer data: sizes scaled down to what it holds, every split at least its
    minimum; adding images may then move some near the split boundaries)."""

    desired: dict[str, int]
    minimum: dict[str, int]
    sizes: dict[str, int]
    regime: str
    alpha: float
    available: int
    extra_targets: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "desired": dict(self.desired),
            "minimum": dict(self.minimum),
            "sizes": dict(self.sizes),
            "regime": self.regime,
            "alpha": self.alpha,
            "available": self.available,
            "extra_targets": self.extra_targets,
        }


def plan_sizes(
    available: int,
    desired: Mapping[str, int],
    minimum: Mapping[str, int],
    *,
    alpha: float,
    extra_targets: int = 0,
    what: str = "DATA",
) -> SplitPlan:
    """How many of ``available`` images each split gets (``extra_targets``: images from
    ``--train-data``, which count toward the targets' size and minimum). Raises
    :class:`UserDataError` naming the smallest number of images that works."""
    extra = int(extra_targets)
    mins = dict(minimum)
    want = {s: max(int(desired[s]), mins[s]) for s in SPLITS}  # a profile below a minimum is raised
    mins["targets"] = max(0, mins["targets"] - extra)
    want["targets"] = max(0, want["targets"] - extra)
    need = sum(mins.values())
    if available < need:
        parts = ", ".join(f"{s} ≥ {mins[s]}" for s in SPLITS)
        via = f" (besides {extra} targets from TRAIN_DATA)" if extra else ""
        raise UserDataError(
            f"{what} holds {available} usable image(s); the smallest number that works for α = {alpha:g} is "
            f"{need}{via}: {parts} (calibration needs m with ⌈(m+1)(1−α)⌉ ≤ m)"
        )
    if available >= sum(want.values()):
        return SplitPlan(dict(desired), dict(minimum), want, "profile", float(alpha), available, extra)
    rest = available - need
    room = {s: want[s] - mins[s] for s in SPLITS}
    total_room = sum(room.values())
    shares = {s: rest * room[s] / total_room if total_room else 0.0 for s in SPLITS}
    sizes = {s: mins[s] + int(np.floor(shares[s])) for s in SPLITS}
    left = available - sum(sizes.values())
    for s in sorted(SPLITS, key=lambda s: (-(shares[s] - np.floor(shares[s])), SPLITS.index(s)))[:left]:
        sizes[s] += 1
    return SplitPlan(dict(desired), dict(minimum), sizes, "scaled", float(alpha), available, extra)


def _hash_keys(digests: np.ndarray, seed: int) -> np.ndarray:
    """A uniform 64-bit key per identity, from a seeded BLAKE2b (``seed`` changes every key)."""
    salt = int(seed).to_bytes(16, "little", signed=True)[:16]
    out = np.empty(len(digests), dtype=np.uint64)
    for i, d in enumerate(digests):
        out[i] = int.from_bytes(hashlib.blake2b(d.tobytes(), digest_size=8, salt=salt).digest(), "little")
    return out


@dataclass(eq=False)
class DataSplits:
    """``data`` split into targets, selection, calibration and test (``index``: positions in
    ``data``, sorted), plus ``train_index`` into ``train`` (``--train-data`` images: targets only)."""

    data: ImageSet
    train: ImageSet | None
    index: dict[str, np.ndarray]
    train_index: np.ndarray
    plan: SplitPlan
    seed: int
    notes: list[str]
    # images of DATA no split uses, by the hash split they fell in (``profile`` regime: a split's
    # hash bucket beyond its size) or ``none`` (beyond the scaled sizes, or left out: duplicates,
    # images also in TRAIN_DATA)
    unused: dict[str, int] = field(default_factory=dict)
    # positions in ``data`` of the images no split uses and that may still teach the surrogate: in the
    # pool (not duplicates, not TRAIN_DATA images), outside selection, calibration and test
    spare: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def subset(self, split: str) -> ImageSet:
        """The images of ``split``; ``targets`` includes the ``--train-data`` targets (after DATA's)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        part = self.data.subset(self.index[split])
        if split != "targets" or self.train is None or not len(self.train_index):
            return part
        extra = self.train.subset(self.train_index)
        return ImageSet(
            name=f"{self.data.name} + {self.train.name}",
            kind="mixed",
            pixels=np.concatenate([part.pixels, extra.pixels.astype(part.pixels.dtype, copy=False)])
            if part.pixels.dtype == extra.pixels.dtype
            else np.concatenate([np.asarray(part.images), np.asarray(extra.images)]),
            labels=np.concatenate([part.labels, extra.labels]),
            classes=part.classes,
            digests=np.concatenate([part.digests, extra.digests]),
            names=part.names + extra.names,
            preprocess=part.preprocess,
        )

    def first_by_hash(self, split: str, n: int) -> np.ndarray:
        """The ``n`` images of ``split`` of smallest seeded hash key (the key the split was drawn
        by), as sorted positions in ``data``: a subset that samples every class in proportion, where
        the first ``n`` positions would be the first classes of a folder loaded class by class."""
        index = self.index[split]
        keys = _hash_keys(self.data.digests[index], self.seed)
        return np.sort(index[np.argsort(keys, kind="stable")[: max(int(n), 0)]])

    def sizes(self) -> dict[str, int]:
        out = {s: len(self.index[s]) for s in SPLITS}
        out["targets"] += len(self.train_index)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: plan, seed, sizes and a digest of each split's identities."""
        digests = {}
        for s in SPLITS:
            h = hashlib.sha256(np.ascontiguousarray(self.data.digests[self.index[s]]).tobytes())
            if s == "targets" and self.train is not None:
                h.update(np.ascontiguousarray(self.train.digests[self.train_index]).tobytes())
            digests[s] = h.hexdigest()
        return {
            "seed": self.seed,
            "plan": self.plan.to_dict(),
            "sizes": self.sizes(),
            "split_sha256": digests,
            "data": self.data.source,
            "data_sha256": self.data.sha256,
            "train": None if self.train is None else self.train.source,
            "images": len(self.data),
            "used": self.used(),
            "unused": dict(self.unused),
            "notes": list(self.notes),
        }

    def used(self) -> int:
        """How many of DATA's images some split uses."""
        return sum(len(self.index[s]) for s in SPLITS)

    def unused_text(self) -> str:
        """``N of M images used`` and, when some are not, how many each split left unused."""
        text = f"{self.used():,} of {len(self.data):,} images of {self.data.name} used"
        if not self.unused:
            return text
        parts = ", ".join(f"{s} {n:,}" for s, n in self.unused.items() if n)
        return (
            f"{text}; unused: {parts} (a split's hash share beyond the size it needs; none: beyond "
            "every split's size, or left out as a duplicate or a TRAIN_DATA image)"
        )

    def summary(self) -> str:
        sizes = self.sizes()
        text = ", ".join(f"{s} {sizes[s]}" for s in SPLITS)
        return f"{self.data.name}: {text} ({self.plan.regime} sizes, seed {self.seed}); {self.unused_text()}"


def split_images(
    data: ImageSet,
    profile,
    *,
    alpha: float,
    seed: int = 0,
    train: ImageSet | None = None,
    minimum: Mapping[str, int] | None = None,
) -> DataSplits:
    """Split ``data`` into surrogate targets, selection, calibration and test.

    ``profile``: a :class:`~rrise.calibrate.profiles.Profile` or a mapping of desired sizes (see
    :func:`desired_sizes`); ``alpha``: the calibration level the build must reach (sets the
    calibration minimum, :func:`minimum_sizes`); ``train``: ``--train-data`` images, used only as
    targets (at most the targets' desired size, by hash order); DATA images identical to a TRAIN
    image are left out of every split (the base model trained on them).

    Each image gets a key ``BLAKE2b(identity, salt=seed)``. When the data holds at least the desired
    sizes (regime ``profile``), the key's position in [0, 1) picks the split with fractions fixed by
    the desired sizes, and each split uses its images of smallest key, up to its size: an image's
    split never changes as images are added (only whether it is used). With less data (regime
    ``scaled``), sizes are scaled down (every split at least its minimum, else
    :class:`UserDataError` names the smallest number of images that works) and the splits are
    consecutive runs of images in key order.
    """
    notes: list[str] = list(data.notes())
    if train is not None:
        notes += train.notes()
        _check_train_matches(train, data)
    desired = desired_sizes(profile)
    mins = dict(minimum) if minimum is not None else minimum_sizes(alpha, data.num_classes)
    pool = _unique_pool(data, train, notes)
    keys = _hash_keys(data.digests[pool], seed)
    train_index = np.zeros(0, dtype=np.int64)
    if train is not None:
        train_index = _train_targets(train, seed, max(desired["targets"], mins["targets"]))
    extra = len(train_index)
    plan = plan_sizes(len(pool), desired, mins, alpha=alpha, extra_targets=extra, what=f"DATA {data.name}")
    if plan.regime == "profile":
        plan, index = _split_by_fraction(pool, keys, plan, mins, extra, notes)
    else:
        index = _ranked_split(pool, keys, plan.sizes)
        notes.append(
            f"{data.name} holds fewer images ({len(pool)}) than the profile asks "
            f"({sum(plan.desired.values())}): sizes scaled to "
            + ", ".join(f"{s} {plan.sizes[s]}" for s in SPLITS)
        )
    unused = _unused(len(data), pool, keys, plan, index)
    spare = np.setdiff1d(pool, np.concatenate([index[s] for s in SPLITS]))
    return DataSplits(data, train, index, train_index, plan, int(seed), notes, unused, spare)


def _unused(n: int, pool: np.ndarray, keys: np.ndarray, plan: SplitPlan, index) -> dict[str, int]:
    """DATA's images no split uses, counted by the split whose hash bucket they fell in (the
    ``profile`` regime) or as ``none``; only the nonzero counts."""
    used = np.zeros(n, dtype=bool)
    for s in SPLITS:
        used[index[s]] = True
    in_pool = np.zeros(n, dtype=bool)
    in_pool[pool] = True
    out = dict.fromkeys(SPLITS, 0)
    out["none"] = int((~in_pool).sum())
    spare = ~used[pool]
    if plan.regime == "profile":
        bucket = _buckets(keys[spare], plan.sizes)
        for b, s in enumerate(SPLITS):
            out[s] = int((bucket == b).sum())
    else:
        out["none"] += int(spare.sum())
    return {k: v for k, v in out.items() if v}


def _buckets(keys: np.ndarray, sizes: Mapping[str, int]) -> np.ndarray:
    """The split (its position in SPLITS) each key's hash bucket belongs to: fractions by ``sizes``."""
    total = sum(sizes.values())
    bounds = np.cumsum([sizes[s] for s in SPLITS]) / max(total, 1)
    return np.searchsorted(bounds, keys.astype(np.float64) / 2.0**64, side="right")


def _check_train_matches(train: ImageSet, data: ImageSet) -> None:
    if train.classes != data.classes:
        raise UserDataError(
            f"TRAIN_DATA {train.name} has classes ({', '.join(train.classes[:8])}) other than DATA "
            f"{data.name} ({', '.join(data.classes[:8])})"
        )
    if train.input_shape != data.input_shape:
        raise UserDataError("TRAIN_DATA and DATA were preprocessed to different shapes")


def _unique_pool(data: ImageSet, train: ImageSet | None, notes: list[str]) -> np.ndarray:
    """Positions of ``data`` to split: one per identity, none that is also a TRAIN image."""
    keep = np.ones(len(data), dtype=bool)
    if train is not None:
        train_ids = {d.tobytes() for d in train.digests}
        in_train = np.array([d.tobytes() in train_ids for d in data.digests], dtype=bool)
        if in_train.any():
            notes.append(
                f"{int(in_train.sum())} image(s) of {data.name} are also in {train.name} (the base model "
                f"trained on them): left out of every DATA split"
            )
        keep &= ~in_train
    seen: set[bytes] = set()
    dups = 0
    for i in np.flatnonzero(keep):
        key = data.digests[i].tobytes()
        if key in seen:
            keep[i] = False
            dups += 1
        else:
            seen.add(key)
    if dups:
        notes.append(f"{dups} image(s) of {data.name} duplicate another one's pixels: each used once")
    return np.flatnonzero(keep)


def _train_targets(train: ImageSet, seed: int, want: int) -> np.ndarray:
    """Up to ``want`` distinct TRAIN images (smallest hash keys first), as sorted positions."""
    uniq: dict[bytes, int] = {}
    for i, d in enumerate(train.digests):
        uniq.setdefault(d.tobytes(), i)
    tpool = np.fromiter(uniq.values(), dtype=np.int64)
    tkeys = _hash_keys(train.digests[tpool], seed)
    return np.sort(tpool[np.argsort(tkeys, kind="stable")][:want])


def _split_by_fraction(pool, keys, plan: SplitPlan, mins, extra: int, notes: list[str]):
    """The ``profile`` regime: fixed hash fractions (stable as images are added); exact sizes instead
    when a hash bucket came out below its minimum by chance."""
    index = _fixed_fraction_split(pool, keys, plan.sizes)
    short = [s for s in SPLITS if len(index[s]) < max(0, mins[s] - (extra if s == "targets" else 0))]
    if short:
        plan = SplitPlan(plan.desired, plan.minimum, plan.sizes, "scaled", plan.alpha, plan.available, extra)
        return plan, _ranked_split(pool, keys, plan.sizes)
    lacking = [s for s in SPLITS if len(index[s]) < plan.sizes[s]]
    if lacking:
        notes.append(
            "by the hash, "
            + ", ".join(f"{s} got {len(index[s])} of {plan.sizes[s]}" for s in lacking)
            + " (fractions are fixed so that adding images never moves one)"
        )
    return plan, index


def _fixed_fraction_split(
    pool: np.ndarray, keys: np.ndarray, sizes: Mapping[str, int]
) -> dict[str, np.ndarray]:
    bucket = _buckets(keys, sizes)
    out = {}
    for b, s in enumerate(SPLITS):
        members = np.flatnonzero(bucket == b)
        members = members[np.argsort(keys[members], kind="stable")][: sizes[s]]
        out[s] = np.sort(pool[members])
    return out


def _ranked_split(pool: np.ndarray, keys: np.ndarray, sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    order = pool[np.argsort(keys, kind="stable")]
    out, start = {}, 0
    for s in SPLITS:
        out[s] = np.sort(order[start : start + sizes[s]])
        start += sizes[s]
    return out
