"""Image datasets as float32 NCHW arrays in [0, 1], with numpy alone.

Fashion-MNIST and MNIST load from their standard ``*-ubyte.gz`` files; Fashion-MNIST is also found
where Debian's ``dataset-fashion-mnist`` puts it. scikit-learn's bundled ``digits`` (8×8) is the
always-available fallback. Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "Dataset", "DatasetNotFoundError", "load_dataset"]

DATASETS = ("fashion-mnist", "mnist", "digits")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HOW_TO_GET = {
    "fashion-mnist": (
        "install it with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, as root), or put "
        "train-/t10k-*-ubyte.gz from the Fashion-MNIST release in --data-dir; "
        "`--dataset digits` runs without any download"
    ),
    "mnist": (
        "put the MNIST train-/t10k-*-ubyte.gz files in --data-dir; "
        "`--dataset digits` runs without any download"
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class Dataset:
    """Images ``[N, C, H, W]`` float32 in [0, 1], integer labels ``[N]`` and class names."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.name, self.split, self.images[index], self.labels[index], self.classes)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data")
    return body.reshape(dims)


def _idx_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    candidates = []
    if data_dir is not None:
        candidates += [Path(data_dir), Path(data_dir) / name]
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_DIR)
    for c in candidates:
        if all((c / f).is_file() for f in IDX_FILES["train"] + IDX_FILES["test"]):
            return c
    where = ", ".join(str(c) for c in candidates) or "nowhere (no --data-dir given)"
    raise DatasetNotFoundError(f"{name} not found (looked in {where}): {HOW_TO_GET[name]}")


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load ``split`` ('train' or 'test') of ``name`` ('fashion-mnist', 'mnist' or 'digits')."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return _load_digits(split)
    if name not in ("fashion-mnist", "mnist"):
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    folder = _idx_dir(name, data_dir)
    img_file, lbl_file = IDX_FILES[split]
    images = _read_idx(folder / img_file).astype(np.float32)[:, None] / 255.0
    labels = _read_idx(folder / lbl_file).astype(np.int64)
    classes = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return Dataset(name, split, np.ascontiguousarray(images), labels, list(classes))


def _load_digits(split: str) -> Dataset:
    """sklearn's 1797 8×8 digits, split 1297 train / 500 test by a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetNotFoundError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None]
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    idx = order[:1297] if split == "train" else order[1297:]
    return Dataset(
        "digits", split, np.ascontiguousarray(images[idx]), labels[idx], [str(i) for i in range(10)]
    )
