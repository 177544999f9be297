"""A work folder's images and their splits, from its :class:`~rrise.calibrate.specs.DataSpec`.

:func:`open_data` resolves the spec: a built-in dataset (:class:`BuiltinFolderData`: its train and
test splits, the folder's splits drawn from them by the seed) or the user's images
(:class:`UserFolderData`: DATA, and TRAIN_DATA's surrogate targets, joined into one dataset that
every split indexes into). Both answer the same questions: the dataset a split indexes into, the
splits, the fresh-target pool, and what the bundle records of the data.

Splits (fixed by the seed, disjoint by construction): ``base`` (the base model's training inputs),
``targets`` (the surrogate's Monte Carlo targets), ``selection`` (model and rule selection only;
its first ``n_rule`` are ``rules``), ``calibration`` and ``test``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rrise.datasets import Dataset, load_dataset
from rrise.export.bundler import default_preprocess

from .profiles import Profile
from .specs import BuiltinData, DataSpec, ImageData
from .user_data import DataSplits, ImageSet, ModelInputs, UserDataError, load_images, split_images

__all__ = [
    "BuiltinFolderData",
    "FolderData",
    "UserFolderData",
    "check_and_split",
    "combine",
    "load_sets",
    "open_data",
]


class FolderData(Protocol):
    """A work folder's images, as every stage reads them."""

    def dataset(self, split: str) -> Dataset:
        """The dataset that indices of data split ``split`` (``train`` or ``test``) point into."""
        ...

    def splits(self) -> dict[str, np.ndarray]:
        """Indices of each of the folder's splits into its dataset."""
        ...

    def first_inputs(self, split: str, n: int) -> np.ndarray:
        """``n`` sorted indices of ``split`` that sample it without regard to load order."""
        ...

    def fresh_pool(self) -> np.ndarray:
        """Indices into ``dataset("train")`` of every image fresh targets may be drawn from."""
        ...

    def bundle_data(self, recorded: str | None) -> tuple[dict[str, Any], str]:
        """``(manifest preprocess, calibration dataset name)`` for the bundle (``recorded``: the
        calibration's own dataset name, where it has one)."""
        ...


@dataclass
class BuiltinFolderData:
    """A built-in dataset: the folder's splits drawn from its train and test splits by the seed."""

    spec: BuiltinData
    prof: Profile
    seed: int
    _sets: dict[str, Dataset] = field(default_factory=dict)
    _splits: dict[str, np.ndarray] | None = None

    def dataset(self, split: str) -> Dataset:
        if split not in self._sets:
            self._sets[split] = load_dataset(self.spec.name, split, self.spec.data_dir)
        return self._sets[split]

    def splits(self) -> dict[str, np.ndarray]:
        if self._splits is None:
            self._splits = self._draw()
        return dict(self._splits)

    def _draw(self) -> dict[str, np.ndarray]:
        p = self.prof
        n_train = len(self.dataset("train"))
        need = p.base_train_size + p.n_selection + p.m
        if need > n_train:
            raise ValueError(
                f"profile {p.name!r} needs {need} training images, {self.spec.name} has {n_train}"
            )
        perm = np.random.default_rng(self.seed).permutation(n_train)
        base = np.sort(perm[: p.base_train_size])
        sel = np.sort(perm[p.base_train_size : p.base_train_size + p.n_selection])
        cal = np.sort(perm[n_train - p.m :])
        n_test = len(self.dataset("test"))
        test = np.sort(np.random.default_rng(self.seed + 1).permutation(n_test)[: p.n_test])
        return {
            "base": base,
            "targets": base[: p.n_targets],
            "selection": sel,
            "rules": sel[: p.n_rule],
            "calibration": cal,
            "test": test,
        }

    def first_inputs(self, split: str, n: int) -> np.ndarray:
        """The first ``n`` inputs of ``split`` (its indices are a seeded random draw, sorted)."""
        return self.splits()[split][:n]

    def fresh_pool(self) -> np.ndarray:
        """Every training image outside selection and calibration (the base model's training
        images and the held-out ones)."""
        sp = self.splits()
        taken = np.concatenate([sp["selection"], sp["calibration"]])
        return np.setdiff1d(np.arange(len(self.dataset("train"))), taken)

    def bundle_data(self, recorded: str | None) -> tuple[dict[str, Any], str]:
        return default_preprocess(self.dataset("train").shape), recorded or self.spec.name


@dataclass
class UserFolderData:
    """The user's images as the work folder's one dataset, and the splits indexing into it."""

    spec: ImageData
    images: ImageSet  # DATA
    split: DataSplits
    joined: Dataset  # DATA's images, then the TRAIN_DATA targets
    index: dict[str, np.ndarray]

    def dataset(self, split: str) -> Dataset:
        return self.joined  # one set of images; the splits index into it

    def splits(self) -> dict[str, np.ndarray]:
        return dict(self.index)

    def first_inputs(self, split: str, n: int) -> np.ndarray:
        """``n`` inputs of ``split`` (one of DATA's: selection, calibration, test), the first by the
        seeded hash order of the images, as sorted positions: every class in proportion."""
        return self.split.first_by_hash(split, n)

    def fresh_pool(self) -> np.ndarray:
        """The targets split, ``--train-data``'s targets and DATA's images no split uses (a split's
        hash share beyond its size): none of them is a selection, calibration or test input, so the
        surrogate may learn from every one (DATA's positions come first in the joined set)."""
        return np.union1d(self.index["targets"], self.split.spare)

    def bundle_data(self, recorded: str | None) -> tuple[dict[str, Any], str]:
        return dict(self.spec.preprocess), self.spec.name or "user"


def combine(spec: ImageData, sp: DataSplits, profile: Profile) -> UserFolderData:
    """The split images as one dataset (DATA's images, then the TRAIN_DATA targets) and its splits."""
    d = sp.data
    pixels, labels = d.pixels, d.labels
    targets = sp.index["targets"]
    if sp.train is not None and len(sp.train_index):
        t = sp.train.subset(sp.train_index)
        if t.pixels.dtype == pixels.dtype:
            pixels = np.concatenate([pixels, t.pixels])
        else:
            pixels = np.concatenate([np.asarray(d.images), np.asarray(t.images)])
        labels = np.concatenate([labels, t.labels])
        targets = np.concatenate([targets, len(d) + np.arange(len(t))])
    # ModelInputs: float32 in [0, 1] on access, the pixels kept as they are (uint8: 4× less memory)
    ds = Dataset(d.name, "data", ModelInputs(pixels), labels.astype(np.int64), list(d.classes))
    sel = sp.index["selection"]
    splits = {
        "base": targets,
        "targets": targets,
        "selection": sel,
        "rules": sp.first_by_hash("selection", profile.n_rule),  # every class, not the first ones
        "calibration": sp.index["calibration"],
        "test": sp.index["test"],
    }
    return UserFolderData(spec, d, sp, ds, splits)


def load_sets(spec: ImageData) -> tuple[ImageSet, ImageSet | None]:
    """DATA and TRAIN_DATA (None when not given) as ``spec`` says to load them."""
    shape = tuple(spec.input_shape)
    pre = dict(spec.preprocess)
    data = load_images(spec.data, pre, input_shape=shape, data_dir=spec.data_dir)
    train = None
    if spec.train_data:
        train = load_images(
            spec.train_data,
            pre,
            input_shape=shape,
            what="TRAIN_DATA",
            builtin_split="train",
            data_dir=spec.data_dir,
        )
    return data, train


def check_and_split(spec: ImageData, prof: Profile, seed: int, root: Path) -> UserFolderData:
    """Reload a `rrise build` folder's images and split them again; refused when DATA no longer
    holds the images the folder was made from."""
    data, train = load_sets(spec)
    if data.sha256 != spec.sha256:
        raise UserDataError(
            f"DATA {spec.data} changed since {root} was made from it (its images or labels differ): "
            f"use another --workdir, or rerun `rrise build` there with the images it was made from"
        )
    sp = split_images(data, prof, alpha=prof.alphas[0], seed=seed, train=train)
    return combine(spec, sp, prof)


def open_data(spec: DataSpec, prof: Profile, seed: int, root: Path) -> FolderData:
    """The folder's images for ``spec``: a built-in dataset or the user's images."""
    if isinstance(spec, ImageData):
        return check_and_split(spec, prof, seed, root)
    if isinstance(spec, BuiltinData):
        return BuiltinFolderData(spec, prof, seed)
    raise TypeError(f"no data for a {type(spec).__name__}")
