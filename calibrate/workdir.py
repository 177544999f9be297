"""The work folder: what it was made with (``run.json``), its data splits, seeds and file paths.

Data splits (fixed by the seed, disjoint by construction): the base model trains on ``base``; the
surrogate's Monte Carlo targets come from the first ``n_targets`` of ``base``; ``selection`` (model
and rule selection only) and ``calibration`` are held out of both; the test inputs come from the
test split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rrise.datasets import Dataset, load_dataset
from rrise.fileio import atomic_write_json, read_json

from .folder_data import load_user_data
from .profiles import Profile, get_profile

__all__ = ["SEED_STREAMS", "RunConfig", "Workdir", "model_spec", "recorded_config"]

# One seed per random stream of a work folder: 1000 × seed + stream.
SEED_STREAMS = {
    "targets": 1,
    "selection": 2,
    "calibration": 3,
    "cohen": 4,
    "rules": 5,
    "reference": 6,
    "cap": 7,
    "rules-cap": 8,
}
_CONFIG_KEYS = ("dataset", "profile", "sigma", "seed")


@dataclass(frozen=True)
class RunConfig:
    """What a work folder was made with; a resumed stage refuses a folder made otherwise."""

    dataset: str = "fashion-mnist"
    profile: str = "quick"
    sigma: float = 0.25
    seed: int = 0
    data_dir: str | None = None
    # A work folder made by `rrise build` (dataset "user"): where its model and images come from
    # (see :mod:`rrise.calibrate.building`); None for the built-in datasets.
    user: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Every value checked before anything is written: a bad one raises ValueError naming it."""
        sigma = self.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a finite number > 0 ([0,1]-pixel units), got {sigma!r}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0 ([0,1]-pixel units), got {sigma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a name, got {self.dataset!r}")
        self.prof  # noqa: B018 - an unknown profile raises here, naming it

    @property
    def prof(self) -> Profile:
        return get_profile(self.profile, self.dataset)


def recorded_config(root: str | os.PathLike) -> dict[str, Any]:
    """The configuration ``root/run.json`` records (``{}`` for a new folder); ValueError naming the
    file when it is not what this version writes (a truncated or hand-edited file)."""
    meta = Path(root) / "run.json"
    try:
        data = read_json(meta)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(
            f"{meta} cannot be read ({exc}); it records what the folder was made with: "
            "restore it, or use another --workdir"
        ) from None
    if data is None:
        return {}
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"{meta} has no 'config' object; restore it, or use another --workdir")
    return config


@dataclass
class Workdir:
    root: Path
    config: RunConfig
    show_progress: bool = True
    log: Callable[[str], None] = print
    _data: dict[str, Dataset] = field(default_factory=dict)
    _user: Any = None  # the loaded user data/splits of a `rrise build` folder (folder_data.UserData)
    user_model: Any = None  # the loaded UserModel of a `rrise build` folder, when someone loaded it

    @classmethod
    def open(cls, root: str | os.PathLike, config: RunConfig, **kw: Any) -> Workdir:
        """Create or reopen ``root``; refuse to mix a folder's outputs with another configuration."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"work folder {root} is a file; give a folder")
        meta = root / "run.json"
        wanted = {k: getattr(config, k) for k in _CONFIG_KEYS}
        if config.user is not None:
            wanted["user"] = config.user
        have = recorded_config(root) or None  # RunConfig validated every value before this
        if have is None:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, {"config": wanted, "stage_seconds": {}})
        else:
            diff = [
                f"{k}: folder has {have.get(k)!r}, asked for {v!r}"
                for k, v in wanted.items()
                if have.get(k) != v
            ]
            if diff:
                raise ValueError(
                    f"{root} was made with another configuration ({'; '.join(diff)}); use another --workdir"
                )
        return cls(root=root, config=config, **kw)

    # --- paths ----------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def prof(self) -> Profile:
        return self.config.prof

    # --- data -----------------------------------------------------------------------------
    @property
    def is_user(self) -> bool:
        """Whether this folder was made by `rrise build` (the user's model and images)."""
        return self.config.user is not None

    def user_data(self):
        """The user's images and their splits (:class:`rrise.calibrate.folder_data.UserData`)."""
        if self._user is None:
            self._user = load_user_data(self.config.user, self.prof, self.config.seed, self.root)
        return self._user

    def data(self, split: str) -> Dataset:
        if self.is_user:  # one set of images; splits() indexes into it
            return self.user_data().dataset
        if split not in self._data:
            self._data[split] = load_dataset(self.config.dataset, split, self.config.data_dir)
        return self._data[split]

    def splits(self) -> dict[str, np.ndarray]:
        if self.is_user:
            return self.user_data().splits
        p = self.prof
        n_train = len(self.data("train"))
        need = p.base_train_size + p.n_selection + p.m
        if need > n_train:
            raise ValueError(
                f"profile {p.name!r} needs {need} training images, {self.config.dataset} has {n_train}"
            )
        perm = np.random.default_rng(self.config.seed).permutation(n_train)
        base = np.sort(perm[: p.base_train_size])
        sel = np.sort(perm[p.base_train_size : p.base_train_size + p.n_selection])
        cal = np.sort(perm[n_train - p.m :])
        test = np.sort(
            np.random.default_rng(self.config.seed + 1).permutation(len(self.data("test")))[: p.n_test]
        )
        return {
            "base": base,
            "targets": base[: p.n_targets],
            "selection": sel,
            "rules": sel[: p.n_rule],
            "calibration": cal,
            "test": test,
        }

    def seed(self, stream: str) -> int:
        return 1000 * self.config.seed + SEED_STREAMS[stream]

    # --- bookkeeping ----------------------------------------------------------------------
    def record_seconds(self, stage: str, seconds: float) -> None:
        meta = read_json(self.path("run.json")) or {}
        meta.setdefault("stage_seconds", {})[stage] = round(seconds, 2)
        atomic_write_json(self.path("run.json"), meta)

    def stage_seconds(self) -> dict[str, float]:
        return (read_json(self.path("run.json")) or {}).get("stage_seconds", {})


def model_spec(w: Workdir) -> dict[str, Any]:
    """Shape and input normalization of the work folder's models (from the base training images)."""
    ds = w.data("train")
    c, h, _ = ds.shape
    imgs = ds.images[w.splits()["base"]]
    return {
        "in_channels": c,
        "num_classes": len(ds.classes),
        "image_size": h,
        "mean": [float(imgs[:, i].mean()) for i in range(c)],
        "std": [float(imgs[:, i].std()) for i in range(c)],
    }
