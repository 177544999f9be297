"""The user's images as a work folder's data: loaded as run.json records them, split, and joined
into the one dataset the stages index into."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rrise.datasets import Dataset

from .profiles import Profile
from .user_data import DataSplits, ImageSet, ModelInputs, UserDataError, load_images, split_images

__all__ = ["UserData", "combine", "load_sets", "load_user_data"]


@dataclass
class UserData:
    """The user's images as the work folder's one dataset, and the splits indexing into it."""

    data: ImageSet  # DATA
    split: DataSplits
    dataset: Dataset  # DATA's images, then the TRAIN_DATA targets
    splits: dict[str, np.ndarray]


def combine(sp: DataSplits, profile: Profile) -> UserData:
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
        "rules": sel[: profile.n_rule],
        "calibration": sp.index["calibration"],
        "test": sp.index["test"],
    }
    return UserData(d, sp, ds, splits)


def load_sets(u: dict[str, Any]) -> tuple[ImageSet, ImageSet | None]:
    """DATA and TRAIN_DATA (None when not given) as the run.json record ``u`` says to load them."""
    shape = tuple(u["input_shape"])
    data = load_images(u["data"], u["preprocess"], input_shape=shape, data_dir=u.get("data_dir"))
    train = None
    if u.get("train_data"):
        train = load_images(
            u["train_data"],
            u["preprocess"],
            input_shape=shape,
            what="TRAIN_DATA",
            builtin_split="train",
            data_dir=u.get("data_dir"),
        )
    return data, train


def load_user_data(u: dict[str, Any], prof: Profile, seed: int, root: Path) -> UserData:
    """Reload a `rrise build` folder's images (as ``u``, its run.json record, says) and split them
    again; refused when DATA no longer holds the images the folder was made from."""
    data, train = load_sets(u)
    if data.sha256 != u.get("data_sha256"):
        raise UserDataError(
            f"DATA {u['data']} changed since {root} was made from it (its images or labels differ): "
            f"use another --workdir, or rerun `rrise build` there with the images it was made from"
        )
    sp = split_images(data, prof, alpha=prof.alphas[0], seed=seed, train=train)
    return combine(sp, prof)
